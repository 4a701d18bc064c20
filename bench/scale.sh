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
# STEPS (default "build compare"): `build` runs the pipeline on the corpus,
# then the incremental and the full rebuild; `compare` the two dedups on the
# slice. A corpus already generated under BENCH_OUT is reused.
# Needs the release binaries (cargo build --release --workspace), pyarrow in
# $LLMFLOW_PYTHON, and datatrove in .venv (bench/run.sh installs it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
out=${BENCH_OUT:-$root/target/bench-scale}
total=${1:-2048} file=${2:-128} slice=${3:-128}
py=${LLMFLOW_PYTHON:-python3}
workers=$(nproc)
steps=${STEPS:-build compare}
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

if [[ " $steps " == *" build "* ]]; then
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
# Per stage: the full rebuild (fresh store, 17 files) against the incremental one.
def newest(store, stage):
    found = sorted(store.glob(f"{stage}/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())
print("\n| stage | full rebuild, 17 files: seconds | peak RSS MB | incremental (17th file added): seconds | peak RSS MB | units cached | output digest equal |")
print("|---|---|---|---|---|---|---|")
sums = [0.0, 0.0]
for stage in ["corpus", "clean", "dedup", "tokens"]:
    f, i = newest(out / "full" / "artifacts", stage), newest(out / "inc" / "artifacts", stage)
    m = i["metrics"]
    units = len(list((out / "inc" / "artifacts").glob(f"{stage}/{i['key']}/out/units/*.json")))
    sums[0] += f["duration_s"]; sums[1] += i["duration_s"]
    print(f"| {stage} | {f['duration_s']:.1f} | {f['metrics']['peak_rss_mb']:.0f} | {i['duration_s']:.1f} | {m['peak_rss_mb']:.0f} "
          f"| {m.get('files_cached', m.get('parts_cached'))} of {units} | {f['output_digest'] == i['output_digest']} |")
print(f"| all four | {sums[0]:.1f} | | {sums[1]:.1f} ({100 * sums[1] / sums[0]:.0f}%) | | | |")
PY
fi

if [[ " $steps " == *" compare "* ]]; then
# datatrove and llmflow's dedup on the same slice: the first SLICE_MB of
# text of file 000 and its planted pairs, documents numbered by line.
mkdir -p "$out/slice"
"$py" - "$out/corpus" "$slice" "$out/slice" <<'PY'
import json, sys
src, mb, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
size, docs = 0, []
for line in open(f"{src}/000.jsonl"):
    docs.append(json.loads(line)["text"]); size += len(docs[-1])
    if size >= mb << 20: break
with open(f"{out}/corpus.jsonl", "w") as f:
    for i, t in enumerate(docs): f.write(json.dumps({"id": str(i), "text": t}) + "\n")
with open(f"{out}/truth.jsonl", "w") as f:
    for line in open(f"{src}/truth-000.jsonl"):
        t = json.loads(line)
        a, b = (int(t[k].split("#")[1]) for k in "ab")
        if t["a"].startswith("raw/000.jsonl#") and t["b"].startswith("raw/000.jsonl#") and b < len(docs):
            f.write(json.dumps({"a": a, "b": b, "jaccard": t["jaccard"]}) + "\n")
PY
"$root/.venv/bin/python" "$root/bench/datatrove_minhash.py" "$out/slice" "$out/datatrove" "$workers" 2>/dev/null > "$out/datatrove.json"
rm -rf "$out/slice-llmflow" && mkdir -p "$out/slice-llmflow/raw" && ln -sf "$out/slice/corpus.jsonl" "$out/slice-llmflow/raw/"
printf '[stages.corpus]\nkind = "download"\nsources = [{ url = "raw/corpus.jsonl" }]\n\n[stages.dedup]\nkind = "dedup"\ninput = "corpus"\n' > "$out/slice-llmflow/pipeline.toml"
(cd "$out/slice-llmflow" && "$bin/llmflow" run >/dev/null 2>&1)
"$py" - "$out" "$workers" <<'PY'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
out, workers = Path(sys.argv[1]), int(sys.argv[2])
dt = json.loads((out / "datatrove.json").read_text())
[manifest] = [json.loads(p.read_text()) for p in (out / "slice-llmflow" / "artifacts").glob("dedup/*/manifest.json")]
[clusters] = list((out / "slice-llmflow" / "artifacts").glob("dedup/*/out/clusters"))
cluster = {}
for f in sorted(clusters.glob("*.parquet")):
    t = pq.read_table(f, columns=["id", "cluster"]).to_pydict()
    cluster.update((int(i.split("#")[1]), c) for i, c in zip(t["id"], t["cluster"]))
truth = [json.loads(l) for l in open(out / "slice" / "truth.jsonl")]
high = [t for t in truth if t["jaccard"] >= 0.85]
low = [t for t in truth if t["jaccard"] < 0.6]
found = sum(cluster[t["a"]] == cluster[t["b"]] for t in high)
merged_low = sum(cluster[t["a"]] == cluster[t["b"]] for t in low)
n, mb, ours = dt["documents"], dt["mb_per_s"] * dt["seconds"], manifest["duration_s"]
print(f"MinHash dedup on a {mb:.0f} MB slice ({n} documents, {len(high)} planted pairs with Jaccard >= 0.85, {len(low)} below 0.6), "
      f"same settings (5-grams, 14 x 8, 64-bit hashes), {workers} workers:\n")
print("| | seconds | documents/s | documents/s per core | MB/s | recall (>= 0.85) | pairs < 0.6 merged |")
print("|---|---|---|---|---|---|---|")
print(f"| datatrove 0.10.1 (4 steps) | {dt['seconds']:.1f} | {n / dt['seconds']:.0f} | {n / dt['seconds'] / workers:.0f} | {mb / dt['seconds']:.2f} "
      f"| {dt['recall_above_0.85']:.4f} | {dt['merged_below_0.6']} of {len(low)} |")
print(f"| llmflow dedup stage | {ours:.1f} | {n / ours:.0f} | {n / ours / workers:.0f} | {mb / ours:.2f} "
      f"| {found / len(high):.4f} | {merged_low} of {len(low)} |")
print(f"| llmflow / datatrove | {dt['seconds'] / ours:.1f}x | | | | | |")
PY
fi
