# One entry point per job. Everything installs into .venv with pip (uv/poetry would pull a CUDA torch).
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= qwen-demo
STAMP  := $(VENV)/.installed

.PHONY: setup browser chat serve web test test-slow test-all bench peers demo-model clean

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

web: setup             ## Gradio chat page on 127.0.0.1:7860 (MODEL=dir to choose)
	$(VENV)/bin/qwen web --model $(MODEL)

# Best effort: Debian's chromium (+ a CJK font) for the real-browser test of the web page; without it
# that test is skipped, everything else runs.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q --no-install-recommends chromium fonts-wqy-microhei >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium fonts-wqy-microhei >/dev/null 2>&1; }; }; } || \
		echo "chromium is not installed: the web page's browser test will be skipped"

test: setup browser    ## the default (fast) test tier; what CI runs
	$(PY) -m pytest

test-slow: setup       ## bigger shapes and end-to-end runs
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

bench: setup           ## decode/prefill benchmarks vs transformers, and qwen.cpp once `make peers` ran
	$(VENV)/bin/qwen bench --preset qwen-300m --engines ours,qwen.cpp,transformers

peers: setup           ## build qwen.cpp (~2.5 min) and llama.cpp (llama-cpp-python, ~10-25 min): optional peers and parity checks
	CMAKE_POLICY_VERSION_MINIMUM=3.5 CMAKE_ARGS="-DCMAKE_POSITION_INDEPENDENT_CODE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q --disable-pip-version-check qwen-cpp==0.1.3
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36

demo-model: setup      ## rebuild the embedded demo model into qwen/assets/demo (~55-60 min on 2 CPU cores)
	$(VENV)/bin/qwen train --recipe demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
