"""Writes the arithmetic task of the default pipeline's RL stages: sums of
two numbers, as instruction records {"instruction": "23+45", "output": "68"},
split into training and held-out problems that never share a pair.

usage: python3 scripts/make_arithmetic.py [OUT_DIR] [--max N] [--test K] [--seed S]
Deterministic: the same arguments write the same files (data/rl/ is this
script's output with the defaults).
"""
import argparse, json, os, random

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "data", "rl"))
parser.add_argument("--max", type=int, default=99, help="largest addend")
parser.add_argument("--test", type=int, default=500, help="held-out problems")
parser.add_argument("--seed", type=int, default=1234)
args = parser.parse_args()

pairs = [(a, b) for a in range(args.max + 1) for b in range(args.max + 1)]
random.Random(args.seed).shuffle(pairs)
os.makedirs(args.out, exist_ok=True)
for name, part in [("arithmetic_test.jsonl", pairs[: args.test]), ("arithmetic_train.jsonl", pairs[args.test :])]:
    with open(os.path.join(args.out, name), "w") as f:
        for a, b in part:
            f.write(json.dumps({"instruction": f"{a}+{b}", "output": str(a + b)}) + "\n")
