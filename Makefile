# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Tests and the demo never touch the network: MNIST comes from ../shared/data.
export KD_JAX_DATA_DIR ?= $(abspath ../shared/data)
# The CPU build of torch is pinned: a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all mutants venv clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

$(VENV)/.compare: $(VENV)/.installed
	$(PIP) install -q '$(TORCH_SPEC)'
	$(PIP) install -q --no-deps torchdistill torchvision==0.28.0
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.reproduce --config=experiments/configs/digits_demo.py --seeds=3 --workdir=$(or $(WORKDIR),/tmp/kd_jax_demo)

test: $(VENV)/.compare
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Everything, the slow reproductions and multi-process runs included.
test-all: $(VENV)/.compare
	$(PY) -m pytest -q -m "" tests

# Realistic bugs planted one at a time in a copy of the repo; each must make its tests fail (tests/mutants.py).
mutants: $(VENV)/.compare
	$(PY) tests/mutants.py

clean:
	rm -rf $(VENV) *.egg-info
