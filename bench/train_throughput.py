#!/usr/bin/env python3
"""Training throughput of llmflow's `pretrain` against a PyTorch reference of
the same model and config, side by side in one run, plus MFU against this
machine's measured matmul peak.

Config: nanoGPT's CPU "baby GPT" — GPT-2 architecture, 4 layers, 4 heads,
d_model 128, context 64, batch 12, no dropout — with the vocabulary of the
tokenizer the pipeline trains (4096 tokens). Both sides use the same libtorch
(torch==2.13.0), the same thread count, fp32, AdamW, torch.compile off, and
real token windows. Throughput is the median over steps after a warm-up.

usage: .venv/bin/python bench/train_throughput.py [--steps N]
(an interpreter with torch and numpy; `make test` installs them into .venv)
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
N_LAYER, N_HEAD, D_MODEL, CONTEXT, BATCH = 4, 4, 128, 64, 12
WARMUP = 10

PIPELINE = f"""
[stages.corpus]
kind = "download"
sources = [{{ url = "{ROOT}/data/corpora/tinyshakespeare.txt", split = "paragraph" }}]

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
model = {{ arch = "gpt2", n_layer = {N_LAYER}, n_head = {N_HEAD}, d_model = {D_MODEL}, context = {CONTEXT}, dropout = 0.0 }}
train = {{ steps = STEPS, batch_size = {BATCH}, lr = 1e-3, warmup = 10 }}
eval_every = 100000
checkpoint_every = 0
samples = {{ count = 0 }}
"""


def llmflow_side(steps, threads):
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    llmflow = os.path.join(target, "release", "llmflow")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pipeline.toml"), "w") as f:
            f.write(PIPELINE.replace("STEPS", str(steps)))
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


def torch_side(config, tokens, steps, threads):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
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
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-3)
    data = torch.from_numpy(tokens)
    g = torch.Generator().manual_seed(0)
    rates = []
    for step in range(steps):
        started = time.perf_counter()
        starts = torch.randint(0, len(data) - T - 1, (BATCH,), generator=g)
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= WARMUP:
            rates.append(BATCH * T / (time.perf_counter() - started))
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n != "wpe.weight")
    flops_per_token = 6 * matmul_params + 12 * L * C * T
    return statistics.median(rates), flops_per_token


def matmul_peak(threads):
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2.0:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - started)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=110)
    args = ap.parse_args()
    threads = os.cpu_count()
    ours, config, tokens = llmflow_side(args.steps, threads)
    theirs, flops_per_token = torch_side(config, tokens, args.steps, threads)
    peak = matmul_peak(threads)
    rows = [
        ("llmflow `pretrain` (Rust, tch)", ours),
        ("PyTorch reference (Python, eager)", theirs),
    ]
    print(f"baby GPT: {N_LAYER} layers, {N_HEAD} heads, d_model {D_MODEL}, context {CONTEXT}, batch {BATCH}, "
          f"vocab {config['vocab_size']}, {threads} threads; {flops_per_token / 1e6:.2f} MFLOP/token; "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("| implementation | tokens/s | GFLOP/s | MFU |")
    print("|---|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate * flops_per_token / 1e9:.1f} | {rate * flops_per_token / peak:.1%} |")
    print(f"| llmflow / PyTorch | {ours / theirs:.2f}x | | |")


if __name__ == "__main__":
    sys.exit(main())
