#!/bin/sh
# Tokenizer benchmarks on the 4 MB Austen corpus, one run each:
#  - `train_tokenizer`: training time and MB/s (default params, vocabulary 4096);
#  - `shard` encoding vs Python `tokenizers` `encode_batch` with the same
#    tokenizer.json, corpus and thread count (BENCH_THREADS, default: all cores).
# Python comes from LLMFLOW_PYTHON (default python3) and needs `tokenizers`.
# Needs LIBTORCH and, optionally, CARGO_TARGET_DIR as for any build.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -q --workspace --bench data -- tokenizer encode
