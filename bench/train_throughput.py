#!/usr/bin/env python3
"""Training throughput of llmflow's `pretrain` against a PyTorch reference of
the same model and config, side by side in one run, plus MFU against this
machine's measured matmul peak.

Presets:
* `baby` (the default, CPU): nanoGPT's CPU "baby GPT" — GPT-2 architecture,
  4 layers, 4 heads, d_model 128, context 64, batch 12, no dropout — with the
  vocabulary of the tokenizer the pipeline trains (4096 tokens), fp32.
* `gpt2-124m` (CUDA): GPT-2 small — 12 layers, 12 heads, d_model 768,
  context 1024, vocabulary padded to 50304 — under bf16 autocast, batch 16.

Both sides use the same libtorch (the interpreter's torch; the llmflow
binaries must be built against the same version), the same thread count, the
same precision, AdamW, gradient clipping, torch.compile off, real token
windows of the same corpus, and read each step's loss. The reference is
nanoGPT's training step as written (`torch.optim.AdamW` with its defaults,
`fused` on CUDA only, as nanoGPT does).

A shared (virtual) machine's speed drifts from second to second by more than
the difference being measured, so the two sides take turns: both start
together, each in its own process, and they are paused and resumed
(SIGSTOP/SIGCONT) in alternation every half second, so that each sees the
same stretch of machine. A side's throughput is its median step after a
warm-up (a step cut by a pause is an outlier the median ignores); the
table shows the median over rounds and the range of the per-round ratios.
MFU is against the matmul peak measured in the same run (the best of five
half-second runs; fp32 on the CPU, bf16 on CUDA), FLOPs per token as nanoGPT
counts them (6N + 12·L·C·T).

usage: python bench/train_throughput.py [--preset baby|gpt2-124m] [--steps N] [--rounds R]
(an interpreter with torch and numpy; `make test` installs them into .venv;
LLMFLOW_BIN names the directory of the llmflow binaries when they are not
in $CARGO_TARGET_DIR/release)
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "baby": dict(n_layer=4, n_head=4, d_model=128, context=64, batch=12, vocab=0, device="cpu"),
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, context=1024, batch=16, vocab=50304, device="cuda"),
}
WARMUP = 10
TURN = 0.5  # seconds each side runs before the other's turn

PIPELINE = """[pipeline]
device = "{device}"

[stages.corpus]
kind = "download"
sources = [{{ url = "{root}/data/corpora/tinyshakespeare.txt", split = "paragraph" }}]

[stages.tok]
kind = "train_tokenizer"
input = "corpus"
vocab_size = 4096

[stages.tokens]
kind = "shard"
inputs = {{ docs = "corpus", tokenizer = "tok" }}

[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ arch = "gpt2", n_layer = {n_layer}, n_head = {n_head}, d_model = {d_model}, context = {context}, vocab_size = {vocab}, dropout = 0.0 }}
train = {{ steps = {steps}, batch_size = {batch}, lr = 1e-3, warmup = 10 }}
eval_every = 100000
checkpoint_every = 0
samples = {{ count = 0 }}
"""


def binary():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(os.environ.get("LLMFLOW_BIN", os.path.join(target, "release")), "llmflow")


class Llmflow:
    """The pipeline in a temporary directory; each round rebuilds `pretrain`."""

    def __init__(self, preset, steps, workdir):
        self.dir = workdir
        # A one-step run first, for the data stages and the model's config.
        self.write(preset, 1)
        self.run([])
        status = json.loads(subprocess.run([binary(), "status", "--json"], cwd=workdir, check=True,
                                           capture_output=True, text=True).stdout)
        out = {s["name"]: s["out"] for s in status["stages"]}
        self.config = json.load(open(os.path.join(out["pretrain"], "config.json")))
        self.shard = os.path.join(out["tokens"], "train_000000.bin")
        self.write(preset, steps)

    def write(self, preset, steps):
        with open(os.path.join(self.dir, "pipeline.toml"), "w") as f:
            f.write(PIPELINE.format(root=ROOT, steps=steps, **preset))

    def run(self, args):
        subprocess.run([binary(), "run", "--jobs", "1", *args], cwd=self.dir, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self):
        """Builds `pretrain` in the background; `result` reads its throughput."""
        return subprocess.Popen([binary(), "run", "--jobs", "1", "--force", "pretrain"], cwd=self.dir,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def result(self):
        status = json.loads(subprocess.run([binary(), "show", "pretrain", "--json"], cwd=self.dir, check=True,
                                           capture_output=True, text=True).stdout)
        rows = [json.loads(l) for l in open(os.path.join(status["out"], "metrics.jsonl"))]
        return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > WARMUP)


def signal_session(sid, sig):
    """Sends `sig` to every process of session `sid`: llmflow runs each stage
    in a process group of its own, so signalling one group is not enough."""
    for pid in os.listdir("/proc"):
        try:
            # Fields after the command name (which may hold spaces): state, ppid, pgrp, session.
            fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
            if int(fields[3]) == sid:
                os.kill(int(pid), sig)
        except (OSError, ValueError, IndexError):
            pass  # not a process, or gone


def take_turns(procs):
    """Runs the processes (each the leader of its own session) one at a time,
    TURN seconds each, until all have exited; returns their exit codes."""
    for p in procs[1:]:
        signal_session(p.pid, signal.SIGSTOP)
    turn = 0
    while any(p.poll() is None for p in procs):
        current = procs[turn % len(procs)]
        if current.poll() is None:
            signal_session(current.pid, signal.SIGCONT)
            try:
                current.wait(TURN)
            except subprocess.TimeoutExpired:
                signal_session(current.pid, signal.SIGSTOP)
        turn += 1
    return [p.returncode for p in procs]


def reference(config_path, shard, steps, threads, batch, device):
    """The PyTorch side: prints its median tokens/s and FLOPs per token as JSON."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    config = json.load(open(config_path))
    header = np.fromfile(shard, dtype=np.int32, count=256)
    tokens = np.fromfile(shard, dtype=np.uint16, offset=256 * 4, count=int(header[2])).astype(np.int64)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cuda = device == "cuda"
    V, C, T, L, H = config["vocab_size"], config["d_model"], config["context"], config["n_layer"], config["n_head"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T_, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T_, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T_, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.register_buffer("pos", torch.arange(T), persistent=False)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(self.pos[:idx.shape[1]])
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, V).float(), targets.view(-1))

    model = GPT().to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, fused=cuda)
    data = torch.from_numpy(tokens)
    g = torch.Generator().manual_seed(0)
    rates = []
    for step in range(steps):
        started = time.perf_counter()
        starts = torch.randint(0, len(data) - T - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + T] for s in starts]).to(device)
        y = torch.stack([data[s + 1:s + T + 1] for s in starts]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()  # as llmflow reads each step's loss
        if step >= WARMUP:
            rates.append(batch * T / (time.perf_counter() - started))
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n != "wpe.weight")
    print(json.dumps({"tokens_per_s": statistics.median(rates), "flops_per_token": 6 * matmul_params + 12 * L * C * T}))


