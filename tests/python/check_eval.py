"""Recomputes the `eval` stage's numbers with transformers on Hugging Face
exports, following lm-evaluation-harness's definitions, and checks they agree.

usage: check_eval.py EVAL_OUT CASE_JSON LABEL=EXPORT_DIR...
EVAL_OUT is the stage's output directory; for each model, its results.json
entry and items/LABEL/*.jsonl are compared item by item and metric by metric
(the tolerance is relative for numbers above 1, such as perplexities).
CASE_JSON: {"tasks": [task tables as the stage resolved them, files absolute],
"seed": s, "tolerance": t}. `code` tasks are left to the harness's own tests.
Exits 1 on a difference.
"""
import glob, gzip, json, math, os, re, sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

eval_out, case_path = sys.argv[1:3]
case = json.load(open(case_path))
tol = case["tolerance"]
failures = []


def encode(text):
    return tok.encode(text, add_special_tokens=False).ids


def encode_pair(context, continuation):
    # lm-eval's HFLM._encode_pair
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        return [eot], encode(continuation)
    whole = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole[len(context_enc):]


def loglikelihood(context_enc, continuation_enc):
    """(sum log p(continuation), greedy) keeping at most max_len + 1 tokens:
    context dropped from the left first (at least one kept), then
    continuation from the right."""
    ids = context_enc + continuation_enc
    start = len(context_enc)
    if len(ids) > max_len + 1:
        drop = min(len(ids) - (max_len + 1), start - 1)
        ids, start = ids[drop:], start - drop
        ids = ids[: max_len + 1]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[start:])
    rows = logp[start - 1 : len(ids) - 1]
    ll = rows.gather(1, targets[:, None]).sum().item()
    greedy = bool((rows.argmax(-1) == targets).all())
    return ll, greedy


