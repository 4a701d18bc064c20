"""Encode throughput of Python `tokenizers` `encode_batch`, for comparison with the `shard` stage.

usage: encode_python.py TOKENIZER_JSON CORPUS_TXT THREADS
Documents are the corpus's blank-line-separated paragraphs, as in the Rust benchmark.
Prints `python_mb_per_s=<float>`.
"""
import os, sys, time

tokenizer_path, corpus_path, threads = sys.argv[1:]
os.environ["RAYON_NUM_THREADS"] = threads  # read when tokenizers starts its pool
from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file(tokenizer_path)
tokenizer.encode_special_tokens = True  # as the stage encodes documents
text = open(corpus_path, encoding="utf-8").read()
docs = [p for p in text.split("\n\n") if p.strip()]
size = sum(len(d.encode("utf-8")) for d in docs)
start = time.perf_counter()
ids = [e.ids for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
seconds = time.perf_counter() - start
print(f"python: {len(docs)} documents, {size / 1e6:.2f} MB, {sum(map(len, ids))} tokens in {seconds:.3f} s")
print(f"python_mb_per_s={size / 1e6 / seconds:.3f}")
