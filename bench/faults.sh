#!/usr/bin/env bash
# Fault injection at scale: the test in tests/faults.rs with 100 kills (CI
# runs 15). Each kill SIGKILLs `llmflow run` of a real small pipeline at a
# random moment, its whole process group or the engine alone; after each,
# `verify` must pass, and every run that completes must give outputs
# byte-identical to an uninterrupted run's. Prints the counts.
#
# Usage: bench/faults.sh [TRIALS] [SEED]    (defaults: 100, 24301)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llmflow/target}"
export LIBTORCH="${LIBTORCH:-${LIBTORCH_DIR:-$PWD/.libtorch}/torch}"
status=0
out=$(LLMFLOW_FAULT_TRIALS="${1:-100}" LLMFLOW_FAULT_SEED="${2:-24301}" \
	cargo test --release --locked --workspace --test faults -- --nocapture 2>&1) || status=$?
grep -E "^(fault injection|killed while|test result|thread|assertion)" <<<"$out" || echo "$out" | tail -30
exit "$status"
