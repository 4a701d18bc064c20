"""Checks that Python `tokenizers` loads a tokenizer.json and gives the ids llmflow gave.

usage: check_tokenizer.py TOKENIZER_JSON CASES_JSON
CASES_JSON is a list of {"text": ..., "ids": [...]}; exits 1 on the first mismatch.
"""
import json, sys
from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file(sys.argv[1])
cases = json.load(open(sys.argv[2]))
encodings = tokenizer.encode_batch([c["text"] for c in cases], add_special_tokens=False)
for i, (case, encoding) in enumerate(zip(cases, encodings)):
    if encoding.ids != case["ids"]:
        at = next((j for j, (a, b) in enumerate(zip(encoding.ids, case["ids"])) if a != b), None)
        sys.exit(f"case {i}: ids differ at token {at}: python {encoding.ids[:20]}… llmflow {case['ids'][:20]}…")
    if tokenizer.decode(encoding.ids, skip_special_tokens=False) != case["text"]:
        sys.exit(f"case {i}: python decodes to different text")
print(f"{len(cases)} texts: identical ids")
