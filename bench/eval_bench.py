#!/usr/bin/env python3
"""Helpers of bench/eval.sh: the task list, the bench pipeline, lm-eval's
task files, and the side-by-side table.

  eval_bench.py prepare OUT PIPELINE DATA_DIR MODEL_STAGE LIMIT KINDS_FILE
      writes OUT/pipeline.toml (the stages MODEL_STAGE needs, copied from
      PIPELINE with the artifact store made absolute, so they are cache hits,
      plus a `bench_eval_TASK` eval stage for each task) and OUT/lm_eval_tasks/ (bench/lm_eval_tasks
      with the data directory filled in); prints lm-eval's --tasks list.
      KINDS_FILE holds llmflow's list of eval task types (`expected one of
      `perplexity`, `multiple_choice`, …`): a build without the `schema`
      task type skips the WinoGrande task, one without `language_modeling`
      scores LAMBADA with the older name `lambada`. Items with a
      continuation longer than the model's context are left out of both
      sides (lm-eval stops on them: `assert len(continuation_enc) <=
      max_length`); the task files both read are in OUT/task-data. OUT also
      gets links to the entries of PIPELINE's directory (data/, scripts/, …)
      so that the copied stages' relative paths resolve.
  eval_bench.py table OUT
      reads OUT/llmflow.ROUND/TASK/ (the artifact of llmflow's stage of TASK:
      results.json, items/) and OUT/lm_eval.json (lm-eval's rounds) and prints
      the markdown table.

`prepare` needs the `tokenizers` package (run it with the venv's python);
`table` the standard library only.
"""
import json
import os
import re
import shutil
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE = "bench_eval"
# Metrics compared by relative difference: a perplexity of 10^8 carries no
# absolute 1e-3 (its relative difference is that of the mean log-likelihood).
RELATIVE = {"perplexity"}
TOLERANCE = 1e-3
SEED_MARK = "  # bench round"
TASK_DATA = "task-data"  # under OUT: the task files both sides read

# name, llmflow type, file (in DATA_DIR), delimiter, limit (None: the LIMIT
# argument; 0: the whole file). The lm-eval task is bench_NAME
# (bench/lm_eval_tasks/bench_NAME.yaml), the same prompt and items.
TASKS = [
    ("arc_easy", "multiple_choice", "arc_easy.jsonl", "\nAnswer: ", None),
    ("arc_challenge", "multiple_choice", "arc_challenge.jsonl", "\nAnswer: ", None),
    ("copa", "multiple_choice", "copa.jsonl", " ", 0),
    ("piqa", "multiple_choice", "piqa.jsonl", "Answer: ", None),  # queries end in "\n"
    ("winogrande", "schema", "winogrande_format_sample.jsonl", " ", 0),
    ("lambada", "language_modeling", "lambada_openai.jsonl", " ", None),
]


def toml_str(s):
    # A JSON string is a valid TOML basic string.
    return json.dumps(s, ensure_ascii=False)


def ancestors(stages, target):
    """`target` and every stage it reads, transitively."""
    need, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name in need:
            continue
        if name not in stages:
            sys.exit(f"eval_bench: no stage `{name}` in the pipeline")
        need.add(name)
        s = stages[name]
        if isinstance(s.get("input"), str):
            todo.append(s["input"])
        if isinstance(s.get("inputs"), dict):
            todo.extend(v for v in s["inputs"].values() if isinstance(v, str))
    return need


