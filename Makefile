# Two entry points (see README): `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,interop,lint,tensorboard]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/saelab bench --protocol mini --arch matryoshka --seeds 1
	$(VENV)/bin/saelab report "$${SAELAB_STORE:-runs/results.sqlite}" --out runs/report.html

# ruff (lint + format), pyright (basic) and the import-linter layer contract (pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/pyright
	$(VENV)/bin/lint-imports

test: $(VENV)/.installed
	scripts/ensure_chromium.sh
	$(PY) -m pytest -q

.PHONY: setup demo lint test
