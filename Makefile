# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow lint site bench bench-postgres torture torture-postgres mutants clean

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
# build/test-site/ is site/ plus the test-only wheels tests/pyodide loads (never deployed).
site: $(VENV)/.installed
	$(PY) build.py
	$(PY) build.py test-site

# --timeout: a test that hangs fails (with every thread's traceback) instead of stalling the run.
test: lint site
	DURABLY_SKIP_SITE_BUILD=1 $(PY) -m pytest --timeout=900

# The tests marked slow, which `make test` leaves out: the browser reload torture (OPFS
# and IndexedDB), the browser benchmarks, and browser variants whose check make test keeps
# in a faster form (each says why; ~9 min together). CI runs them after `make test`.
test-slow: site
	DURABLY_SKIP_SITE_BUILD=1 $(PY) -m pytest --timeout=1800 -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_core.py

# PostgreSQL next to SQLite (1, 2 and 4 worker processes); starts its own throwaway
# cluster, so it needs the server binaries (apt-get install postgresql), not a server.
bench-postgres: $(VENV)/.installed
	$(PY) benchmarks/bench_postgres.py

torture: $(VENV)/.installed
	$(PY) benchmarks/torture.py

# The same torture with the workers on a throwaway PostgreSQL cluster (apt-get install postgresql).
torture-postgres: $(VENV)/.installed
	$(PY) benchmarks/torture.py --postgres

# Break the engine on purpose (in a temporary copy) and check the tests catch each break.
mutants: $(VENV)/.installed
	$(PY) benchmarks/mutants.py

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .mypy_cache .ruff_cache
