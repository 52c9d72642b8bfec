"""Migrations own the schema: head matches the models, and every revision round-trips."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from webhook_service.migrate import alembic_config
from webhook_service.persistence.db import sqlalchemy_url
from webhook_service.persistence.models import Base


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
