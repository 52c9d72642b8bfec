"""Shared fixtures: a real Postgres built by the migrations, the sandbox Plivo, the app.

Database: with DATABASE_URL set, the tests create their own database on that server
(`webhook_service_test_<pid>`, dropped at the end); without it they start the embedded PostgreSQL. Either way the schema
comes from `alembic upgrade head`, never from `create_all`. Tests commit (the service owns its
transactions, and several tests race across connections), so every table is truncated before
each test instead of rolling back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
from sqlalchemy import create_engine, text

from plivo_sandbox.server import SandboxServer
from webhook_service import create_app
from webhook_service.devdb import admin_url, drop_database, ensure_database
from webhook_service.migrate import upgrade
from webhook_service.persistence.db import Database, sqlalchemy_url
from webhook_service.settings import SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN

from .helpers import API_TOKEN, LiveServer, free_port, make_settings

# One database per test run, so two runs on one server (or one machine) never collide.
TEST_DATABASE = f"webhook_service_test_{os.getpid()}"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    admin = admin_url()
    url = ensure_database(admin, TEST_DATABASE, recreate=True)
    upgrade(url)
    yield url
    drop_database(admin, TEST_DATABASE)


@pytest.fixture
def scratch_url(request) -> Iterator[str]:
    """A database of the test module's own, empty (for migrating up and down), dropped afterwards."""
    admin = admin_url()
    name = f"webhook_service_{request.module.__name__.rsplit('.', 1)[-1]}_{os.getpid()}"
    yield ensure_database(admin, name, recreate=True)
    drop_database(admin, name)


@pytest.fixture(scope="session")
def engine(database_url):
    engine = create_engine(sqlalchemy_url(database_url))
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _clean_tables(request):
    """Empty every table before a test that touches the database."""
    if "engine" not in request.fixturenames and "app" not in request.fixturenames:
        yield
        return
    engine = request.getfixturevalue("engine")
    with engine.begin() as conn:
        tables = [r[0] for r in conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        ))]
        if tables:
            conn.execute(text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"))
    yield


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    server = SandboxServer(auth_id=SANDBOX_AUTH_ID, auth_token=SANDBOX_AUTH_TOKEN)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server) -> SandboxServer:
    requests.post(sandbox_server.url + "/sandbox/reset", timeout=5).raise_for_status()
    return sandbox_server


@pytest.fixture
def app(database_url, sandbox):
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url), "database_url": database_url})
    yield app
    app.extensions["webhook_service"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture
def live(database_url, sandbox) -> Iterator[LiveServer]:
    """The app on a real port, with PUBLIC_BASE_URL pointing at itself."""
    port = free_port()
    settings = make_settings(sandbox.url, f"http://127.0.0.1:{port}")
    app = create_app({"TESTING": True, "settings": settings, "database_url": database_url})
    server = LiveServer(app, port).start()
    yield server
    server.stop()


@pytest.fixture
def db(app) -> Database:
    return app.extensions["webhook_service"].db
