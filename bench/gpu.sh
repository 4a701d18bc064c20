#!/usr/bin/env bash
# What only a GPU can show, in one run on a machine with CUDA devices:
#   1. `make setup CUDA=1` and a build whose c10d shim has NCCL's process
#      group (stages/build.rs says so when it has not);
#   2. `llmflow-stage device`: libtorch loads CUDA and sees the devices;
#   3. NCCL's collectives against a reference, one rank a GPU
#      (dist::tests::nccl_collectives_agree_with_a_reference);
#   4. pretrain of GPT-2 124M under bf16 against PyTorch: tokens/s and MFU
#      (bench/train_throughput.py --preset gpt2-124m);
#   5. the default pipeline with device = "cuda", timed, and its report card.
# usage: bench/gpu.sh [STEPS]   (STEPS for step 4, default 40; honours
# CARGO_TARGET_DIR, LIBTORCH_DIR and VENV as the Makefile does)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-40}
export LIBTORCH_DIR="${LIBTORCH_DIR:-$PWD/.libtorch}" VENV="${VENV:-$PWD/.venv}"
export LIBTORCH="$LIBTORCH_DIR/torch"
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

echo "== 1. setup and build (CUDA=1)"
make setup build venv CUDA=1
echo "== 2. the devices libtorch sees"
devices=$("$bin/llmflow-stage" device)
echo "$devices"
[[ $devices == *"CUDA device(s)"* ]] || { echo "no CUDA device visible: nothing more to measure" >&2; exit 1; }
echo "== 3. NCCL's collectives"
nccl=$(cargo test --release --locked --workspace --lib nccl_collectives -- --nocapture 2>&1) || { tail -30 <<<"$nccl"; exit 1; }
grep -E "^test |NCCL|result" <<<"$nccl"
# A filter that matches nothing passes with "0 passed": that is a failure here.
grep -qE "test result: ok\. [1-9][0-9]* passed" <<<"$nccl" || { echo "no NCCL collectives test ran" >&2; exit 1; }
echo "== 4. GPT-2 124M, bf16: llmflow vs PyTorch"
"$VENV/bin/python" bench/train_throughput.py --preset gpt2-124m --steps "$steps" --rounds 1
echo "== 5. the default pipeline on CUDA"
work=$(mktemp -d)
trap 'rm -rf "$work" pipeline.cuda.toml' EXIT
sed -e 's|^device = "auto"|device = "cuda"|' -e "s|^artifacts = \"artifacts\"|artifacts = \"$work/artifacts\"|" pipeline.toml > pipeline.cuda.toml
start=$(date +%s)
"$bin/llmflow" -f pipeline.cuda.toml run
echo "default pipeline on CUDA: $(( $(date +%s) - start )) s"
for stage in $("$bin/llmflow" -f pipeline.cuda.toml status --json | "$VENV/bin/python" -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)["stages"] if s.get("kind") == "eval"))'); do
    "$bin/llmflow" -f pipeline.cuda.toml report "$stage"
done
