"""Muon against torch.optim.Muon: llmflow's steps of each matrix (square,
wide, tall) on the same weights and gradients, and its Newton–Schulz
iteration against torch's.

Usage: check_muon.py TENSORS.safetensors SETTINGS.json
"""

import json
import sys

import torch
from safetensors.torch import load_file
from torch.optim._muon import _zeropower_via_newtonschulz

tensors = load_file(sys.argv[1])
settings = json.load(open(sys.argv[2]))
TOLERANCE = 1e-5


def relative(ours, theirs):
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


worst = 0.0
for name in settings["matrices"]:
    u = tensors[f"{name}.u"]
    ns = _zeropower_via_newtonschulz(u, (3.4445, -4.7750, 2.0315), settings["ns_steps"], 1e-7).float()
    err = relative(tensors[f"{name}.ns"], ns)
    assert err <= TOLERANCE, f"{name}: Newton–Schulz differs by {err:.2e} (relative)"
    worst = max(worst, err)

    w = torch.nn.Parameter(tensors[f"{name}.w0"].clone())
    opt = torch.optim.Muon(
        [w],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        momentum=settings["momentum"],
        nesterov=settings["nesterov"],
        ns_steps=settings["ns_steps"],
        adjust_lr_fn=settings["adjust_lr"],
    )
    for step in range(1, settings["steps"] + 1):
        before = w.detach().clone()
        w.grad = tensors[f"{name}.g{step}"].clone()
        opt.step()
        ours = tensors[f"{name}.w{step}"]
        theirs = w.detach()
        err = relative(ours - before, theirs - before)
        assert err <= TOLERANCE, f"{name}, step {step}: the update differs by {err:.2e} (relative)"
        worst = max(worst, err)
        w.data.copy_(ours)  # the next step from the same weights
print(f"Muon equals torch.optim.Muon {torch.__version__} within {worst:.1e} (relative; tolerance {TOLERANCE:.0e})")
