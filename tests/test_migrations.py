"""Migrations own the schema: head matches the models, and every revision round-trips."""

from __future__ import annotations

import os

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from webhook_service.db import sqlalchemy_url
from webhook_service.devdb import drop_database, ensure_database, server_url, with_database
from webhook_service.migrate import alembic_config
from webhook_service.models import Base


@pytest.fixture
def scratch_url():
    """A database of its own (migrations are run on it from nothing), dropped afterwards."""
    admin = with_database(os.environ["DATABASE_URL"], "postgres") if os.environ.get("DATABASE_URL") else server_url()
    name = f"webhook_service_migrations_{os.getpid()}"
    yield ensure_database(admin, name, recreate=True)
    drop_database(admin, name)


def test_upgrade_head_then_check_finds_nothing_to_generate(scratch_url):
    url = scratch_url
    config = alembic_config(url)
    command.upgrade(config, "head")
    command.check(config)  # raises if autogenerate would produce anything
    engine = create_engine(sqlalchemy_url(url))
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_server_default": True, "compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_migrations_round_trip_down_to_base_and_up_again(scratch_url):
    url = scratch_url
    config = alembic_config(url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    engine = create_engine(sqlalchemy_url(url))
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    command.upgrade(config, "head")
    engine = create_engine(sqlalchemy_url(url))
    assert {"masking_sessions", "session_create_attempts"} <= set(inspect(engine).get_table_names())
    engine.dispose()
