#!/usr/bin/env python3
"""Whether overlapping the gradient all-reduce with the backward pass pays on
this machine, measured with PyTorch's own DistributedDataParallel: 2 ranks ×
1 thread, Gloo over loopback, the GPT-2 models of `bench/ddp.py` (the same
shapes, batch split across the ranks), forward and backward plus the
gradient reduction of one step:

- backward only: no communication, what a step costs the ranks alone;
- one all-reduce after backward: the gradients are views of one flat
  buffer, all-reduced once when the backward pass ends (llmflow's way);
- DDP with 25 MB buckets: the gradients fit one bucket, which starts when
  the last gradient is ready;
- DDP with 1 MB and 0.5 MB buckets: each bucket is all-reduced while the
  backward pass computes the gradients of earlier layers (overlap);
- bf16 all-reduce after backward: the flat buffer cast to bf16, reduced and
  cast back (DDP's `bf16_compress_hook`), half the bytes on the wire.

The modes take turns, round by round; the table shows the median time of a
step on rank 0 and the ratio of "backward only" to each mode: the share of
the ranks' compute speed a mode keeps.

usage: $LLMFLOW_PYTHON bench/ddp_overlap.py [--steps N] [--rounds R]
(re-launches itself with torch.distributed.run on 2 processes)
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

PRESETS = {
    "default pipeline": dict(n_layer=4, n_head=4, d_model=128, context=128, batch=16, vocab=1024),
    "nanoGPT baby": dict(n_layer=4, n_head=4, d_model=128, context=64, batch=12, vocab=4096),
}


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in self.c_attn(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, d_model, context, vocab, **_):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d_model), nn.Embedding(context, d_model)
        self.h = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe.weight[: idx.shape[1]]
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def flat_grads(model):
    """One zeroed buffer whose views are the parameters' gradients."""
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    at = 0
    for p in model.parameters():
        p.grad = flat[at : at + p.numel()].view_as(p)
        at += p.numel()
    return flat


def modes(preset):
    """{mode: step function}, each training its own copy of one model."""
    torch.manual_seed(0)
    plain = GPT(**preset)
    flat = flat_grads(plain)
    half = torch.zeros(flat.numel(), dtype=torch.bfloat16)

    def after(reduce):
        def step(x, y):
            flat.zero_()
            plain(x, y).backward()
            reduce()

        return step

    def bf16():
        half.copy_(flat)
        dist.all_reduce(half)
        flat.copy_(half)

    def ddp(bucket_mb):
        model = DistributedDataParallel(GPT(**preset), bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)

        def step(x, y):
            model.zero_grad(set_to_none=False)
            model(x, y).backward()

        return step

    return {
        "backward only": after(lambda: None),
        "one all-reduce after backward": after(lambda: dist.all_reduce(flat)),
        "DDP, 25 MB buckets": ddp(25),
        "DDP, 1 MB buckets (overlapped)": ddp(1),
        "DDP, 0.5 MB buckets (overlapped)": ddp(0.5),
        "bf16 all-reduce after backward": after(bf16),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    if "RANK" not in os.environ:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__]
        os.execv(sys.executable, launch + sys.argv[1:])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    first = dist.get_rank() == 0
    if first:
        print(f"{os.cpu_count()} cores; 2 ranks x 1 thread, Gloo; {args.steps} steps a mode a round "
              f"(the first 5 not timed), {args.rounds} rounds, modes in turn\n")
        print("| model | gradients (MB) | mode | step ms | vs backward only |")
        print("|---|---|---|---|---|")
    for name, preset in PRESETS.items():
        steps = modes(preset)
        rows = preset["batch"] // dist.get_world_size()
        x = torch.randint(0, preset["vocab"], (rows, preset["context"]))
        y = torch.randint(0, preset["vocab"], (rows, preset["context"]))
        times = {mode: [] for mode in steps}
        for _ in range(args.rounds):
            for mode, step in steps.items():
                for i in range(args.steps):
                    dist.barrier()
                    started = time.perf_counter()
                    step(x, y)
                    if i >= 5:
                        times[mode].append(time.perf_counter() - started)
        if first:
            mb = 4e-6 * sum(p.numel() for p in GPT(**preset).parameters())
            base = statistics.median(times["backward only"])
            for mode, seconds in times.items():
                ms = statistics.median(seconds)
                print(f"| {name} | {mb:.2f} | {mode} | {1e3 * ms:.1f} | {base / ms:.2f}x |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