def prepare(out, pipeline, data_dir, model_stage, limit, kinds_file):
    out, pipeline, data_dir = map(os.path.abspath, (out, pipeline, data_dir))
    kinds = open(kinds_file).read()
    text = open(pipeline).read()
    parsed = tomllib.loads(text)
    store = parsed.get("pipeline", {}).get("artifacts", "artifacts")
    store = os.path.normpath(os.path.join(os.path.dirname(pipeline), store))
    keep = ancestors(parsed.get("stages", {}), model_stage)

    # Copy the file block by block (a block starts at a table header), keeping
    # [pipeline] and the stages the model needs verbatim: their keys, and so
    # their artifacts, stay the same.
    header = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    blocks, current = [], []
    for line in text.splitlines(keepends=True):
        if header.match(line) and current:
            blocks.append(current)
            current = []
        current.append(line)
    blocks.append(current)
    # Comments just above a header belong to the block below it.
    for prev, block in zip(blocks, blocks[1:]):
        while prev and (not prev[-1].strip() or prev[-1].lstrip().startswith("#")):
            block.insert(0, prev.pop())
    kept = []
    for block in filter(None, blocks):
        m = next(filter(None, map(header.match, block)), None)
        if m and m.group(1).startswith("stages."):
            if m.group(1).split(".")[1].strip('"') not in keep:
                continue
        kept.append("".join(block))
    body = "".join(kept)
    line = f"artifacts = {toml_str(store)}   # the main pipeline's store: its artifacts are reused"
    if re.search(r"(?m)^artifacts\s*=", body):
        body = re.sub(r"(?m)^artifacts\s*=.*$", lambda _: line, body, count=1)
    else:
        body = re.sub(r"(?m)^\[pipeline\].*$", lambda m: m.group(0) + "\n" + line, body, count=1)

    from tokenizers import Tokenizer

    model_dir = os.path.join(out, "model")
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    config = json.load(open(os.path.join(model_dir, "config.json")))
    context = config.get("n_positions") or config["max_position_embeddings"]

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    shutil.rmtree(os.path.join(out, TASK_DATA), ignore_errors=True)
    os.makedirs(os.path.join(out, TASK_DATA))
    tasks, skipped, notes = [], [], []
    for name, kind, file, delim, lim in TASKS:
        if kind == "schema" and "`schema`" not in kinds:
            skipped.append(f"{name} (this llmflow has no `schema` task type)")
            continue
        if kind == "language_modeling" and "`language_modeling`" not in kinds:
            kind = "lambada"  # the type's older name
        path = os.path.join(data_dir, file)
        if not os.path.isfile(path):
            skipped.append(f"{name} (no {path})")
            continue
        lim = limit if lim is None else lim
        path, left_out = fitting(path, os.path.join(out, TASK_DATA, file), kind, delim, lim, encode, context)
        if left_out:
            notes.append(f"`{name}`: left out {left_out} (a continuation longer than the model's {context} tokens)")
        tasks.append((name, kind, path, delim, lim))

    # One eval stage per task, so that eval.sh can time each task on both
    # sides back to back. Zero-shot, so the seed changes no score; each
    # round sets a new one, so that each round scores afresh (the seed is
    # part of the key of eval's per-task cache).
    stage = ["\n# bench/eval.sh: the same items scored by lm-evaluation-harness, one stage a task.\n"]
    for name, kind, path, delim, lim in tasks:
        stage += [
            f"\n[stages.{STAGE}_{name}]\n",
            'kind = "eval"\n',
            f"inputs = {{ {model_stage} = {toml_str(model_stage)} }}\n",
            f"seed = 1234{SEED_MARK}\n",
            f"\n[[stages.{STAGE}_{name}.tasks]]\n",
            f"name = {toml_str(name)}\n",
            f"type = {toml_str(kind)}\n",
            f"file = {toml_str(path)}\n",
            f"delimiter = {toml_str(delim)}\n",
            f"limit = {lim}\n",
        ]
    os.makedirs(out, exist_ok=True)
    # The copied stages name files relative to the original pipeline's
    # directory (the corpus's mirror, a script): link its entries here, so
    # that the same relative paths name the same files.
    project = os.path.dirname(pipeline)
    for entry in os.listdir(project):
        target, link = os.path.join(project, entry), os.path.join(out, entry)
        if entry.startswith(".") or entry in ("pipeline.toml", TASK_DATA) or target in (pipeline, store):
            continue
        if (out + os.sep).startswith(target + os.sep):  # bench/, which holds OUT
            continue
        if os.path.islink(link):
            os.remove(link)
        if not os.path.exists(link):
            os.symlink(target, link)
    with open(os.path.join(out, "pipeline.toml"), "w") as f:
        f.write(body.rstrip("\n") + "\n" + "".join(stage))

    # lm-eval's tasks, the data directory filled in.
    tasks_dir = os.path.join(out, "lm_eval_tasks")
    shutil.rmtree(tasks_dir, ignore_errors=True)
    os.makedirs(tasks_dir)
    src = os.path.join(HERE, "lm_eval_tasks")
    for f in os.listdir(src):
        if f.endswith(".yaml"):
            with open(os.path.join(src, f)) as fi, open(os.path.join(tasks_dir, f), "w") as fo:
                fo.write(fi.read().replace("@DATA@", os.path.join(out, TASK_DATA)))
        elif f.endswith(".py"):
            shutil.copy(os.path.join(src, f), tasks_dir)
    with open(os.path.join(out, "tasks.json"), "w") as f:
        json.dump({"tasks": [t[0] for t in tasks], "skipped": skipped, "notes": notes}, f)
    for s in skipped:
        print(f"eval.sh: skipping {s}", file=sys.stderr)
    print(",".join(f"bench_{name}:{lim}" for name, _, _, _, lim in tasks))


