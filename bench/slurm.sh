#!/usr/bin/env bash
# What running each stage as a Slurm job costs against running it locally:
# the same pipeline built from an empty store by `llmflow run` with
# `executor = "local"` and with `executor = "slurm"` on a throw-away
# single-node cluster on this machine (scripts/slurm-local.sh, as the tests
# use; needs root). Two pipelines: a chain of 8 `command` stages that do
# nothing (pure overhead: each waits for the one before), and the tests' tiny
# training pipeline (a local corpus file → tokenizer → shards → 8 pretraining
# steps). Prints the median of REPEATS builds of each side.
#
# Usage: bench/slurm.sh [REPEATS]    (default 3; the binaries must be built: make build)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin="${CARGO_TARGET_DIR:-$HOME/.cache/llmflow/target}/release/llmflow"
[ -x "$bin" ] || { echo "no $bin: run make build first" >&2; exit 1; }
repeats=${1:-3}

up=$(scripts/slurm-local.sh up --owner $$)
export SLURM_CONF=${up#SLURM_CONF=}
trap 'scripts/slurm-local.sh down "$(dirname "$SLURM_CONF")"' EXIT

chain() {
	echo '[stages.s1]'
	echo 'kind = "command"'
	echo 'cmd = "echo 1 > {out}/n"'
	for i in 2 3 4 5 6 7 8; do
		printf '\n[stages.s%d]\nkind = "command"\ninput = "s%d"\n' "$i" $((i - 1))
		echo "cmd = \"cat {inputs.input}/n > {out}/n && echo $i >> {out}/n\""
	done
}

training() {
	cat <<'EOF'
[stages.corpus]
kind = "download"
sources = [{ url = "corpus.txt", split = "paragraph" }]

[stages.tok]
kind = "train_tokenizer"
input = "corpus"
vocab_size = 512

[stages.tokens]
kind = "shard"
inputs = { docs = "corpus", tokenizer = "tok" }

[stages.pretrain]
kind = "pretrain"
inputs = { data = "tokens", tokenizer = "tok" }
model = { n_layer = 2, n_head = 2, d_model = 32, context = 32, dropout = 0.0 }
train = { steps = 8, batch_size = 4, lr = 3e-3, warmup = 2 }
eval_every = 4
eval_batches = 2
checkpoint_every = 4
samples = { count = 1, max_tokens = 8 }
EOF
}

# Seconds one `llmflow run` of pipeline $1 takes on an empty store with executor $2.
build() {
	local dir
	dir=$(mktemp -d)
	{ printf '[pipeline]\nexecutor = "%s"\n\n' "$2"; $1; } >"$dir/pipeline.toml"
	head -c 60000 "$root/data/corpora/tinyshakespeare.txt" >"$dir/corpus.txt"
	# Load once (resolving params starts the stage runner), so only building is timed.
	(cd "$dir" && "$bin" status >/dev/null)
	local start end
	start=$(date +%s.%N)
	(cd "$dir" && "$bin" run >"$dir/run.log" 2>&1) || { cat "$dir/run.log" >&2; exit 1; }
	end=$(date +%s.%N)
	rm -rf "$dir"
	echo "$end - $start" | bc -l
}

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

printf '| pipeline | stages | local, s | Slurm, s | local per stage, s | Slurm per stage, s | Slurm overhead per stage, s | Slurm / local |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for pipeline in chain training; do
	stages=$($pipeline | grep -c '^\[stages\.')
	local_times=() slurm_times=()
	for _ in $(seq "$repeats"); do
		local_times+=("$(build $pipeline local)")
		slurm_times+=("$(build $pipeline slurm)")
	done
	l=$(printf '%s\n' "${local_times[@]}" | median)
	s=$(printf '%s\n' "${slurm_times[@]}" | median)
	awk -v p="$pipeline" -v n="$stages" -v l="$l" -v s="$s" 'BEGIN {
		printf "| %s | %d | %.2f | %.2f | %.3f | %.3f | %.3f | %.1f× |\n", p, n, l, s, l / n, s / n, (s - l) / n, s / l }'
done
