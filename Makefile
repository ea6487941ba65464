# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint site bench torture clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m durably_web.demo

lint: $(VENV)/.installed
	$(PY) -m ruff check durably_web tests benchmarks
	$(PY) -m mypy

# The browser bundle (site/) is built once here; the browser tests then reuse it.
site: $(VENV)/.installed
	$(PY) build.py

test: lint site
	DURABLY_SKIP_SITE_BUILD=1 $(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_core.py

torture: $(VENV)/.installed
	$(PY) benchmarks/torture.py

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .mypy_cache .ruff_cache
