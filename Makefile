# Two set-up commands, each complete on a fresh machine (see README).
PY ?= python3
PIP ?= $(PY) -m pip

install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"

demo: install
	tensorsam completion --out runs/completion-default

test: install
	$(PY) -m pytest -p no:cacheprovider

bench: install
	$(PY) benchmarks/layers.py && $(PY) benchmarks/optim.py && $(PY) benchmarks/completion.py

.PHONY: install demo test bench