def matmul_peak(threads, device):
    """The best of five half-second runs of square matmuls: a peak, so the
    machine's slow moments do not lower it."""
    import torch
    torch.set_num_threads(threads)
    n, dtype = (1024, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        sync()
        k, started = 0, time.perf_counter()
        while time.perf_counter() - started < 0.5:
            a @ b
            k += 1
        sync()
        best = max(best, 2 * n ** 3 * k / (time.perf_counter() - started))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=PRESETS, default="baby")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reference", nargs=2, metavar=("CONFIG", "SHARD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    threads = os.cpu_count()
    if args.reference:
        return reference(*args.reference, args.steps, threads, preset["batch"], preset["device"])

    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as d:
        side = Llmflow(preset, args.steps, d)
        config_path = os.path.join(d, "config.json")
        with open(config_path, "w") as f:
            json.dump(side.config, f)
        for i in range(args.rounds):
            with tempfile.TemporaryFile("w+") as out:
                reference_side = subprocess.Popen(
                    [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                     "--reference", config_path, side.shard],
                    stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
                codes = take_turns([side.start(), reference_side])
                if any(codes):
                    sys.exit(f"a side failed (exit codes {codes})")
                out.seek(0)
                ref = json.loads(out.read().strip().splitlines()[-1])
            ours.append(side.result())
            theirs.append(ref["tokens_per_s"])
            print(f"round {i + 1}: llmflow {ours[-1]:,.0f} tokens/s, PyTorch {theirs[-1]:,.0f} tokens/s, "
                  f"ratio {ours[-1] / theirs[-1]:.2f}", file=sys.stderr)
        config = side.config
    flops_per_token = ref["flops_per_token"]
    peak = matmul_peak(threads, preset["device"])
    ratios = [a / b for a, b in zip(ours, theirs)]
    p = preset
    print(f"{args.preset}: {p['n_layer']} layers, {p['n_head']} heads, d_model {p['d_model']}, context {p['context']}, "
          f"batch {p['batch']}, vocab {config['vocab_size']}, {p['device']}, "
          f"{'fp32' if p['device'] == 'cpu' else 'bf16'}, {threads} threads; {flops_per_token / 1e6:.2f} MFLOP/token; "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s; {args.rounds} rounds, the sides taking turns")
    print("| implementation | tokens/s | GFLOP/s | MFU |")
    print("|---|---|---|---|")
    for name, rates in [("llmflow `pretrain` (Rust, tch)", ours), ("PyTorch reference (Python, eager)", theirs)]:
        rate = statistics.median(rates)
        print(f"| {name} | {rate:,.0f} | {rate * flops_per_token / 1e9:.1f} | {rate * flops_per_token / peak:.1%} |")
    print(f"| llmflow / PyTorch | {statistics.median(ours) / statistics.median(theirs):.2f}x "
          f"(rounds {min(ratios):.2f}–{max(ratios):.2f}) | | |")


if __name__ == "__main__":
    sys.exit(main())
