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
same precision, AdamW, torch.compile off, and real token windows. Throughput
is the median over steps after a warm-up; MFU is against the matmul peak
measured in the same run (fp32 on the CPU, bf16 on CUDA).

usage: python bench/train_throughput.py [--preset baby|gpt2-124m] [--steps N]
(an interpreter with torch and numpy; `make test` installs them into .venv;
LLMFLOW_BIN names the directory of the llmflow binaries when they are not
in $CARGO_TARGET_DIR/release)
"""
import argparse
import json
import math
import os
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


def llmflow_side(preset, steps):
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    llmflow = os.path.join(os.environ.get("LLMFLOW_BIN", os.path.join(target, "release")), "llmflow")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pipeline.toml"), "w") as f:
            f.write(PIPELINE.format(root=ROOT, steps=steps, **preset))
        subprocess.run([llmflow, "run", "--jobs", "1"], cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        status = json.loads(subprocess.run([llmflow, "status", "--json"], cwd=d, check=True, capture_output=True, text=True).stdout)
        out = {s["name"]: s["out"] for s in status["stages"]}
        rows = [json.loads(l) for l in open(os.path.join(out["pretrain"], "metrics.jsonl"))]
        rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > WARMUP]
        config = json.load(open(os.path.join(out["pretrain"], "config.json")))
        train = read_shard(os.path.join(out["tokens"], "train_000000.bin"))
        return statistics.median(rates), config, train


def read_shard(path):
    import numpy as np
    header = np.fromfile(path, dtype=np.int32, count=256)
    return np.fromfile(path, dtype=np.uint16, offset=256 * 4, count=int(header[2])).astype(np.int64)


def torch_side(config, tokens, steps, threads, batch, device):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

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
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-3, fused=cuda)
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
    flops_per_token = 6 * matmul_params + 12 * L * C * T
    return statistics.median(rates), flops_per_token


def matmul_peak(threads, device):
    import torch
    torch.set_num_threads(threads)
    cuda = device == "cuda"
    size = 8192 if cuda else 1024
    kind = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=kind) for _ in range(2))
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2.0:
        a @ b
        n += 1
        if cuda:
            torch.cuda.synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - started)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=PRESETS, default="baby")
    ap.add_argument("--steps", type=int, default=110)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    device = preset["device"]
    threads = os.cpu_count()
    ours, config, tokens = llmflow_side(preset, args.steps)
    theirs, flops_per_token = torch_side(config, tokens, args.steps, threads, preset["batch"], device)
    peak = matmul_peak(threads, device)
    rows = [
        ("llmflow `pretrain` (Rust, tch)", ours),
        ("PyTorch reference (Python, eager)", theirs),
    ]
    precision = "bf16 autocast" if device == "cuda" else "fp32"
    print(f"{args.preset}: {config['n_layer']} layers, {config['n_head']} heads, d_model {config['d_model']}, "
          f"context {config['context']}, batch {preset['batch']}, vocab {config['vocab_size']}, {device}, {precision}, "
          f"{threads} threads; {flops_per_token / 1e6:.2f} MFLOP/token; measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("| implementation | tokens/s | GFLOP/s | MFU |")
    print("|---|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate * flops_per_token / 1e9:.1f} | {rate * flops_per_token / peak:.1%} |")
    print(f"| llmflow / PyTorch | {ours / theirs:.2f}x | | |")


if __name__ == "__main__":
    sys.exit(main())
