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
  # datatrove 0.10.1 hashes str, which xxhash 4 refuses ("Strings must be encoded before hashing").
  .venv/bin/pip install -q 'datatrove==0.10.1' regex tokenizers nltk spacy 'xxhash<4' orjson
fi

export LLMFLOW_BENCH_CORPUS="$PWD/$out/corpus"
# --workspace, not -p: the same feature set as the workspace build, so the
# dependency cache is reused.
cargo bench -q --workspace --bench data -- minhash filter 2>/dev/null | grep -o '{.*}' | tee "$out/llmflow.jsonl"
.venv/bin/python bench/datatrove_minhash.py "$out/corpus" "$out/datatrove" "$workers" 2>/dev/null | tee "$out/datatrove.jsonl"

# One table, side by side, with the ratio.
python3 - "$out/llmflow.jsonl" "$out/datatrove.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.strip()]
dedup = {r["impl"]: r for r in rows if r["impl"] in ("llmflow", "datatrove")}
print("| MinHash dedup | documents/s | MB/s | recall (J >= 0.85) | pairs J < 0.6 merged |")
print("|---|---|---|---|---|")
for name, r in dedup.items():
    print(f"| {name} | {r['docs_per_s']:.0f} | {r['mb_per_s']:.2f} | {r['recall_above_0.85']:.3f} | {r['merged_below_0.6']} |")
if len(dedup) == 2:
    print(f"| llmflow / datatrove | {dedup['llmflow']['docs_per_s'] / dedup['datatrove']['docs_per_s']:.1f}x | | | |")
print()
print("| filter params | MB/s | kept of documents |")
print("|---|---|---|")
for r in rows:
    if r["impl"] == "llmflow-filter":
        print(f"| {r['params']} | {r['mb_per_s']:.2f} | {r['kept']} of {r['documents']} |")
PY
