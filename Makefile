# The two commands of the README: `make demo` and `make test`. Both set up .venv/ first (idempotent).
# torch is installed alone first, pinned to the CPU build on this machine's disk; every later requirement accepts it,
# so pip never downloads another (multi-GB CUDA) torch. On a GPU machine, install the CUDA torch you want first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CACHE := $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export RAY_TMPDIR ?= $(CACHE)/ray
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	mkdir -p $(CACHE)
	touch $@

demo: setup
	$(VENV)/bin/rwkv-dist demo

test: setup
	$(PY) -m pytest -q --timeout=900 --durations=25

bench: setup
	$(PY) bench/wkv_cpu.py
	$(PY) bench/decode.py
	$(PY) bench/loss.py
	$(PY) bench/kernel_ab.py
	$(PY) bench/data_loader.py
	$(PY) bench/train_throughput.py
	$(PY) bench/zero3_memory.py
	$(PY) bench/pipeline.py
	$(PY) bench/tensor_parallel.py
	$(PY) bench/long_context.py
	$(PY) bench/lm_eval.py
	$(PY) bench/data_prep.py

clean:
	rm -rf $(VENV) $(CACHE) build *.egg-info
