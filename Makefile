# One command per task; CI calls these targets verbatim.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test lint bench-webhooks bench-reporting clean-db

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Serve the API on http://127.0.0.1:8000 (embedded Postgres and the sandbox Plivo when not configured).
run: install
	$(PY) -m webhook_service.devserver

# The whole test suite, on the embedded Postgres unless DATABASE_URL names a server.
test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

# Stop the embedded development Postgres and delete its data.
clean-db: install
	$(PY) -c "from webhook_service.devdb import stop; stop(delete=True)"
