#!/usr/bin/env python3
"""Muon against AdamW on the default pipeline's pretrain (4 layers, d_model
128, context 128, batch 16, 500 steps), both sides in one run.

* Quality: `examples/muon.toml` sweeps each optimizer's learning rate on
  the default pretrain and on nanoGPT's baby GPT (the sweeps are built, or
  found fresh, by llmflow itself); for each run the final validation loss,
  and for each optimizer's best run the first evaluation (every 25 steps)
  at or below the best AdamW run's final validation loss. The ratio of
  those steps is Muon's steps over AdamW's.
* Speed: the same model and batch trained for `--steps` steps with each
  optimizer, the two taking turns for `--rounds` rounds; a step's time is
  the tokens of a step over the stage's training throughput (forward,
  backward and the optimizer's update). The ratio is Muon's over AdamW's.

usage: python3 bench/muon.py [--rounds R] [--steps N] [--skip-quality]
(LLMFLOW_BIN names the directory of the llmflow binaries when they are not
in $CARGO_TARGET_DIR/release)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("LLMFLOW_BIN") or Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/llmflow/target")) / "release")
LLMFLOW = str(BIN / "llmflow")
EXAMPLE = ROOT / "examples" / "muon.toml"


def llmflow(*args, cwd=ROOT):
    out = subprocess.run([LLMFLOW, *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"llmflow {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def stages(pipeline, cwd=ROOT):
    return json.loads(llmflow("-f", str(pipeline), "status", "--json", cwd=cwd))["stages"]


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def quality():
    print("building examples/muon.toml (cached stages stay fresh) ...", flush=True)
    llmflow("-f", str(EXAMPLE), "run", "-j", "1")
    runs = {}
    for s in stages(EXAMPLE):
        if s["kind"] == "pretrain":
            runs[s["name"]] = [(r["step"], r["val_loss"]) for r in rows(s["out"]) if "val_loss" in r]
    for config, prefix in (("the default pipeline's pretrain", ""), ("nanoGPT's baby GPT", "baby_")):
        compare(config, {n: e for n, e in runs.items() if n.split("[")[0] in (prefix + "adamw", prefix + "muon")}, prefix)


def compare(config, runs, prefix):
    print(f"\n### {config}\n\n| run | final val_loss |\n|---|---|")
    for name, evals in runs.items():
        print(f"| {name} | {evals[-1][1]:.4f} |")
    best = {opt: min((n for n in runs if n.startswith(prefix + opt + "[")), key=lambda n: runs[n][-1][1]) for opt in ("adamw", "muon")}
    target = runs[best["adamw"]][-1][1]
    steps = {opt: next((step for step, loss in runs[best[opt]] if loss <= target), None) for opt in best}
    print(f"\ntarget: the best AdamW run's final val_loss, {target:.4f} ({best['adamw']})\n")
    print("| optimizer | best run | final val_loss | steps to the target |\n|---|---|---|---|")
    for opt in ("adamw", "muon"):
        reached = steps[opt] if steps[opt] is not None else "not reached"
        print(f"| {opt} | {best[opt]} | {runs[best[opt]][-1][1]:.4f} | {reached} |")
    if steps["muon"] is not None:
        print(f"\nMuon's steps over AdamW's: {steps['muon'] / steps['adamw']:.2f}")


SPEED = """
[pipeline]
name = "muon-speed"
artifacts = "{artifacts}"

[stages.corpus]
kind = "download"
retries = 0
sources = [{{ url = "{corpus}", split = "paragraph" }}]

[stages.tok]
kind = "train_tokenizer"
input = "corpus"
vocab_size = 4096
special_tokens = ["<|endoftext|>"]

[stages.tokens]
kind = "shard"
inputs = {{ docs = "corpus", tokenizer = "tok" }}
"""

TRAIN = """
[stages.{name}]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ arch = "gpt2", n_layer = 4, n_head = 4, d_model = 128, context = 128, dropout = 0.0 }}
train = {{ steps = {steps}, batch_size = 16, lr = 2e-3, warmup = 5, optimizer = "{name}" }}
eval_every = 100000
eval_batches = 1
checkpoint_every = 0
samples = {{ count = 0 }}
"""


def speed(rounds, steps):
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Path(tmp) / "pipeline.toml"
        text = SPEED.format(artifacts=Path(tmp) / "artifacts", corpus=ROOT / "data/corpora/tinyshakespeare.txt")
        text += "".join(TRAIN.format(name=n, steps=steps) for n in ("adamw", "muon"))
        pipeline.write_text(text)
        llmflow("-f", str(pipeline), "run", "tokens", cwd=tmp)
        tokens = 16 * 128
        times = {"adamw": [], "muon": []}
        for _ in range(rounds):
            for name in times:
                llmflow("-f", str(pipeline), "run", name, "--force", name, cwd=tmp)
                manifest = json.loads((Path(next(s["out"] for s in stages(pipeline, tmp) if s["name"] == name)).parent / "manifest.json").read_text())
                times[name].append(tokens / manifest["metrics"]["tokens_per_s"] * 1000)
        print(f"\n{steps} steps a run, {rounds} rounds, {os.cpu_count()} cores\n")
        print("| optimizer | ms per step (median) | per round |\n|---|---|---|")
        for name, t in times.items():
            print(f"| {name} | {statistics.median(t):.1f} | {', '.join(f'{x:.1f}' for x in t)} |")
        ratios = [m / a for a, m in zip(times["adamw"], times["muon"])]
        print(f"\nMuon's step over AdamW's: {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}–{max(ratios):.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    if not args.skip_quality:
        quality()
    speed(args.rounds, args.steps)


if __name__ == "__main__":
    main()
