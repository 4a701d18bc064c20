#!/usr/bin/env python3
"""Data parallelism on this machine's cores, side by side in one run:
`pretrain` as 1 process whose batches are split across in-process model
replicas (one per thread), as 2 processes × 1 thread training together
through c10d's Gloo all-reduce (DDP), and as the same with AdamW's moments
partitioned across the 2 ranks (ZeRO-1).

Two models: the default pipeline's (GPT-2, 4 layers × 128, context 128,
batch 16, 1024-token vocabulary) and nanoGPT's CPU baby GPT (4 × 128,
context 64, batch 12, 4096-token vocabulary). All sides train the same
tokens with the same seed and config; only `processes`, `zero` and the
threads per process differ. The modes take turns, round by round, so each
sees the same stretch of a machine whose speed drifts. Per build: the median
`tokens_per_s` of its steps after a warm-up, the AdamW moments a rank holds,
and the peak resident memory of rank 0. The table shows the median over
rounds and the ratio to the in-process path. A second table puts each step's
time beside what the collectives cost for the model's gradients, alone
(`cargo bench --bench collectives`: 2 ranks, Gloo over loopback).

usage: python3 bench/ddp.py [--steps N] [--rounds R]
(LLMFLOW_BIN names the directory of the llmflow binaries when they are not
in $CARGO_TARGET_DIR/release)
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "default pipeline": dict(n_layer=4, n_head=4, d_model=128, context=128, batch=16, vocab=1024),
    "nanoGPT baby": dict(n_layer=4, n_head=4, d_model=128, context=64, batch=12, vocab=4096),
}
MODES = {
    "1 proc x 2 threads (replicas)": "processes = 1",
    "2 procs x 1 thread (DDP)": "processes = 2",
    "2 procs x 1 thread (DDP+ZeRO-1)": "processes = 2\nzero = 1",
}
WARMUP = 10

PIPELINE = """
[stages.corpus]
kind = "download"
sources = [{{ url = "{root}/data/corpora/tinyshakespeare.txt", split = "paragraph" }}]

[stages.tok]
kind = "train_tokenizer"
input = "corpus"
vocab_size = {vocab}

[stages.tokens]
kind = "shard"
inputs = {{ docs = "corpus", tokenizer = "tok" }}

[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ arch = "gpt2", n_layer = {n_layer}, n_head = {n_head}, d_model = {d_model}, context = {context}, dropout = 0.0 }}
train = {{ steps = {steps}, batch_size = {batch}, lr = 1e-3, warmup = 10 }}
eval_every = 100000
checkpoint_every = 0
samples = {{ count = 0 }}
{mode}
"""


def binary():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(os.environ.get("LLMFLOW_BIN", os.path.join(target, "release")), "llmflow")


def llmflow(workdir, *args):
    return subprocess.run([binary(), *args], cwd=workdir, check=True, capture_output=True, text=True).stdout


def build(workdir, preset, steps, mode):
    """Rebuilds `pretrain` in `mode`; (median tokens/s, optimizer MB per rank, peak RSS MB of rank 0)."""
    with open(os.path.join(workdir, "pipeline.toml"), "w") as f:
        f.write(PIPELINE.format(root=ROOT, steps=steps, mode=mode, **preset))
    llmflow(workdir, "run", "--jobs", "1", "--force", "pretrain")
    out = json.loads(llmflow(workdir, "show", "pretrain", "--json"))["out"]
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    rate = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > WARMUP)
    metrics = json.load(open(os.path.join(os.path.dirname(out), "manifest.json")))["metrics"]
    return rate, metrics["optimizer_mb_per_rank"], metrics["peak_rss_mb"], metrics["params"]


def collectives(sizes):
    """{elements: (all-reduce ms, reduce-scatter + all-gather ms)} from the collectives benchmark."""
    # libtorch where the Makefile puts it: torch-sys rebuilds, and everything
    # above it, when LIBTORCH differs from the build's.
    env = dict(os.environ)
    env.setdefault("LIBTORCH", os.path.join(os.environ.get("LIBTORCH_DIR", os.path.join(ROOT, ".libtorch")), "torch"))
    out = subprocess.run(["cargo", "bench", "--workspace", "--bench", "collectives", "--", *map(str, sizes)],
                         cwd=ROOT, check=True, capture_output=True, text=True, env=env).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return [(r["all_reduce_ms"], r["reduce_scatter_all_gather_ms"]) for r in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; {args.steps} steps a build, median of {args.rounds} rounds, modes in turn\n")
    print("| model | mode | tokens/s | vs replicas | AdamW moments / rank (MB) | peak RSS rank 0 (MB) |")
    print("|---|---|---|---|---|---|")
    steps = {}  # model -> (params, step ms per mode)
    for name, preset in PRESETS.items():
        with tempfile.TemporaryDirectory() as workdir:
            results = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode, table in MODES.items():
                    results[mode].append(build(workdir, preset, args.steps, table))
            base = statistics.median(r[0] for r in results[next(iter(MODES))])
            tokens = preset["batch"] * preset["context"]
            steps[name] = (results[next(iter(MODES))][0][3], [])
            for mode, runs in results.items():
                rate = statistics.median(r[0] for r in runs)
                steps[name][1].append(1e3 * tokens / rate)
                print(f"| {name} | {mode} | {rate:,.0f} | {rate / base:.2f}x | {runs[0][1]:.2f} | {max(r[2] for r in runs):.0f} |")
    print("\n| model | gradients (MB) | step ms: replicas / DDP / ZeRO-1 | all-reduce ms | reduce-scatter + all-gather ms |")
    print("|---|---|---|---|---|")
    costs = collectives([params for params, _ in steps.values()])
    for (name, (params, ms)), (all_reduce, zero) in zip(steps.items(), costs):
        print(f"| {name} | {params * 4e-6:.2f} | {' / '.join(f'{m:.1f}' for m in ms)} | {all_reduce:.1f} | {zero:.1f} |")


if __name__ == "__main__":
    main()
