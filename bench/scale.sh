#!/usr/bin/env bash
# The data stages at corpus scale: a generated corpus of TOTAL_MB of text in
# FILE_MB JSONL files with planted duplicates (bench/make_scale_corpus.py)
# through download -> filter -> dedup -> shard, each stage under
# memory_mb = 1024. Prints per stage MB/s and peak resident memory (the
# stage process's VmHWM), dedup recall and precision on the planted pairs,
# the incremental rebuild after adding one more file of TOTAL_MB/10 against
# a full rebuild of the same files in a fresh store, and MinHash dedup
# against datatrove 0.10 on a slice (SLICE_MB of the same corpus, the same
# settings and worker count).
#
# usage: bench/scale.sh [TOTAL_MB] [FILE_MB] [SLICE_MB]   (default 2048 128 128)
# Needs the release binaries (cargo build --release --workspace), pyarrow in
# $LLMFLOW_PYTHON, and datatrove in .venv (bench/run.sh installs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
out=${BENCH_OUT:-$root/target/bench-scale}
total=${1:-2048} file=${2:-128} slice=${3:-128}
py=${LLMFLOW_PYTHON:-python3}
workers=$(nproc)
mkdir -p "$out"

if [ ! -f "$out/corpus/done" ]; then
  half=$((total / 2 / file))
  python3 "$root/bench/make_scale_corpus.py" "$out/corpus" $((half * file)) "$file" 0 &
  python3 "$root/bench/make_scale_corpus.py" "$out/corpus" $(((total / file - half) * file)) "$file" "$half" &
  python3 "$root/bench/make_scale_corpus.py" "$out/extra" $((total / 10)) $((total / 10)) 900 &
  wait
  touch "$out/corpus/done"
fi

pipeline() {  # DIR: a project reading DIR/raw/*.jsonl
  mkdir -p "$1/raw"
  cat > "$1/pipeline.toml" <<TOML
[stages.corpus]
kind = "download"
sources = [{ url = "raw/*.jsonl" }]

[stages.clean]
kind = "filter"
input = "corpus"
min_chars = 20
language = { enabled = false }
gopher_quality = { min_words = 3, min_stop_words = 1, min_alpha_words_ratio = 0.5 }
c4 = { enabled = false }
fineweb = { enabled = false }

[stages.dedup]
kind = "dedup"
input = "clean"

[stages.vocab]
kind = "download"
sources = [{ url = "$root/data/corpora/tinyshakespeare.txt", split = "paragraph" }]

[stages.tok]
kind = "train_tokenizer"
input = "vocab"
vocab_size = 4096

[stages.tokens]
kind = "shard"
inputs = { docs = "dedup", tokenizer = "tok" }
TOML
}

link_corpus() {  # DIR [extra]
  ln -sf "$out"/corpus/[0-9]*.jsonl "$1/raw/"
  if [ "${2:-}" = extra ]; then ln -sf "$out"/extra/[0-9]*.jsonl "$1/raw/"; fi
}

seconds() { date +%s.%N; }

rm -rf "$out/inc" "$out/full"
pipeline "$out/inc" && link_corpus "$out/inc"
pipeline "$out/full" && link_corpus "$out/full" extra
(cd "$out/inc" && "$bin/llmflow" run tokens >/dev/null 2>&1)
cp "$out/inc/pipeline.toml" "$out/first-run.toml"
# The first run's manifests, before the incremental run replaces the artifacts.
"$py" - "$out/inc" > "$out/first.json" <<'PY'
import json, sys
from pathlib import Path
store = Path(sys.argv[1]) / "artifacts"
rows = {}
for stage in ["corpus", "clean", "dedup", "tokens"]:
    [m] = [json.loads(p.read_text()) for p in store.glob(f"{stage}/*/manifest.json")]
    rows[stage] = {"metrics": m["metrics"], "seconds": m["duration_s"]}
print(json.dumps(rows))
PY
link_corpus "$out/inc" extra
start=$(seconds); (cd "$out/inc" && "$bin/llmflow" run tokens >/dev/null 2>&1); inc=$(echo "$(seconds) - $start" | bc)
start=$(seconds); (cd "$out/full" && "$bin/llmflow" run tokens >/dev/null 2>&1); full=$(echo "$(seconds) - $start" | bc)

# datatrove and llmflow's dedup on the same slice.
mkdir -p "$out/slice"
"$py" - "$out/corpus/000.jsonl" "$slice" "$out/slice" <<'PY'
import json, sys
src, mb, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
size, docs = 0, []
for line in open(src):
    docs.append(json.loads(line)["text"]); size += len(docs[-1])
    if size >= mb << 20: break