def continuation_tokens(encode, context, continuation):
    """lm-eval's `_encode_pair` (and llmflow's): the continuation's tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    return len(encode(context + continuation)) - len(encode(context))


def fitting(path, dest, kind, delim, limit, encode, context):
    """DEST: a link to PATH, or, where some of the first LIMIT items that
    fit have a continuation over CONTEXT tokens, PATH without those.
    Returns DEST and how many of the items were left out."""
    records, dropped, kept = [], [], 0
    for i, line in enumerate(open(path)):
        if not line.strip():
            continue
        if limit and kept >= limit:
            records.append(line)
            continue
        item = json.loads(line)
        if kind == "multiple_choice":
            pairs = [(item["query"] + delim, c) for c in item["choices"]]
        elif kind == "schema":
            pairs = [(o, delim + item["continuation"]) for o in item["context_options"]]
        else:
            pairs = [(item["context"] + delim, item["continuation"])]
        if all(continuation_tokens(encode, c, x) <= context for c, x in pairs):
            kept += 1
            records.append(line)
        else:
            dropped.append(i)
    if dropped:
        with open(dest, "w") as f:
            f.writelines(records)
        lines = ", ".join(str(i + 1) for i in dropped)
        return dest, f"{len(dropped)} item{'s' * (len(dropped) > 1)} (line{'s' * (len(dropped) > 1)} {lines})"
    os.symlink(path, dest)
    return dest, None


def fmt(x):
    if x is None:
        return "–"
    if abs(x) >= 1e5:
        return f"{x:.6g}"
    return f"{x:.4f}".rstrip("0").rstrip(".") if x != int(x) else f"{int(x)}"


def table(out):
    # Round 1 gives the metrics and items (every round scores the same);
    # each task's time is its fastest round.
    lme = json.load(open(os.path.join(out, "lm_eval.json")))
    names = json.load(open(os.path.join(out, "tasks.json")))
    rounds = range(1, len(lme["rounds"]) + 1)
    ours, best = {}, lme["batch_size"]
    for name in names["tasks"]:
        res = [json.load(open(os.path.join(out, f"llmflow.{r}", name, "results.json"))) for r in rounds]
        label = next(iter(res[0]["results"]))
        ours[name] = res[0]["results"][label][name]
        ours[name]["seconds"] = min(x["results"][label][name]["seconds"] for x in res)
        ours[name]["examples_per_s"] = ours[name]["examples"] / ours[name]["seconds"]
    theirs = lme["rounds"][0]
    for task in theirs:
        fastest = min((x[task] for x in lme["rounds"]), key=lambda x: x["seconds"])
        theirs[task]["seconds"], theirs[task]["score_seconds"] = fastest["seconds"], fastest["score_seconds"]
        theirs[task]["items"] = lme["items"][task]

    rows, checks, ratios, notes = [], [], [], []
    tot = {"n": 0, "lme": 0.0, "lme_score": 0.0, "ours": 0.0}
    for name in names["tasks"]:
        a, b = ours[name], theirs[f"bench_{name}"]
        n_ours, n_theirs = a["examples"], b["examples"]
        shared = [m for m in b["metrics"] if m in a["metrics"]]
        agree, worst = [], 0.0
        for m in shared:
            x, y = a["metrics"][m], b["metrics"][m]
            d = abs(x - y) / abs(y) if m in RELATIVE and y else abs(x - y)
            worst = max(worst, d)
            agree.append(f"{m} {fmt(x)} / {fmt(y)}")
            checks.append(d <= TOLERANCE)
        checks.append(n_ours == n_theirs)
        item = item_diff(os.path.join(out, "llmflow.1", name, "items", label, f"{name}.jsonl"), b["items"])
        if item:
            notes.append(f"`{name}`: {item}")
        eps_theirs = n_theirs / b["seconds"]
        eps_score = n_theirs / b["score_seconds"] if b["score_seconds"] else float("nan")
        eps_ours = a["examples_per_s"]
        tot["n"] += n_ours
        tot["lme"] += b["seconds"]
        tot["lme_score"] += b["score_seconds"]
        tot["ours"] += a["seconds"]
        ratios.append(eps_ours / eps_theirs)
        rel = " (relative)" if any(m in RELATIVE for m in shared) else ""
        rows.append(
            f"| {name} | {n_ours}" + ("" if n_ours == n_theirs else f" (lm-eval {n_theirs})")
            + f" | {eps_theirs:.0f} | {eps_score:.0f} | {eps_ours:.0f} | **{eps_ours / eps_theirs:.1f}×** | "
            + f"{'; '.join(agree)} | {worst:.1e}{rel} |"
        )
    sweep = ", ".join(f"{bs}: {s:.1f} s" for bs, s in lme["sweep"].items())
    sweep = f" (the fastest on the first {lme['sweep_limit']} items of each task: {sweep})" if sweep else ""
    print(f"lm-eval {lme['lm_eval_version']} (HF backend, transformers {lme['transformers_version']}, "
          f"torch {lme['torch_version']}), batch size {best}{sweep}; both sides fp32 on CPU, "
          f"{lme['threads']} threads; model `{label}` (context {lme['max_length']}); each task timed on both "
          f"sides back to back, its fastest of {len(rounds)} round{'s' * (len(rounds) > 1)}.")
    print()
    print("| task | examples | lm-eval ex/s | lm-eval ex/s, scoring only | llmflow ex/s | llmflow / lm-eval | "
          "metric llmflow / lm-eval | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    ratio = (tot["n"] / tot["ours"]) / (tot["n"] / tot["lme"])
    print(f"| all | {tot['n']} | {tot['n'] / tot['lme']:.0f} | {tot['n'] / tot['lme_score']:.0f} | "
          f"{tot['n'] / tot['ours']:.0f} | **{ratio:.1f}×** | | |")
    print()
    print("lm-eval ex/s: each task's `simple_evaluate` (task and dataset loading, prompts, requests, scoring, "
          "metrics; environment logging stubbed out, no bootstrap); scoring only: the time inside "
          "`HFLM.loglikelihood`. llmflow ex/s: results.json's per-task `examples_per_s` (reading, "
          "tokenizing, scoring, metrics; no model loading). Perplexity is compared by relative difference.")
    for n in notes:
        print(f"- {n}")
    for s in names["notes"]:
        print(f"- {s}")
    for s in names["skipped"]:
        print(f"- skipped {s}")
    ok_agree = all(checks)
    print()
    print(f"goal: llmflow ≥ 3× lm-eval's throughput: {'met' if ratio >= 3.0 else 'NOT met'} ({ratio:.1f}× over "
          f"the suite; {sum(r >= 3.0 for r in ratios)} of {len(ratios)} tasks at 3× or more, the slowest "
          f"{min(ratios):.1f}×); every shared metric within {TOLERANCE:g}: {'met' if ok_agree else 'NOT met'}")


def item_diff(path, theirs):
    """Per item: the largest log-likelihood difference and the items whose
    greedy flags or argmax differ."""
    if not os.path.isfile(path):
        return "no per-item file"
    ours = [json.loads(l) for l in open(path) if l.strip()]
    if len(ours) != len(theirs):
        return f"{len(ours)} items here, {len(theirs)} in lm-eval"
    worst, worst_at, pred_differs, greedy_differs = 0.0, None, 0, 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if "logprobs" in a:
            la = a["logprobs"]
        elif "logprob" in a:
            la = [a["logprob"]]
        else:
            return None
        lb = b["logprobs"]
        if len(la) != len(lb):
            return f"item {i}: {len(la)} log-likelihoods here, {len(lb)} in lm-eval"
        for x, y in zip(la, lb):
            if abs(x - y) > worst:
                worst, worst_at = abs(x - y), i
        if len(la) > 1 and max(range(len(la)), key=la.__getitem__) != max(range(len(lb)), key=lb.__getitem__):
            pred_differs += 1
        if "greedy" in a and bool(a["greedy"]) != bool(b["greedy"][0]):
            greedy_differs += 1
    text = f"per item, log-likelihoods differ by at most {worst:.1e} nats (item {worst_at})"
    if pred_differs:
        text += f"; {pred_differs} items pick a different choice"
    if greedy_differs:
        text += f"; {greedy_differs} items differ in greedy match"
    return text


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "prepare":
        prepare(*sys.argv[2:6], int(sys.argv[6]), sys.argv[7])
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        table(sys.argv[2])
    else:
        sys.exit(__doc__)
