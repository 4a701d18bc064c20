"""Writes the arithmetic task of the default pipeline's `arith_sft` and
`grpo` stages: sums of a number and a digit, as instruction records
{"instruction": "23+7", "output": "30"}, split into training and held-out
problems that never share a pair.

usage: python3 scripts/make_arithmetic.py [OUT_DIR] [--max-a N] [--max-b N] [--test K] [--seed S]
Deterministic: the same arguments write the same files (data/rl/ is this
script's output with the defaults).
"""
import argparse, json, os, random

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "data", "rl"))
parser.add_argument("--max-a", type=int, default=99, help="largest first addend")
parser.add_argument("--max-b", type=int, default=9, help="largest second addend")
parser.add_argument("--test", type=int, default=300, help="held-out problems")
parser.add_argument("--seed", type=int, default=1234)
args = parser.parse_args()

pairs = [(a, b) for a in range(args.max_a + 1) for b in range(args.max_b + 1)]
random.Random(args.seed).shuffle(pairs)
os.makedirs(args.out, exist_ok=True)
for name, part in [("arithmetic_test.jsonl", pairs[: args.test]), ("arithmetic_train.jsonl", pairs[args.test :])]:
    with open(os.path.join(args.out, name), "w") as f:
        for a, b in part:
            f.write(json.dumps({"instruction": f"{a}+{b}", "output": str(a + b)}) + "\n")
