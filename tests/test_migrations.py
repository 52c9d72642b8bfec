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


def _include_name(name, type_, parent_names) -> bool:
    return not (type_ == "table" and name and name.startswith("callback_inbox_"))  # as migrations/env.py


def test_upgrade_head_then_check_finds_nothing_to_generate(scratch_url):
    url = scratch_url
    config = alembic_config(url)
    command.upgrade(config, "head")
    command.check(config)  # raises if autogenerate would produce anything
    engine = create_engine(sqlalchemy_url(url))
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_server_default": True, "compare_type": True,
                                                         "include_name": _include_name})
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


def test_upgrading_from_0005_keeps_every_leg_total_and_recording(scratch_url, sandbox):
    """Data written by revision 0005's own code path (its SQL function for leg callbacks, and the
    rows its Python path wrote for recordings, PIN checks and number changes) is moved into facts by
    0006; projecting every session then gives back exactly the legs, counters, recordings, number
    history and daily totals that 0005 had stored."""
    from datetime import UTC, datetime, timedelta

    import psycopg
    from psycopg.types.json import Jsonb

    from webhook_service import create_app

    from .helpers import make_settings, settle

    command.upgrade(alembic_config(scratch_url), "0005")
    t0 = datetime(2026, 11, 20, 23, 59, 0, tzinfo=UTC)
    first, second = "+14155550100", "+14155550123"
    legs = [  # (session, party, kind, seconds after t0, billing): two calls on one session, one on another
        ("s-1", "first", "answered", 0, {}), ("s-1", "second", "ringing", 1, {}), ("s-1", "second", "answered", 7, {}),
        ("s-1", "second", "ended", 97, {"billed": 120, "amount": "0.01700"}),
        ("s-1", "first", "ended", 97, {"billed": 120, "amount": "0.01700"}),
        ("s-1", "first", "answered", 600, {}), ("s-1", "second", "ringing", 601, {}),
        ("s-1", "second", "ended", 646, {"billed": 0, "amount": "0"}),
        ("s-1", "first", "ended", 646, {"billed": 60, "amount": "0.00850"}),
        ("s-2", "second", "answered", 30, {}), ("s-2", "second", "ended", 90, {"billed": 60, "amount": "0.00850"}),
    ]
    with psycopg.connect(scratch_url, autocommit=True) as pg:
        pg.execute("INSERT INTO masking_sessions (session_uuid, first_party, second_party, virtual_number,"
                   " plivo_created_at) VALUES ('s-1', %s, %s, '+16505550100', %s), ('s-2', %s, %s,"
                   " '+16505550199', %s)", [first, second, t0 - timedelta(hours=1)] * 2)
        for n, (uuid, party, kind, seconds, billing) in enumerate(legs):
            pg.execute("""SELECT apply_leg_callback(
                p_endpoint => 'session', p_method => 'POST', p_content_type => NULL, p_params => %(params)s,
                p_nonce => NULL, p_dedupe_key => %(key)s, p_event_name => 'x', p_inbox_session_uuid => %(uuid)s,
                p_session_uuid => %(uuid)s, p_at => %(at)s, p_party => %(party)s, p_kind => %(kind)s,
                p_caller => NULL, p_first_party => NULL, p_second_party => NULL, p_virtual_number => NULL,
                p_call_uuid => NULL, p_end_event => %(end)s, p_duration => NULL, p_billed_duration => %(billed)s,
                p_amount => %(amount)s, p_hangup_cause => NULL, p_hangup_cause_code => NULL,
                p_from_number => %(from)s, p_to_number => NULL)""", {
                "params": Jsonb({}), "key": f"k{n}", "uuid": uuid, "at": t0 + timedelta(seconds=seconds),
                "party": party, "kind": kind, "end": "hangup" if kind == "ended" else None,
                "billed": billing.get("billed"), "amount": billing.get("amount"), "from": first})
        # What 0005's Python path wrote for the other events.
        pg.execute("""INSERT INTO recordings (session_id, recording_uuid, status, resource_url, duration, started_at,
                      ended_at) SELECT id, 'rec-1', 'completed', 'https://api/rec-1', 90, %s, %s
                      FROM masking_sessions WHERE session_uuid = 's-1'""", [t0 + timedelta(seconds=7),
                                                                           t0 + timedelta(seconds=97)])
        pg.execute("UPDATE masking_sessions SET recording_count = 1 WHERE session_uuid = 's-1'")
        pg.execute("UPDATE daily_call_totals SET recordings = recordings + 1"
                   " WHERE (day, shard) = (%s, (SELECT id %% 16 FROM masking_sessions WHERE session_uuid = 's-1'))",
                   [(t0 + timedelta(seconds=7)).date()])
        pg.execute("""INSERT INTO pin_authentications (session_id, event_at, status, retry_counter, from_number)
                      SELECT id, %s, 'success', 1, %s FROM masking_sessions WHERE session_uuid = 's-2'""",
                   [t0, second])
        pg.execute("""INSERT INTO virtual_number_history (session_id, virtual_number, assigned_at)
                      SELECT id, '+16505550188', %s FROM masking_sessions WHERE session_uuid = 's-2' UNION ALL
                      SELECT id, '+16505550199', %s FROM masking_sessions WHERE session_uuid = 's-2'""",
                   [t0 - timedelta(hours=1), t0 + timedelta(minutes=5)])

    def record(pg) -> dict:
        return {
            "sessions": pg.execute("SELECT session_uuid, call_count, answered_call_count, billed_duration, amount,"
                                   " recording_count, virtual_number FROM masking_sessions ORDER BY 1").fetchall(),
            "legs": pg.execute("SELECT s.session_uuid, l.party, l.initiated_at, l.ringing_at, l.answered_at,"
                               " l.ended_at, l.end_event, l.billed_duration, l.amount"
                               " FROM call_legs l JOIN masking_sessions s ON s.id = l.session_id"
                               " ORDER BY 1, 2, 6").fetchall(),
            "recordings": pg.execute("SELECT recording_uuid, status, resource_url, duration, started_at, ended_at"
                                     " FROM recordings").fetchall(),
            "numbers": pg.execute("SELECT virtual_number, assigned_at FROM virtual_number_history"
                                  " ORDER BY 2").fetchall(),
            "days": pg.execute("SELECT day, sum(call_legs), sum(answered_legs), sum(billed_duration), sum(amount),"
                               " sum(recordings), sum(sessions_with_calls) FROM daily_call_totals GROUP BY day"
                               " ORDER BY day").fetchall(),
            "pins": pg.execute("SELECT session_uuid, event_at, status, retry_counter"
                               " FROM reporting.pin_authentications").fetchall(),
        }

    with psycopg.connect(scratch_url) as pg:
        before = record(pg)
    assert len(before["legs"]) == 5 and len(before["days"]) == 2 and before["recordings"] and before["pins"]

    command.upgrade(alembic_config(scratch_url), "head")
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url), "database_url": scratch_url})
    try:
        assert settle(app) == 2  # every session with legs, recordings or a number history was queued
    finally:
        app.extensions["webhook_service"].close()
    with psycopg.connect(scratch_url) as pg:
        assert record(pg) == before


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
