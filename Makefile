# One entry point per job. Everything installs into .venv with pip (uv/poetry would pull a CUDA torch).
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= qwen-demo
STAMP  := $(VENV)/.installed

.PHONY: setup chat serve test test-slow test-all bench peers demo-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

chat: setup            ## interactive chat with the default model (MODEL=dir to choose)
	$(VENV)/bin/qwen chat --model $(MODEL)

serve: setup           ## OpenAI-compatible server on 127.0.0.1:8000 (MODEL=dir to choose)
	$(VENV)/bin/qwen serve --model $(MODEL)

test: setup            ## the default (fast) test tier; what CI runs
	$(PY) -m pytest

test-slow: setup       ## bigger shapes and end-to-end runs
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

bench: setup           ## decode/prefill benchmarks vs transformers, and qwen.cpp once `make peers` ran
	$(VENV)/bin/qwen bench --preset qwen-300m --engines ours,qwen.cpp,transformers

peers: setup           ## build qwen.cpp (~2.5 min; optional benchmark peer and parity check)
	CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_ARGS="-DCMAKE_POSITION_INDEPENDENT_CODE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q --disable-pip-version-check qwen-cpp==0.1.3

demo-model: setup      ## rebuild the embedded demo model into qwen/assets/demo (~45-60 min on 2 CPU cores)
	$(VENV)/bin/qwen train --recipe demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