def rolling_windows(token_list, prefix_token, max_seq_len, context_len=1):
    # lm-eval's utils.get_rolling_token_windows + make_disjoint_window
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    windows = [([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        windows.append((token_list[window_end - max_seq_len - 1 : window_end - 1], token_list[window_end - window_pred_len : window_end]))
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]


def read_records(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_stderr(xs):
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def close(what, ours, theirs):
    """Within the tolerance, relative for numbers above 1 (perplexities)."""
    if abs(ours - theirs) > tol * max(1.0, abs(theirs)):
        failures.append(f"{what}: transformers {ours!r}, llmflow {theirs!r}")


def shuffled(n, seed):
    # records::shuffled: Fisher-Yates over SplitMix64
    mask = (1 << 64) - 1
    state = seed & mask
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        j = z % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def check(label, export):
    global model, tok, eot, max_len, results
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(os.path.join(export, "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    max_len = model.config.max_position_embeddings
    results = json.load(open(os.path.join(eval_out, "results.json")))["results"][label]
    for task in case["tasks"]:
        name, kind, limit = task["name"], task["type"], task.get("limit", 0)
        got = results[name]["metrics"]
        items = [json.loads(l) for l in open(os.path.join(eval_out, "items", label, name + ".jsonl"))]
        metrics = {}
        if kind == "perplexity":
            text = open(task["file"], encoding="utf-8").read()
            if limit and limit < len(text.encode()):
                raw = text.encode()
                cut = raw[-limit:] if task.get("from_end") else raw[:limit]
                cut = cut.decode("utf-8", errors="ignore")
                text = cut[cut.index("\n") + 1 :] if task.get("from_end") else cut[: cut.rindex("\n") + 1]
            tokens = encode(text)
            lls = [loglikelihood(c, t)[0] for c, t in rolling_windows(tokens, eot, max_len)]
            for i, (ll, item) in enumerate(zip(lls, items)):
                close(f"{name} window {i}", ll, item["logprob"])
            ll = sum(lls)
            words, nbytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
            metrics = {
                "token_perplexity": math.exp(-ll / len(tokens)),
                "word_perplexity": math.exp(-ll / words),
                "byte_perplexity": math.exp(-ll / nbytes),
                "bits_per_byte": -ll / nbytes / math.log(2),
            }
            counts = results[name]["counts"]
            if (counts["words"], counts["bytes"], counts["tokens"]) != (words, nbytes, len(tokens)):
                failures.append(f"{name}: words, bytes, tokens {words, nbytes, len(tokens)} vs {counts}")
        elif kind == "multiple_choice":
            pool = read_records(task["file"])
            docs = pool[:limit] if limit else pool
            shots, delim = task.get("shots", 0), task.get("delimiter", " ")
            acc, acc_norm = [], []
            for i, (doc, item) in enumerate(zip(docs, items)):
                chosen = [j for j in shuffled(len(pool), case["seed"] + i) if j != i][:shots]
                prefix = "".join(pool[j]["query"] + delim + pool[j]["choices"][pool[j]["gold"]] + "\n\n" for j in chosen)
                lls = [loglikelihood(*encode_pair(prefix + doc["query"] + delim, c))[0] for c in doc["choices"]]
                for j, (a, b) in enumerate(zip(lls, item["logprobs"])):
                    close(f"{name} item {i} choice {j}", a, b)
                acc.append(float(max(range(len(lls)), key=lambda j: (lls[j], -j)) == doc["gold"]))
                norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
                acc_norm.append(float(max(range(len(norm)), key=lambda j: (norm[j], -j)) == doc["gold"]))
            metrics["acc"], metrics["acc_stderr"] = mean_stderr(acc)
            metrics["acc_norm"], metrics["acc_norm_stderr"] = mean_stderr(acc_norm)
        elif kind == "schema":
            pool = read_records(task["file"])
            docs = pool[:limit] if limit else pool
            shots, delim = task.get("shots", 0), task.get("delimiter", " ")
            acc = []
            for i, (doc, item) in enumerate(zip(docs, items)):
                chosen = [j for j in shuffled(len(pool), case["seed"] + i) if j != i][:shots]
                prefix = "".join(pool[j]["context_options"][pool[j]["gold"]] + delim + pool[j]["continuation"] + "\n\n" for j in chosen)
                lls = [loglikelihood(*encode_pair(prefix + option + delim, doc["continuation"]))[0] for option in doc["context_options"]]
                for j, (a, b) in enumerate(zip(lls, item["logprobs"])):
                    close(f"{name} item {i} option {j}", a, b)
                acc.append(float(max(range(len(lls)), key=lambda j: (lls[j], -j)) == doc["gold"]))
            metrics["acc"], metrics["acc_stderr"] = mean_stderr(acc)
        elif kind == "language_modeling":
            pool = read_records(task["file"])
            docs = pool[:limit] if limit else pool
            shots, delim = task.get("shots", 0), task.get("delimiter", " ")
            scored = []
            for i, d in enumerate(docs):
                chosen = [j for j in shuffled(len(pool), case["seed"] + i) if j != i][:shots]
                prefix = "".join(pool[j]["context"] + delim + pool[j]["continuation"] + "\n\n" for j in chosen)
                scored.append(loglikelihood(*encode_pair(prefix + d["context"] + delim, d["continuation"])))
            for i, ((ll, greedy), item) in enumerate(zip(scored, items)):
                close(f"{name} item {i}", ll, item["logprob"])
                if greedy != item["greedy"]:
                    failures.append(f"{name} item {i}: greedy {greedy} vs {item['greedy']}")
            metrics["acc"], metrics["acc_stderr"] = mean_stderr([float(g) for _, g in scored])
            metrics["perplexity"] = math.exp(-sum(ll for ll, _ in scored) / len(scored))
        elif kind == "minimal_pairs":
            pattern = task["file"]
            files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            correct = []
            for path in files:
                docs = read_records(path)
                for d in docs[:limit] if limit else docs:
                    good = loglikelihood(*encode_pair("", d["sentence_good"]))[0]
                    bad = loglikelihood(*encode_pair("", d["sentence_bad"]))[0]
                    item = items[len(correct)]
                    close(f"{name} pair {len(correct)} good", good, item["good"])
                    close(f"{name} pair {len(correct)} bad", bad, item["bad"])
                    correct.append(float(good > bad))
            metrics["acc"], metrics["acc_stderr"] = mean_stderr(correct)
        for key, value in metrics.items():
            close(f"{name} {key}", value, got[key])
        if metrics:
            print(f"{label} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


for arg in sys.argv[3:]:
    label, export = arg.split("=", 1)
    check(label, export)

if failures:
    sys.exit("\n".join(failures))
