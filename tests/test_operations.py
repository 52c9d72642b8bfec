"""Operations: retention, metrics, structured logs."""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import threading
import uuid as uuid_module

import pytest
import requests
from sqlalchemy import text

from webhook_service.logs import JsonFormatter, mask_phone, mask_phones_in

from .helpers import settle
from .test_webhooks import create_session, play, send


def _inbox(engine, rows):
    with engine.begin() as conn:
        for i, (status, days_old) in enumerate(rows):
            conn.execute(text(
                "INSERT INTO callback_inbox (received_at, endpoint, method, params, dedupe_key, status) "
                "VALUES (now() - make_interval(days => :days), 'session', 'POST', '{}', :key, :status)"
            ), {"days": days_old, "key": f"k{i}", "status": status})


def _statuses(engine):
    with engine.connect() as conn:
        return sorted(conn.execute(text("SELECT dedupe_key, status FROM callback_inbox")).all())


def test_prune_deletes_only_old_recorded_and_ignored_callbacks(app, engine):
    _inbox(engine, [("recorded", 100), ("ignored", 95), ("failed", 120), ("failed", 100), ("recorded", 10),
                    ("recorded", 91)])
    result = app.test_cli_runner().invoke(args=["callbacks", "prune", "--older-than", "90d", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {"deleted": 3}
    assert _statuses(engine) == [("k2", "failed"), ("k3", "failed"), ("k4", "recorded")]


def test_prune_skips_rows_a_live_transaction_holds_instead_of_waiting(app, engine):
    _inbox(engine, [("recorded", 100), ("recorded", 100)])
    locked, release = threading.Event(), threading.Event()

    def hold_one_row():
        with engine.begin() as conn:
            conn.execute(text("SELECT id FROM callback_inbox WHERE dedupe_key = 'k0' FOR UPDATE"))
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_one_row)
    holder.start()
    locked.wait(5)
    try:
        result = app.test_cli_runner().invoke(args=["callbacks", "prune", "--older-than", "90d"])
        assert json.loads(result.output.strip().splitlines()[-1]) == {"deleted": 1}
    finally:
        release.set()
        holder.join()
    assert _statuses(engine) == [("k0", "recorded")]


def test_prune_rejects_a_malformed_age(app):
    result = app.test_cli_runner().invoke(args=["callbacks", "prune", "--older-than", "ninety"])
    assert result.exit_code != 0 and "90d" in result.output


ATTEMPT_STATES = ("pending", "succeeded", "failed", "unknown", "recovered", "not_found")


def _attempts(engine, rows):
    with engine.begin() as conn:
        for state, days_old in rows:
            conn.execute(text(
                "INSERT INTO session_create_attempts (started_at, state, idempotency_key, request_hash, request_body,"
                " plivo_params) VALUES (now() - make_interval(days => :days), :state, :key, 'h', '{}', '{}')"
            ), {"days": days_old, "state": state, "key": f"{state}-{days_old}"})


def _attempt_keys(engine):
    with engine.connect() as conn:
        return sorted(conn.execute(text("SELECT idempotency_key FROM session_create_attempts")).scalars())


def test_prune_attempts_deletes_only_old_finished_create_attempts(app, engine):
    _attempts(engine, [(state, days) for state in ATTEMPT_STATES for days in (400, 91, 89, 0)])
    result = app.test_cli_runner().invoke(args=["sessions", "prune-attempts", "--older-than", "90d",
                                                "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {"deleted": 8}  # 4 finished states x 2 old ages
    kept = [f"{state}-{days}" for state in ATTEMPT_STATES for days in (400, 91, 89, 0)
            if state in ("pending", "unknown") or days < 90]
    assert _attempt_keys(engine) == sorted(kept)


def test_prune_attempts_skips_rows_a_live_transaction_holds_instead_of_waiting(app, engine):
    _attempts(engine, [("succeeded", 100), ("failed", 100), ("not_found", 100)])
    locked, release = threading.Event(), threading.Event()

    def hold_one_row():
        with engine.begin() as conn:
            conn.execute(text("SELECT id FROM session_create_attempts WHERE state = 'failed' FOR UPDATE"))
            locked.set()
            release.wait(10)

    holder = threading.Thread(target=hold_one_row)
    holder.start()
    locked.wait(5)
    try:
        result = app.test_cli_runner().invoke(args=["sessions", "prune-attempts", "--older-than", "90d",
                                                    "--batch-size", "1"])
        assert json.loads(result.output.strip().splitlines()[-1]) == {"deleted": 2}
    finally:
        release.set()
        holder.join()
    assert _attempt_keys(engine) == ["failed-100"]


def _samples(live) -> dict[str, float]:
    body = requests.get(live.url + "/metrics", timeout=5).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_callbacks_by_kind_and_outcome(live, sandbox, engine):
    uuid = create_session(live, record=True)
    before = _samples(live)  # the counters live in this test process, across tests: compare increases
    callbacks = play(sandbox, uuid, deliver=False)["callbacks"]  # 5 session events, 2 recording events
    for callback in callbacks + callbacks[:1]:
        send(callback)
    settle(live.app)
    after = _samples(live)

    def increase(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert increase('plivo_callbacks_total{kind="session",outcome="recorded"}') == 5
    assert increase('plivo_callbacks_total{kind="recording",outcome="recorded"}') == 2
    assert increase('plivo_callbacks_total{kind="session",outcome="duplicate"}') == 1
    assert increase('projection_lag_seconds_count') == 7  # every fact's queue row, read once
    assert after["plivo_callback_inbox_failed"] == 0 and after["projection_oldest_due_seconds"] == 0
    assert 'plivo_api_calls_total{op="create",outcome="ok"}' in after
    assert 'http_request_duration_seconds_bucket{le="0.001",route="/webhooks/plivo/<any(session, recording):kind>",' \
           'status="2xx"}' in after


def test_one_json_log_line_per_request_with_request_id_route_status_latency_and_session(app, auth, sandbox,
                                                                                        caplog):
    formatter = JsonFormatter()
    with caplog.at_level(logging.INFO, logger="webhook_service.access"):
        response = app.test_client().post("/v1/sessions", headers=auth | {"X-Request-Id": "req-123"},
                                          json={"first_party": "+14155550100", "second_party": "+14155550123"})
    assert response.headers["X-Request-Id"] == "req-123"
    [record] = [r for r in caplog.records if r.name == "webhook_service.access"]
    line = json.loads(formatter.format(record))
    assert line["request_id"] == "req-123" and line["route"] == "/v1/sessions" and line["status"] == 201
    assert line["session_uuid"] == response.get_json()["session_uuid"] and line["latency_ms"] > 0


@pytest.mark.parametrize("sent", ["a" * 129, "x" * 8000, "<script>alert(1)</script>", 'id" onload="x', "req 123",
                                  "req-123\u00e9", "req\t123", "req/123", "req;123", "req=123", ""])
def test_an_ill_formed_request_id_is_replaced_by_a_new_one(app, auth, sandbox, caplog, sent):
    with caplog.at_level(logging.INFO, logger="webhook_service.access"):
        response = app.test_client().get("/v1/sessions", headers=auth | {"X-Request-Id": sent})
    given = response.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", given) and given != sent  # a uuid4 of ours
    [record] = [r for r in caplog.records if r.name == "webhook_service.access"]
    assert record.request_id == given


@pytest.mark.parametrize("sent", ["a" * 128, "08040334-dde7-4d1b-9c9e-b4b653233c03", "01ARZ3NDEKTSV4RRFFQ69G5FAV",
                                  "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "svc.orders:42_retry-1"])
def test_a_well_formed_request_id_is_kept(app, auth, sandbox, sent):
    assert app.test_client().get("/v1/sessions", headers=auth | {"X-Request-Id": sent}).headers["X-Request-Id"] == sent


def test_phone_numbers_are_masked_in_log_lines():
    record = logging.makeLogRecord({"msg": "call from %s to %s", "args": ("+14155552345", "14155550123"),
                                    "levelno": logging.INFO, "levelname": "INFO", "from_number": "+447700900123"})
    line = JsonFormatter().format(record)
    assert "+14155552345" not in line and "14155550123" not in line and "447700900123" not in line
    assert "+1415***2345" in line and mask_phone("+14155552345") == "+1415***2345"


@pytest.mark.parametrize(("written", "masked"), [
    ("+1 415-555-0100", "+1415***0100"), ("+1 (415) 555-0100", "+1415***0100"), ("(415) 555-0100", "4155***0100"),
    ("415.555.0100", "4155***0100"), ("a14155550100", "a1415***0100"), ("tel:+14155550100x", "tel:+1415***0100x"),
    ("+44 7700 900123", "+4477***0123"), ("+91 98765 43210", "+9198***3210"), ("011 44 7700 900123", "0114***0123"),
])
def test_phone_numbers_written_with_spaces_dashes_or_letters_around_them_are_masked(written, masked):
    record = logging.makeLogRecord({"msg": "call from %s", "args": (written,), "levelno": logging.INFO,
                                    "levelname": "INFO", "to_number": f"to {written}."})
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == f"call from {masked}" and line["to_number"] == f"to {masked}."


def test_a_number_in_the_sql_parameters_of_a_logged_traceback_is_masked(engine):
    # What psycopg and SQLAlchemy put in the exception text: the statement and its parameters, as given.
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT CAST(:n AS integer), :m"), {"n": "+1 415-555-0100", "m": "a14155550123"})
    except Exception:
        record = logging.makeLogRecord({"msg": "unhandled error", "levelno": logging.ERROR, "levelname": "ERROR",
                                        "exc_info": sys.exc_info()})
    line = json.loads(JsonFormatter().format(record))
    assert "parameters" in line["exception"] and "+1415***0100" in line["exception"]
    assert "555-0100" not in line["exception"] and "4155550123" not in line["exception"]


def test_uuids_and_hex_ids_are_never_masked():
    # The matcher alone would find a "number" in about one UUID in five.
    rng = random.Random(15)
    for _ in range(500):
        uuid, hex_id = str(uuid_module.UUID(int=rng.getrandbits(128), version=4)), f"{rng.getrandbits(128):032x}"
        text = f"session {uuid} request {hex_id} sha {rng.getrandbits(256):064x}"
        assert mask_phones_in(text) == text and mask_phones_in(uuid) == uuid and mask_phones_in(hex_id) == hex_id


def test_session_uuids_that_start_with_digits_are_not_mistaken_for_phone_numbers():
    record = logging.makeLogRecord({"msg": "session %s", "args": ("08040334-dde7-4d1b-9c9e-b4b653233c03",),
                                    "levelno": logging.INFO, "levelname": "INFO",
                                    "session_uuid": "12345678-dde7-4d1b-9c9e-b4b653233c03"})
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "session 08040334-dde7-4d1b-9c9e-b4b653233c03"
    assert line["session_uuid"] == "12345678-dde7-4d1b-9c9e-b4b653233c03"


def test_sessions_project_projects_every_due_session_now(live, sandbox, engine, app):
    uuid = create_session(live, record=True)
    for callback in play(sandbox, uuid, deliver=False)["callbacks"]:
        send(callback)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM projection_queue")).scalar() == 7
    result = app.test_cli_runner().invoke(args=["sessions", "project"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {"projected": 1}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM projection_queue")).scalar() == 0
        assert conn.execute(text("SELECT call_count FROM masking_sessions WHERE session_uuid = :u"),
                            {"u": uuid}).scalar() == 2
