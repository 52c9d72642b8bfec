"""The yardsticks for `bench/webhooks.py`: four tiny Flask apps, each a factory for gunicorn.

    gunicorn -c gunicorn.conf.py 'bench.baselines:create_bare_app()'
    gunicorn -c gunicorn.conf.py 'bench.baselines:create_hmac_app()'
    gunicorn -c gunicorn.conf.py 'bench.baselines:create_orm_app()'
    gunicorn -c gunicorn.conf.py 'bench.baselines:create_store_app()'

They are served exactly like the service (same config file, so the same worker class, workers and
threads), and each of the first three does a little more than the one before:

* bare: a view that answers 200 and reads nothing;
* hmac: parses the form and checks the V3 signature with the service's own `verify_signature`,
  over `PUBLIC_BASE_URL` + path with `PLIVO_AUTH_TOKEN` (403 when it does not verify);
* orm: hmac, then a naive ORM handler: an ORM Session per request, one INSERT of the callback into
  `bench_callbacks` and a read-modify-write of the session's row in `bench_session_counters`, then
  commit. The tables are the bench's own (`create_tables`); the engine is SQLAlchemy's default.
* store: hmac, then the least any handler that keeps each callback before answering must do: one
  INSERT of the callback into `bench_stored`, one statement in autocommit on a pooled psycopg
  connection, as the service's webhook path uses it, and nothing applied. Its throughput is a
  ceiling for the service on this machine, whatever the service does beyond it.

Settings come from the same environment variables as the service's. Every app also answers
`GET /healthz`, which the driver polls until the server is up.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from flask import Flask, request
from psycopg.types.json import Jsonb
from sqlalchemy import BigInteger, DateTime, Identity, Integer, Text, create_engine, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from webhook_service.persistence.db import Database, sqlalchemy_url
from webhook_service.plivo.signature import NONCE_HEADER, SIGNATURE_HEADER, verify_signature

CALLBACK_PATH = "/webhooks/plivo/session"


class Base(DeclarativeBase):
    """The baselines' own tables (never part of the service's schema)."""


class BenchCallback(Base):
    """One received callback, as the naive handler stores it."""

    __tablename__ = "bench_callbacks"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    session_uuid: Mapped[str | None] = mapped_column(Text)
    event_name: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)


class BenchSessionCounter(Base):
    """A per-session count of callbacks, updated read-modify-write."""

    __tablename__ = "bench_session_counters"

    session_uuid: Mapped[str] = mapped_column(Text, primary_key=True)
    callbacks: Mapped[int] = mapped_column(Integer, default=0)


class BenchStored(Base):
    """One received callback, as the store-only handler keeps it."""

    __tablename__ = "bench_stored"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)


def create_tables(engine: Engine) -> None:
    """Create the baselines' tables (the driver calls this on the bench database)."""
    Base.metadata.create_all(engine)


def _app() -> Flask:
    app = Flask(__name__)
    app.add_url_rule("/healthz", "healthz", lambda: {"status": "ok"})
    return app


def _verified_params() -> dict[str, str] | None:
    """The callback's form fields if its V3 signature verifies, else None."""
    params = request.form.to_dict()
    url = os.environ["PUBLIC_BASE_URL"].rstrip("/") + request.path
    tokens = [os.environ["PLIVO_AUTH_TOKEN"]]
    nonce, signature = request.headers.get(NONCE_HEADER), request.headers.get(SIGNATURE_HEADER)
    return params if verify_signature(request.method, url, params, nonce, signature, tokens) else None


def create_bare_app() -> Flask:
    """(a) A view that answers 200 without reading the request."""
    app = _app()

    @app.route("/<path:anything>", methods=["GET", "POST"])
    def bare(anything: str):
        return "", 200

    return app


def create_hmac_app() -> Flask:
    """(b) Parse the form and verify the V3 signature; 200 or 403."""
    app = _app()

    @app.post(CALLBACK_PATH)
    def hmac_only():
        if _verified_params() is None:
            return {"error": "signature_invalid"}, 403
        return {"status": "ok"}

    return app


def create_orm_app() -> Flask:
    """(c) (b), then one INSERT and one counter read-modify-write through an ORM Session, committed."""
    app = _app()
    engine = create_engine(sqlalchemy_url(os.environ["DATABASE_URL"]))

    @app.post(CALLBACK_PATH)
    def naive_orm():
        params = _verified_params()
        if params is None:
            return {"error": "signature_invalid"}, 403
        session_uuid = params.get("SessionUUID")
        with Session(engine) as db:
            db.add(BenchCallback(session_uuid=session_uuid, event_name=params.get("EventName"), params=params))
            counter = db.get(BenchSessionCounter, session_uuid)
            if counter is None:
                counter = BenchSessionCounter(session_uuid=session_uuid, callbacks=0)
                db.add(counter)
            counter.callbacks += 1
            db.commit()
        return {"status": "ok"}

    return app


def create_store_app() -> Flask:
    """(d) (b), then one INSERT of the callback, committed (autocommit), on a pooled connection."""
    app = _app()
    engine = create_engine(sqlalchemy_url(os.environ["DATABASE_URL"]))
    db = Database(engine, engine)  # only its webhook-path connections, `pg()`, are used

    @app.post(CALLBACK_PATH)
    def store_only():
        params = _verified_params()
        if params is None:
            return {"error": "signature_invalid"}, 403
        with db.pg() as pg:
            pg.execute("INSERT INTO bench_stored (params) VALUES (%s)", [Jsonb(params)])
        return {"status": "ok"}

    return app
