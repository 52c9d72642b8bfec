"""Helpers shared by the tests (constants, settings, a live server)."""

from __future__ import annotations

import os
import secrets
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import text
from werkzeug.serving import make_server

from webhook_service.plivo.signature import NONCE_HEADER, SIGNATURE_HEADER, compute_signature
from webhook_service.settings import SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN, Settings

API_TOKEN = "test-api-token-1"
FIRST = "+14155550100"
SECOND = "+14155550123"


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and never one this test run handed out before: two servers a
    test starts close together (nginx and the gunicorn behind it) must not be given the same one,
    or one fails to bind and the other answers in its place."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def make_settings(sandbox_url: str, public_base_url: str = "http://127.0.0.1:9", **overrides) -> Settings:
    return Settings.from_env(settings_env(sandbox_url, public_base_url, **overrides))


def settings_env(sandbox_url: str, public_base_url: str = "http://127.0.0.1:9", **overrides) -> dict[str, str]:
    """The test settings as environment variables (for the service run as a command)."""
    env = {
        # The app fixtures give the test database as `database_url`; this one is never reached (nothing
        # listens on the discard port), but production settings require one (no embedded fallback).
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/given-by-the-test",
        "PLIVO_AUTH_ID": SANDBOX_AUTH_ID,
        "PLIVO_AUTH_TOKEN": SANDBOX_AUTH_TOKEN,
        "PLIVO_API_BASE_URL": sandbox_url,
        "PUBLIC_BASE_URL": public_base_url,
        "PUBLIC_BASE_URL_ALLOW_HTTP": "true",  # the tests' services call themselves back over http
        "API_TOKENS": f"{API_TOKEN},second-token-2",
        "PLIVO_READ_TIMEOUT": "2",
        "PLIVO_CONNECT_TIMEOUT": "1",
        "LOG_LEVEL": "WARNING",
        # Tests project when they choose (`settle`, or a read): no background thread racing their
        # checks. The tests that are about the background projector turn it on.
        "PROJECT_IN_WEB": "false",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def wait_until(condition: Callable[[], bool], *, timeout: float = 10.0, alive: Callable[[], bool] = lambda: True
               ) -> bool:
    """Poll `condition` until it holds (True), `alive()` turns false or `timeout` seconds pass (False).

    For what the test cannot be told about directly (another process's work, a row committed by a
    thread of the service); never to give something time to happen.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if not alive() or time.monotonic() > deadline:
            return condition()
        time.sleep(0.01)


class LiveServer:
    """The real app served over HTTP from a thread, so the sandbox can call it back."""

    def __init__(self, app, port: int):
        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.app.extensions["webhook_service"].close()


def settle(app) -> int:
    """Project every session that is due now (what the background projector does a moment later)."""
    return app.extensions["webhook_service"].projector.project_all_due()


def signed_headers(method: str, url: str, params: dict, *, token: str = SANDBOX_AUTH_TOKEN,
                   nonce: str | None = None) -> dict[str, str]:
    """Plivo's V3 headers for a callback, with a fresh 20-digit nonce unless one is given."""
    nonce = nonce or "".join(secrets.choice(string.digits) for _ in range(20))
    return {NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature(method, url, params, nonce, token)}


def unavailable_database_url() -> str:
    """A URL where nothing listens: what the service sees while Postgres is down."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


def store_callback(app, endpoint: str, params: dict, method: str = "POST") -> str:
    """Store a callback as the webhook view does once its signature verified (no HTTP); its outcome."""
    from webhook_service.plivo.signature import string_to_sign
    from webhook_service.services import inbox

    ctx = app.extensions["webhook_service"]
    url = f"{ctx.settings.public_base_url}/webhooks/plivo/{endpoint}"
    return inbox.receive(ctx, endpoint, method, "application/x-www-form-urlencoded", params, None,
                         string_to_sign(method, url, params))


def plivo_dedupe_key(method: str, url: str, params: dict) -> str:
    """What the service's dedupe key must be, computed by Plivo's own SDK: the SHA-256 of the string
    its V3 signature covers (`plivo.utils.signature_v3`), nonce left out."""
    import hashlib

    from plivo.utils.signature_v3 import construct_get_url, construct_post_url

    signed = construct_get_url(url, dict(params)) if method == "GET" else construct_post_url(url, dict(params))
    return hashlib.sha256(bytes(signed)).hexdigest()


@contextmanager
def trigger_on(engine, table: str, body: str, *, events: str = "INSERT", name: str = "test_trigger") -> Iterator[None]:
    """While the block runs, every row written to `table` (by `events`) first runs the PL/pgSQL `body`
    (NEW is the row; RETURN NEW is added). The test's way to break or hold the database for real."""
    with engine.begin() as conn:
        conn.execute(text(f"""
            CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN {body}; RETURN NEW; END $$;
            CREATE TRIGGER {name} BEFORE {events} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}();
        """))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TRIGGER {name} ON {table}; DROP FUNCTION {name}();"))


def writes_refused(engine, table: str, message: str, *, when: str = "true"):
    """Every write to `table` whose new row meets `when` fails with `message` (formatted by RAISE)."""
    return trigger_on(engine, table, f"IF {when} THEN RAISE EXCEPTION {message}; END IF", name="test_refuse")


@contextmanager
def writes_held(engine, table: str, key: int, *, when: str = "true", events: str = "INSERT") -> Iterator[Callable]:
    """Make every writer of `table` (whose new row meets `when`) wait inside its statement, on an
    advisory lock the test holds, until it calls the `release()` it is given (or the block ends).

    On the way out the lock goes first, then the trigger: dropping a trigger waits for the
    statements it holds.
    """
    holder = engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
    holder.commit()
    held = [True]

    def release() -> None:
        if held[0]:
            holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            holder.commit()
            held[0] = False

    try:
        with trigger_on(engine, table, f"IF {when} THEN PERFORM pg_advisory_xact_lock({key}); END IF",
                        events=events, name=f"test_hold_{key}"):
            try:
                yield release
            finally:
                release()
    finally:
        release()
        holder.close()


def queued(engine) -> int:
    """Rows in the projection queue: facts not yet projected."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM projection_queue")).scalar()


@contextmanager
def rows_locked(engine, select_for_update: str) -> Iterator[None]:
    """While the block runs, another transaction holds the rows `select_for_update` locks."""
    with engine.connect() as holder, holder.begin():
        holder.execute(text(select_for_update))
        yield


LOCK_WAITS = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                  " AND wait_event_type IN ('Lock', 'LWLock') AND query ILIKE :query")


def wait_for_lock(engine, query: str, timeout: float = 10.0) -> None:
    """Until some backend waits on a lock while running a statement like `query` (an ILIKE pattern)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(LOCK_WAITS, {"query": query}).scalar():
                return
        time.sleep(0.01)
    raise AssertionError(f"nothing came to wait on a lock in {query}")


# Variables the service (or gunicorn.conf.py) reads: never inherited from the environment of the test run.
SERVICE_VARIABLES = ("DATABASE_URL", "DATABASE_DIRECT_URL", "PLIVO_", "PUBLIC_BASE_URL", "API_TOKENS", "DB_",
                     "WEBHOOK_", "LOG_LEVEL",
                     "PROJECT_IN_WEB", "CALLBACK_METHOD", "PROMETHEUS_MULTIPROC_DIR", "GUNICORN_", "WEB_CONCURRENCY",
                     "PORT", "FORWARDED_ALLOW_IPS", "NGINX_", "DEFAULT_PHONE_REGION", "DRAIN_FILE", "MIGRATION_")


def environ_without_settings() -> dict[str, str]:
    """This process's environment without the service's settings: what a service process inherits."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VARIABLES)}


def flask_command(args: list[str], database_url: str, sandbox_url: str, *, stderr=subprocess.DEVNULL,
                  **overrides) -> subprocess.Popen:
    """`python -m flask --app 'webhook_service:create_app()' <args>` in a process of its own, with the
    test settings; its stdout is a text pipe, line-buffered."""
    env = environ_without_settings() | settings_env(sandbox_url, **overrides) | {"DATABASE_URL": database_url,
                                                                                "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "flask", "--app", "webhook_service:create_app()", *args],
                            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