with open(f"{out}/corpus.jsonl", "w") as f:
    for i, t in enumerate(docs): f.write(json.dumps({"id": str(i), "text": t}) + "\n")
open(f"{out}/truth.jsonl", "w").write(json.dumps({"a": 0, "b": 0, "jaccard": 1.0}) + "\n")
PY
"$root/.venv/bin/python" "$root/bench/datatrove_minhash.py" "$out/slice" "$out/datatrove" "$workers" 2>/dev/null > "$out/datatrove.json"
rm -rf "$out/slice-llmflow" && mkdir -p "$out/slice-llmflow/raw" && ln -sf "$out/slice/corpus.jsonl" "$out/slice-llmflow/raw/"
printf '[stages.corpus]\nkind = "download"\nsources = [{ url = "raw/corpus.jsonl" }]\n\n[stages.dedup]\nkind = "dedup"\ninput = "corpus"\n' > "$out/slice-llmflow/pipeline.toml"
(cd "$out/slice-llmflow" && "$bin/llmflow" run >/dev/null 2>&1)

"$py" - "$out" "$inc" "$full" "$total" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
out, inc, full, total = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
first = json.loads((out / "first.json").read_text())
text = first["corpus"]["metrics"]["text_bytes"] / 1e6
print(f"Corpus: {text:.0f} MB of text, {first['corpus']['metrics']['documents']} documents in {first['corpus']['metrics']['files']} files; memory_mb = 1024 (default)\n")
print("| stage | input MB | seconds | MB/s | peak RSS (VmHWM) MB |")
print("|---|---|---|---|---|")
# Each stage's input text, estimated from document counts after the filter.
kept = first["clean"]["metrics"]["documents_out"] / first["clean"]["metrics"]["documents_in"]
inputs = {"corpus": first["corpus"]["metrics"]["bytes_fetched"] / 1e6, "clean": text, "dedup": text * kept,
          "tokens": text * first["dedup"]["metrics"]["documents_out"] / first["corpus"]["metrics"]["documents"]}
for stage in ["corpus", "clean", "dedup", "tokens"]:
    m, s = first[stage]["metrics"], first[stage]["seconds"]
    mb = inputs[stage]
    print(f"| {stage} | {mb:.0f} | {s:.1f} | {mb / s:.1f} | {m['peak_rss_mb']:.0f} |")
# Recall and precision on the planted pairs (full store: every file).
store = out / "full" / "artifacts"
[dedup] = list(store.glob("dedup/*/out"))
cluster = {}
for f in sorted((dedup / "clusters").glob("*.parquet")):
    t = pq.read_table(f, columns=["id", "cluster"]).to_pydict()
    cluster.update(zip(t["id"], t["cluster"]))
truth = [json.loads(l) for p in sorted((out / "corpus").glob("truth-*.jsonl")) for l in open(p)]
truth = [t for t in truth if t["a"] in cluster and t["b"] in cluster]
high = [t for t in truth if t["jaccard"] >= 0.85]
low = [t for t in truth if t["jaccard"] < 0.6]
found = sum(cluster[t["a"]] == cluster[t["b"]] for t in high)
merged_low = sum(cluster[t["a"]] == cluster[t["b"]] for t in low)
merged = sum(1 for i, c in cluster.items() if c != i)
print(f"\nDedup on the planted pairs: recall {found / len(high):.4f} ({found} of {len(high)} pairs with Jaccard >= 0.85), "
      f"{merged_low} of {len(low)} pairs below 0.6 merged; {merged} documents removed in all.")
print(f"\nIncremental: one more file of {int(total) // 10} MB; rebuilding download, filter, dedup and shard took {inc:.1f} s, "
      f"a full rebuild of the same files in a fresh store {full:.1f} s: {100 * inc / full:.0f}%.")
dt = json.loads((out / "datatrove.json").read_text())
[ours] = [json.loads(p.read_text()) for p in (out / "slice-llmflow" / "artifacts").glob("dedup/*/manifest.json")]
ours_s = ours["duration_s"]
n = dt["documents"]
print(f"\nMinHash dedup on a {dt['mb_per_s'] * dt['seconds']:.0f} MB slice ({n} documents), same settings (5-grams, 14 x 8), {__import__('os').cpu_count()} workers:\n")
print("| | seconds | documents/s | MB/s |")
print("|---|---|---|---|")
print(f"| datatrove 0.10.1 (4 steps) | {dt['seconds']:.1f} | {n / dt['seconds']:.0f} | {dt['mb_per_s']:.2f} |")
print(f"| llmflow dedup stage | {ours_s:.1f} | {n / ours_s:.0f} | {dt['mb_per_s'] * dt['seconds'] / ours_s:.2f} |")
print(f"| llmflow / datatrove | {dt['seconds'] / ours_s:.1f}x | | |")
PY
