#!/usr/bin/env bash
# MinHash dedup throughput of llmflow and datatrove 0.10 on the same corpus,
# and the filter's throughput. Results: one JSON line per implementation.
#
# usage: bench/run.sh [REPEAT] [WORKERS]
#   REPEAT  rounds of planted copies in the corpus (default 1: ~18.6k documents)
#   WORKERS datatrove worker processes (default: number of cores)
# Installs datatrove into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=${1:-1}
workers=${2:-$(nproc)}
out=${BENCH_OUT:-target/bench}
mkdir -p "$out"

python3 bench/make_corpus.py "$out/corpus" "$repeat"
if ! .venv/bin/python -c 'import datatrove' 2>/dev/null; then
  python3 -m venv .venv
  # Its MinHash stages need these extras (the English word tokenizer is spaCy's).
  .venv/bin/pip install -q 'datatrove==0.10.1' regex tokenizers nltk spacy xxhash orjson
fi

export LLMFLOW_BENCH_CORPUS="$PWD/$out/corpus"
# --workspace, not -p: the same feature set as the workspace build, so the
# dependency cache is reused.
cargo test --release -q --workspace --lib bench_ -- --ignored --nocapture --test-threads 1 2>/dev/null | grep '^{' | tee "$out/llmflow.jsonl"
.venv/bin/python bench/datatrove_minhash.py "$out/corpus" "$out/datatrove" "$workers" 2>/dev/null | tee "$out/datatrove.jsonl"
