"""Migrations own the schema: head matches the models, and every revision round-trips."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

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


def test_0007_scopes_idempotency_keys_per_token_and_its_downgrade_restores_one_key_space(scratch_url):
    config = alembic_config(scratch_url)
    command.upgrade(config, "0006")
    engine = create_engine(sqlalchemy_url(scratch_url))
    attempt = ("INSERT INTO session_create_attempts ({columns}idempotency_key, request_hash, request_body, "
               "plivo_params) VALUES ({values}:key, 'h', '{{}}', '{{}}')")
    with engine.begin() as conn:  # made before 0007: one key space
        conn.execute(text(attempt.format(columns="", values="")), [{"key": "k1"}, {"key": "k2"}])
    command.upgrade(config, "0007")
    with_token = attempt.format(columns="token_id, ", values=":token, ")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM session_create_attempts WHERE token_id IS NULL")).scalar() == 2
        # Each caller has its own k1 (none of them is the k1 from before 0007); a caller's k2 is unique.
        conn.execute(text(with_token), [{"token": "a", "key": "k1"}, {"token": "b", "key": "k1"},
                                        {"token": "a", "key": "k2"}])
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text(with_token), {"token": "a", "key": "k2"})
    command.downgrade(config, "0006")
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT idempotency_key FROM session_create_attempts ORDER BY id")).scalars().all()
    assert keys == ["k1", "k2", None, None, None]  # the earliest attempt keeps a shared key
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text(attempt.format(columns="", values="")), {"key": "k1"})
    engine.dispose()
    command.upgrade(config, "head")
