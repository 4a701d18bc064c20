#!/usr/bin/env bash
# llmflow's `eval` stage against lm-evaluation-harness (lm_eval 0.4, HF
# backend) on the same exported model, the same tasks and the same items, in
# one run: a markdown table of examples/s on both sides, their ratio and each
# shared metric's value on both sides. Goal: llmflow >= 3x lm-eval's
# throughput with every metric equal within 1e-3.
#
# usage: bench/eval.sh
#   BIN_DIR       llmflow's binaries (default: $CARGO_TARGET_DIR/release or target/release)
#   VENV          Python environment for lm-eval (default: ~/.cache/llmflow/venv;
#                 needs torch and transformers; lm_eval[hf] is installed if missing)
#   BENCH_OUT     working directory (default: bench/out/eval)
#   PIPELINE      the pipeline whose model is scored (default: pipeline.toml)
#   MODEL_STAGE   its model stage (default: pretrain)
#   EVAL_DATA     the task files (default: data/eval)
#   LIMIT         items per task (default: 200; COPA and the WinoGrande sample whole)
#   BATCH_SIZES   lm-eval batch sizes, each tried on the first 20 items of every task;
#                 the fastest scores the run (default: 1,16,64)
#   REPEAT        rounds, each running both sides; each task's fastest is kept (default: 2)
#   IDLE_LOAD     if set (e.g. 0.5), first wait, up to IDLE_WAIT seconds (default
#                 900), for the 1-minute load average to fall below it (other jobs
#                 on the cores skew the timings)
#   NICE          if set (e.g. -10, as root), both sides run at that niceness, ahead
#                 of other jobs on a shared machine
#
# Both sides run on the CPU in fp32 with one thread per core: lm-eval with
# torch.set_num_threads(nproc), llmflow with the pipeline's threads (every
# core). Per-task times exclude loading the model on both sides.
#
# Steps: `llmflow run MODEL_STAGE` (a cache hit when built) and `llmflow
# export` to a Hugging Face folder; a bench pipeline (OUT/pipeline.toml: the
# stages the model needs, copied from PIPELINE onto the same store, plus a
# `bench_eval_TASK` eval stage per task); bench/lm_eval_run.py scoring the
# export with lm-eval's tasks (bench/lm_eval_tasks/*.yaml: JSON files through
# `dataset_path: json`, offline) and running llmflow's stage of each task
# just before; bench/eval_bench.py printing the table (also written to
# OUT/table.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}
venv=${VENV:-$HOME/.cache/llmflow/venv}
out=${BENCH_OUT:-bench/out/eval}
pipeline=${PIPELINE:-pipeline.toml}
model_stage=${MODEL_STAGE:-pretrain}
data=${EVAL_DATA:-data/eval}
limit=${LIMIT:-200}
batch_sizes=${BATCH_SIZES:-1,16,64}
repeat=${REPEAT:-2}
nice=${NICE:+nice -n $NICE}
threads=$(nproc)
llmflow=$bin/llmflow
LM_EVAL_VERSION=0.4.13

[ -x "$llmflow" ] || { echo "eval.sh: no $llmflow (set BIN_DIR)" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Offline, on the CPU, quiet.
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export CUDA_VISIBLE_DEVICES= TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore

if ! "$venv/bin/python" -c 'import lm_eval, accelerate' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  echo "eval.sh: installing lm_eval[hf]==$LM_EVAL_VERSION into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "lm_eval[hf]==$LM_EVAL_VERSION" tokenizers
fi

load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# The model, and its Hugging Face export.
"$llmflow" run -f "$pipeline" "$model_stage" >&2
rm -rf "$out/model"
"$llmflow" export -f "$pipeline" "$model_stage" --out "$out/model" >&2

# The task types this llmflow knows: the error a made-up one gets lists them.
mkdir -p "$out/probe"
cat >"$out/probe/pipeline.toml" <<EOF
[pipeline]
name = "probe"
artifacts = "artifacts"
[stages.model]
kind = "command"
cmd = "true"
[stages.probe]
kind = "eval"
inputs = { model = "model" }
tasks = [{ name = "probe", type = "no-such-type", file = "none" }]
EOF
"$llmflow" status -f "$out/probe/pipeline.toml" >"$out/kinds.txt" 2>&1 || true

# The bench pipeline and lm-eval's task files.
lm_tasks=$("$venv/bin/python" bench/eval_bench.py prepare "$out" "$pipeline" "$data" "$model_stage" "$limit" "$out/kinds.txt")

# REPEAT rounds; in each, every task is scored by llmflow (its stage
# bench_eval_TASK) and then at once by lm-eval, so that both sides of a row
# see the same moment of the machine. lm-eval runs in one process (the model
# loaded once) that runs llmflow's stages in turn; it changes the stages'
# seed each round (no zero-shot score uses it), so that each round scores
# afresh instead of reading eval's per-task cache. The table takes each
# task's fastest round on each side.
wait_idle() {
  # IDLE_LOAD: wait (up to IDLE_WAIT seconds) for the 1-minute load average to fall below it.
  [ -n "${IDLE_LOAD:-}" ] || return 0
  for _ in $(seq $((${IDLE_WAIT:-900} / 10))); do
    awk -v max="$IDLE_LOAD" '{ exit !($1 < max) }' /proc/loadavg && return 0
    sleep 10
  done
  echo "eval.sh: the machine stayed busy (load $(cut -d' ' -f1 /proc/loadavg)); timing anyway" >&2
}
rm -rf "$out"/llmflow.* "$out"/lm_eval.*
wait_idle
$nice "$venv/bin/python" bench/lm_eval_run.py --model "$out/model" --include "$out/lm_eval_tasks" \
  --tasks "$lm_tasks" --batch-sizes "$batch_sizes" --threads "$threads" --rounds "$repeat" \
  --llmflow "$llmflow" --pipeline "$out/pipeline.toml" --llmflow-out "$out" \
  --out "$out/lm_eval.json" 2>"$out/lm_eval.log" || { tail -40 "$out/lm_eval.log" >&2; exit 1; }
grep -E '^(lm-eval|llmflow) (round|sweep)' "$out/lm_eval.log" >&2 || true

{
  echo "$threads cores; load average (1, 5, 15 min) before the runs: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg) (other jobs on the cores skew the timings)."
  python3 bench/eval_bench.py table "$out"
} | tee "$out/table.md"
