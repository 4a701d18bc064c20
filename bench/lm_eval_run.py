#!/usr/bin/env python3
"""lm-evaluation-harness's half of bench/eval.sh, taking turns with llmflow.

One process: the exported model is loaded once (HFLM, fp32, CPU), then each
task is timed on its own through `lm_eval.simple_evaluate` (zero-shot,
`log_samples=True`), so a task's time excludes loading the model, as
llmflow's per-task `seconds` do. The batch size is the fastest of those
given on the first --sweep-limit items of every task.

With --llmflow, each task's llmflow stage (`bench_eval_NAME` in
--pipeline, one task each) runs just before lm-eval scores the same task,
so that both sides of a row are timed within seconds of each other on a
machine whose load comes and goes; its artifact is copied to
--llmflow-out/llmflow.ROUND/NAME. Before each round the stages' seed (a line
`seed = N  # bench round`) is changed: zero-shot scoring does not use it,
but it is part of the key of eval's per-task cache, so each round scores
afresh.

The JSON written holds the sweep and, per round and task, lm-eval's seconds,
the time inside the model's `loglikelihood` (tokenizing, batching, forward
passes) and the metrics; each document's log-likelihoods from round 1.

usage: lm_eval_run.py --model DIR --include DIR --tasks NAME:LIMIT,... \\
                      --batch-sizes 1,16,64 --threads N --out FILE
                      [--rounds R] [--sweep-limit N]
                      [--llmflow BIN --pipeline FILE --llmflow-out DIR]

NAME is lm-eval's task (bench_X; llmflow's stage is bench_eval_X); LIMIT 0
takes the whole file.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--include", required=True)
    ap.add_argument("--tasks", required=True, help="NAME:LIMIT,... (LIMIT 0: all)")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sweep-limit", type=int, default=20, help="items per task when choosing the batch size")
    ap.add_argument("--llmflow", help="llmflow's binary: run its stage of each task before lm-eval's")
    ap.add_argument("--pipeline", help="the bench pipeline (with --llmflow)")
    ap.add_argument("--llmflow-out", help="where to copy llmflow's artifacts (with --llmflow)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import logging

    import torch

    torch.set_num_threads(args.threads)
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # simple_evaluate's bookkeeping, not evaluation: `add_env_info` runs
    # torch's collect_env (`pip list` and other subprocesses, about 0.7 s a
    # call here) and the git hash another subprocess. Stubbed, so that the
    # time measured is lm-eval's evaluation.
    lm_eval.evaluator.add_env_info = lambda results: None
    lm_eval.evaluator.get_git_commit_hash = lambda: None

    for name in ("lm-eval", "lm_eval", "datasets", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:
        pass

    tasks = []
    for spec in args.tasks.split(","):
        name, _, limit = spec.partition(":")
        tasks.append((name, int(limit or 0) or None))
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    t = time.perf_counter()
    manager = TaskManager(include_path=args.include, include_defaults=False)
    index_s = time.perf_counter() - t
    t = time.perf_counter()
    lm = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=sizes[0])
    load_s = time.perf_counter() - t
    torch.set_num_threads(args.threads)  # in case loading changed it

    # Time spent inside the model's loglikelihood (everything lm-eval does
    # per request: encoding, sorting, batching, forward passes).
    inner = {"s": 0.0}
    loglikelihood = lm.loglikelihood

    def timed_loglikelihood(requests, *a, **k):
        t0 = time.perf_counter()
        try:
            return loglikelihood(requests, *a, **k)
        finally:
            inner["s"] += time.perf_counter() - t0

    lm.loglikelihood = timed_loglikelihood

    # lm-eval's tokenizer (transformers, from the export's tokenizer.json)
    # against the `tokenizers` library that llmflow's Rust side uses.
    tokenizer_check = tokenizer_agreement(lm, args.model)

    def run(task, limit):
        inner["s"] = 0.0
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            num_fewshot=0,
            limit=limit,
            log_samples=True,
            bootstrap_iters=0,  # no bootstrap (lm-eval's default: 100,000 rounds for perplexity's stderr)
            verbosity="ERROR",
        )
        return res, time.perf_counter() - t0, inner["s"]

    # Warm-up, untimed: the first load of each JSON file builds the datasets
    # cache, and the first forward passes warm the allocator.
    for task, _ in tasks:
        run(task, 2)

    # The batch size: each one given on the first --sweep-limit items of
    # every task; the fastest over all of them scores the whole run.
    sweep = {}
    for bs in sizes if len(sizes) > 1 else []:
        lm.batch_size_per_gpu = bs
        sweep[str(bs)] = 0.0
        for task, limit in tasks:
            n = min(limit or args.sweep_limit, args.sweep_limit)
            sweep[str(bs)] += run(task, n)[1]
        print(f"lm-eval sweep: batch size {bs}: {sweep[str(bs)]:.2f} s", file=sys.stderr)
    best = min(sweep, key=sweep.get) if len(sizes) > 1 else str(sizes[0])
    lm.batch_size_per_gpu = int(best)

    out = {
        "lm_eval_version": version("lm_eval"),
        "transformers_version": version("transformers"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "max_length": lm.max_length,
        "task_index_seconds": index_s,
        "model_load_seconds": load_s,
        "tokenizer_check": tokenizer_check,
        "sweep_limit": args.sweep_limit,
        "sweep": sweep,
        "batch_size": int(best),
        "rounds": [],
        "items": {},
    }
    for r in range(1, args.rounds + 1):
        if args.llmflow:
            new_seed(args.pipeline, r)
        this_round = {}
        for task, limit in tasks:
            if args.llmflow:
                llmflow_stage(args, task.removeprefix("bench_"), r)
            res, seconds, score_s = run(task, limit)
            samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
            metrics = {
                k.split(",")[0]: v
                for k, v in res["results"][task].items()
                if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))
            }
            this_round[task] = {"seconds": seconds, "score_seconds": score_s, "examples": len(samples), "metrics": metrics}
            if r == 1:
                out["items"][task] = [
                    {
                        "doc_id": s["doc_id"],
                        "logprobs": [float(x[0]) for x in s["filtered_resps"]],
                        "greedy": [bool(x[1]) for x in s["filtered_resps"]],
                    }
                    for s in samples
                ]
            print(
                f"lm-eval round {r}, bs={best}, {task}: {len(samples)} examples in {seconds:.2f} s "
                f"({score_s:.2f} s in loglikelihood), {metrics}",
                file=sys.stderr,
            )
        out["rounds"].append(this_round)
    with open(args.out, "w") as f:
        json.dump(out, f)


def new_seed(pipeline, r):
    text = open(pipeline).read()
    seed = f"{int(time.time())}{r}"
    text = re.sub(r"(?m)^seed = \d+(  # bench round)$", lambda m: f"seed = {seed}{m.group(1)}", text)
    with open(pipeline, "w") as f:
        f.write(text)


def llmflow_stage(args, name, r):
    """Builds llmflow's stage of task NAME and copies its artifact."""
    stage = f"bench_eval_{name}"
    t0 = time.perf_counter()
    subprocess.run([args.llmflow, "run", "-f", args.pipeline, stage], check=True, stdout=sys.stderr)
    wall = time.perf_counter() - t0
    shown = subprocess.run(
        [args.llmflow, "show", "-f", args.pipeline, stage, "--json"], check=True, capture_output=True, text=True
    )
    art = json.loads(shown.stdout)["out"]
    dest = os.path.join(args.llmflow_out, f"llmflow.{r}", name)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(art, dest)
    for root, dirs, files in os.walk(dest):
        for f in dirs + files:
            os.chmod(os.path.join(root, f), 0o755 if f in dirs else 0o644)
    res = json.load(open(os.path.join(dest, "results.json")))
    for label, scored in res["results"].items():
        t = scored[name]
        print(
            f"llmflow round {r}, {name}: {t['examples']} examples in {t['seconds']:.2f} s "
            f"(`llmflow run` {wall:.1f} s in all), "
            f"{ {k: v for k, v in t['metrics'].items() if not k.endswith('_stderr')} }",
            file=sys.stderr,
        )


def version(package):
    from importlib.metadata import version as v

    return v(package)


def tokenizer_agreement(lm, model_dir):
    """Encodes a few strings both ways; returns the ones that differ."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return "tokenizers not installed"
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    probe = [
        "Question: Which is the most likely effect?\nAnswer: Planetary days will become shorter.",
        "The man turned on the faucet, therefore water flowed from the spout.",
        "  leading spaces,\ttabs and\n\nblank lines — unicode “quotes” café 1,234.5",
        "Sarah was a much better surgeon than Maria so Maria always got the easier cases.",
    ]
    bad = [s for s in probe if lm.tok_encode(s) != tok.encode(s, add_special_tokens=False).ids]
    return {"probes": len(probe), "differ": bad}


if __name__ == "__main__":
    main()
