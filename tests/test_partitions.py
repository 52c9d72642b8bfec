"""The inbox partitioned by month (migration 0011): how callbacks are filed, how prune works on both
layouts and across the change, and the partitions made ahead of time."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from webhook_service import create_app
from webhook_service.domain.callbacks import NO_MONTH, inbox_month
from webhook_service.migrate import alembic_config
from webhook_service.persistence import partitions
from webhook_service.persistence.db import sqlalchemy_url
from webhook_service.plivo.signature import string_to_sign
from webhook_service.services.inbox import dedupe_key, ensure_partitions, prune

from .helpers import make_settings, store_callback


def test_every_copy_of_a_callback_is_filed_in_the_month_of_its_signed_event_timestamp():
    url = "https://masking.example.com/webhooks/plivo/session"
    params = {"EventName": "SessionFirstPartyHangup", "EventTimestamp": "2026-01-31 23:59:59", "SessionUUID": "s-1"}
    signed = string_to_sign("POST", url, params)
    # A function of the signed string alone, whenever it arrives: January's, however the parameters
    # were cut (a reshaping that still verifies is the same string), and for GET callbacks too.
    assert inbox_month(signed) == date(2026, 1, 1)
    assert inbox_month(string_to_sign("POST", url, {"A": signed.split("?", 1)[-1][1:]})) == date(2026, 1, 1)
    assert inbox_month(string_to_sign("GET", url, params)) == date(2026, 1, 1)
    # No EventTimestamp in the string: one month of its own, in the default partition.
    assert inbox_month(string_to_sign("POST", url, {"EventName": "X"})) == NO_MONTH == date(1970, 2, 1)
    assert inbox_month(string_to_sign("POST", url, {"EventTimestamp": "soon"})) == NO_MONTH
    assert inbox_month(string_to_sign("POST", url, {"EventTimestamp": "0000-01-01 00:00:00"})) == NO_MONTH


def test_callbacks_dated_before_1970_or_far_ahead_are_stored_in_the_default_partition(scratch_app):
    # Not in the legacy partition (1970-01-01 alone), whose CHECK would refuse them (a fuzzer's 500).
    for n, stamp in enumerate(("1969-01-01 00:00:00", "1970-01-01 00:00:00", "2999-12-31 23:59:59")):
        params = {"EventName": "NotAnEventWeHandle", "SessionUUID": f"s-{n}", "EventTimestamp": stamp}
        assert store_callback(scratch_app, "session", params) == "ignored"
        assert store_callback(scratch_app, "session", params) == "duplicate"
    with scratch_app.extensions["webhook_service"].db.engine.connect() as conn:
        tables = conn.execute(text("SELECT tableoid::regclass::text, event_month FROM callback_inbox"
                                   " ORDER BY event_month")).all()
    assert tables == [("callback_inbox_default", date(1969, 1, 1)), ("callback_inbox_legacy", date(1970, 1, 1)),
                      ("callback_inbox_default", date(2999, 12, 1))]


@pytest.fixture
def scratch_app(scratch_url, sandbox):
    command.upgrade(alembic_config(scratch_url), "head")
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url), "database_url": scratch_url})
    yield app
    app.extensions["webhook_service"].close()


def _months_ago(months: int) -> date:
    return partitions.add_months(datetime.now(UTC).date().replace(day=1), -months)


def _callback(at: datetime, n: int) -> dict[str, str]:
    return {"EventName": "NotAnEventWeHandle", "SessionUUID": f"s-{n}", "EventTimestamp": f"{at:%Y-%m-%d %H:%M:%S}"}


def test_a_redelivery_is_a_duplicate_in_the_partition_of_its_event_month(scratch_app):
    last_month = datetime.combine(_months_ago(0), datetime.min.time(), UTC) - timedelta(seconds=1)
    params = _callback(last_month, 1)
    assert store_callback(scratch_app, "session", params) == "ignored"
    assert store_callback(scratch_app, "session", params) == "duplicate"
    with scratch_app.extensions["webhook_service"].db.engine.connect() as conn:
        rows = conn.execute(text("SELECT tableoid::regclass::text, event_month FROM callback_inbox")).all()
    assert rows == [(f"callback_inbox_p{_months_ago(1):%Y_%m}", _months_ago(1))]


def _insert(conn, month: date, status: str, key: str, received: datetime | None = None) -> None:
    conn.execute(text(
        "INSERT INTO callback_inbox (received_at, event_month, endpoint, method, params, dedupe_key, status)"
        " VALUES (:at, :month, 'session', 'POST', '{}', :key, :status)"),
        {"at": received or datetime.combine(month, datetime.min.time(), UTC) + timedelta(days=3), "month": month,
         "key": key, "status": status})


def test_prune_drops_the_months_older_than_the_cutoff_and_keeps_their_failed_rows(scratch_app):
    db = scratch_app.extensions["webhook_service"].db
    made = ensure_partitions(db, months_ahead=2, today=_months_ago(6))  # as a worker did half a year ago
    assert made == [f"callback_inbox_p{_months_ago(m):%Y_%m}" for m in (6, 5, 4)]
    with db.engine.begin() as conn:
        for months in (6, 5, 4, 1, 0):
            for n in range(3):
                _insert(conn, _months_ago(months), "recorded", f"{months}-{n}")
            _insert(conn, _months_ago(months), "failed", f"{months}-failed")
    assert prune(db, older_than=timedelta(days=90)) == 9  # months 6 and 5, and 4 (which ended 90+ days ago)
    with db.engine.connect() as conn:
        left = sorted(conn.execute(text("SELECT tableoid::regclass::text, dedupe_key FROM callback_inbox")).all())
        names = partitions.partitions(conn)
    assert f"callback_inbox_p{_months_ago(6):%Y_%m}" not in names and f"callback_inbox_p{_months_ago(1):%Y_%m}" in names
    assert [key for _, key in left if not key.startswith(("0-", "1-"))] == ["4-failed", "5-failed", "6-failed"]
    assert {table for table, key in left if key.endswith("-failed") and key[0] in "456"} == {"callback_inbox_default"}
    assert prune(db, older_than=timedelta(days=90)) == 0  # nothing more, and failed rows are never pruned


def test_ensure_partitions_makes_the_months_ahead_once(scratch_app):
    db = scratch_app.extensions["webhook_service"].db
    assert ensure_partitions(db, months_ahead=3) == []  # the migration made this month and three more
    assert ensure_partitions(db, months_ahead=5) == [f"callback_inbox_p{_months_ago(-m):%Y_%m}" for m in (4, 5)]
    assert ensure_partitions(db, months_ahead=5) == []
    runner = scratch_app.test_cli_runner()
    result = runner.invoke(args=["callbacks", "partitions", "--months-ahead", "6", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"made": [f"callback_inbox_p{_months_ago(-6):%Y_%m}"]}
    result = runner.invoke(args=["callbacks", "partitions", "--months-ahead", "6"])
    assert result.output == "Nothing to do: the inbox's partitions 6 month(s) ahead exist (or it is not partitioned).\n"


def test_prune_works_on_the_plain_inbox_and_across_the_change_to_partitions(scratch_url, sandbox):
    """Before 0011 (the plain table), after it (rows stored before it are in the legacy partition, deleted
    row by row; a redelivery of one of them is still a duplicate), and once the legacy partition is
    empty (dropped, its failed rows kept)."""
    command.upgrade(alembic_config(scratch_url), "0010")
    engine = create_engine(sqlalchemy_url(scratch_url))
    now = datetime.now(UTC)
    settings = make_settings(sandbox.url)
    stored_before = _callback(now - timedelta(days=2), 7)
    key = dedupe_key(string_to_sign("POST", settings.session_callback_url, stored_before))
    with engine.begin() as conn:
        for n, (days, status) in enumerate([(100, "recorded"), (120, "ignored"), (100, "failed"), (95, "recorded"),
                                            (5, "recorded")]):
            conn.execute(text(
                "INSERT INTO callback_inbox (received_at, endpoint, method, params, dedupe_key, status)"
                " VALUES (:at, 'session', 'POST', '{}', :key, :status)"),
                {"at": now - timedelta(days=days), "key": f"plain-{n}", "status": status})
        conn.execute(text("INSERT INTO callback_inbox (received_at, endpoint, method, params, dedupe_key, status)"
                          " VALUES (now() - interval '2 days', 'session', 'POST', '{}', :key, 'ignored')"),
                     {"key": key})
    app = create_app({"TESTING": True, "settings": settings, "database_url": scratch_url})
    db = app.extensions["webhook_service"].db
    try:
        with db.engine.connect() as conn:
            assert not partitions.is_partitioned(conn)
        assert prune(db, older_than=timedelta(days=90)) == 3  # plain-0, -1 and -3, row by row
    finally:
        app.extensions["webhook_service"].close()
    with engine.connect() as conn:
        keys = sorted(conn.execute(text("SELECT dedupe_key FROM callback_inbox")).scalars())
    assert keys == sorted([key, "plain-2", "plain-4"]), keys

    command.upgrade(alembic_config(scratch_url), "head")
    app = create_app({"TESTING": True, "settings": settings, "database_url": scratch_url})
    db = app.extensions["webhook_service"].db
    try:
        assert store_callback(app, "session", stored_before) == "duplicate"  # found in the legacy partition
        with engine.begin() as conn:
            conn.execute(text("UPDATE callback_inbox SET received_at = now() - interval '200 days'"
                              " WHERE dedupe_key = 'plain-4'"))
        assert prune(db, older_than=timedelta(days=90)) == 1  # plain-4, row by row; the legacy one stays
        with engine.connect() as conn:
            assert partitions.LEGACY_PARTITION in partitions.partitions(conn)
        with engine.begin() as conn:
            conn.execute(text("UPDATE callback_inbox SET received_at = now() - interval '200 days'"
                              " WHERE dedupe_key = :key"), {"key": key})
        assert prune(db, older_than=timedelta(days=90)) == 1
        with engine.connect() as conn:
            assert partitions.LEGACY_PARTITION not in partitions.partitions(conn)  # emptied, then dropped
            left = conn.execute(text("SELECT tableoid::regclass::text, dedupe_key, status FROM callback_inbox")).all()
        assert left == [("callback_inbox_default", "plain-2", "failed")]  # failed rows are kept for replay
    finally:
        app.extensions["webhook_service"].close()
        engine.dispose()


def test_a_callback_dated_past_the_partitions_waits_in_the_default_one_until_its_month_is_made(scratch_app):
    db = scratch_app.extensions["webhook_service"].db
    far = datetime.combine(_months_ago(-8), datetime.min.time(), UTC) + timedelta(days=2)
    params = _callback(far, 9)
    assert store_callback(scratch_app, "session", params) == "ignored"
    assert store_callback(scratch_app, "session", params) == "duplicate"
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT tableoid::regclass::text FROM callback_inbox")).scalars().all() == [
            "callback_inbox_default"]
    ensure_partitions(db, months_ahead=8)
    assert store_callback(scratch_app, "session", params) == "duplicate"
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT tableoid::regclass::text FROM callback_inbox")).scalars().all() == [
            f"callback_inbox_p{_months_ago(-8):%Y_%m}"]


def test_prune_never_queues_behind_live_work_a_busy_month_is_dropped_next_time(scratch_app):
    db = scratch_app.extensions["webhook_service"].db
    ensure_partitions(db, months_ahead=0, today=_months_ago(6))
    with db.engine.begin() as conn:
        _insert(conn, _months_ago(6), "recorded", "old")
    with db.engine.connect() as reader, reader.begin():
        reader.execute(text("SELECT count(*) FROM callback_inbox"))  # a report holds the inbox (ACCESS SHARE)
        started = time.monotonic()
        assert prune(db, older_than=timedelta(days=90)) == 0
        assert time.monotonic() - started < 5  # gave up after the lock timeout (1 s), did not wait the report out
    with db.engine.connect() as conn:
        assert f"callback_inbox_p{_months_ago(6):%Y_%m}" in partitions.partitions(conn)
    assert prune(db, older_than=timedelta(days=90)) == 1
