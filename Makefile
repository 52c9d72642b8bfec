# One command per task; CI calls these targets verbatim.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test lint bench-webhooks bench-reporting stop-db clean-db psql

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Serve the API on http://127.0.0.1:8000 with the worker (and the embedded Postgres and the sandbox Plivo
# when not configured); Ctrl-C stops them all. The embedded Postgres keeps running: `make stop-db`.
run: install
	$(PY) -m webhook_service.devserver

# The whole test suite, on the embedded Postgres unless DATABASE_URL names a server.
test: install
	$(PY) -m pytest

# The fault drills alone (also part of `test`): Postgres restarted and a worker SIGKILLed mid-load,
# two instances on one database, Plivo slow or down, slow clients (through nginx, which they start, and
# straight to gunicorn); each fails if a callback is lost or doubled.
.PHONY: drills
drills: install
	$(PY) -m pytest -m slow tests/drills -v

lint: install
	$(VENV)/bin/ruff check .

# Stop the embedded development Postgres, keeping its data (`make run` starts it again).
stop-db: install
	$(PY) -c "from webhook_service.devdb import stop; stop()"

# Stop the embedded development Postgres and delete its data.
clean-db: install
	$(PY) -c "from webhook_service.devdb import stop; stop(delete=True)"

# psql on the development database (DATABASE_URL's when set), e.g. for the queries of docs/reporting.md.
psql: install
	$(PY) -m webhook_service.devdb psql

# The request path's req/s beside four baselines, the rate sustained with the projection lag under a
# second, a busy session, p99 at 300 req/s and worker RSS (bench/webhooks.py), with Debian's wrk as
# the load tool (installed when missing). Prints its tables; takes about fifteen minutes.
bench-webhooks: install
	command -v wrk || (apt-get update && apt-get install -y wrk)
	$(PY) bench/webhooks.py

# The reporting queries at 100 000 sessions / 1 000 000 legs, beside the raw tables (bench/reporting.py).
bench-reporting: install
	$(PY) bench/reporting.py

# One busy session's projection (1000 calls), read whole and from the projector's kept copy.
bench-projection: install
	$(PY) bench/projection.py
