# The two set-up commands of the README, each complete on a fresh machine.
# torch comes first from the local CPU wheel, so pip never resolves a CUDA build.
PY ?= python3
PIP ?= $(PY) -m pip

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e .

install-dev:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,hf]"

demo: install
	tensorsam completion --out runs/completion-default

test: install-dev
	$(PY) -m pytest -p no:cacheprovider

bench: install-dev
	$(PY) benchmarks/layers.py && $(PY) benchmarks/optim.py && $(PY) benchmarks/completion.py

.PHONY: install install-dev demo test bench
