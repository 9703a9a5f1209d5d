# One entry point per job. Everything installs into .venv with pip (uv/poetry would pull a CUDA torch).
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= qwen-demo
STAMP  := $(VENV)/.installed

.PHONY: setup chat test test-slow test-all bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

chat: setup            ## interactive chat with the default model (MODEL=dir to choose)
	$(VENV)/bin/qwen chat --model $(MODEL)

test: setup            ## the default (fast) test tier; what CI runs
	$(PY) -m pytest

test-slow: setup       ## bigger shapes and end-to-end runs
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

bench: setup           ## decode/prefill benchmarks vs transformers (see docs/benchmarks.md)
	$(VENV)/bin/qwen bench --preset qwen-300m

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
