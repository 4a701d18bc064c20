"""Checks that `transformers` loads an llmflow Hugging Face export and gives
the logits llmflow gave.

usage: check_export.py EXPORT_DIR CASE_JSON
CASE_JSON: {"ids": [[...]], "logits": [flat floats], "tolerance": t}; exits 1
when the largest absolute difference exceeds the tolerance.
"""
import json, sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
case = json.load(open(sys.argv[2]))
with torch.no_grad():
    logits = model(torch.tensor(case["ids"])).logits
ours = torch.tensor(case["logits"]).view_as(logits)
diff = (logits - ours).abs().max().item()
name = type(model).__name__
if diff > case["tolerance"]:
    sys.exit(f"{name}: logits differ by {diff:.3g} (tolerance {case['tolerance']})")
print(f"{name}: max |logit difference| {diff:.3g}")
