"""Operations: retention, metrics, structured logs."""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import uuid as uuid_module

import pytest
import requests
from sqlalchemy import text

from webhook_service.logs import JsonFormatter, mask_phone, mask_phones_in

from .helpers import (
    FIRST,
    SECOND,
    environ_without_settings,
    flask_command,
    free_port,
    rows_locked,
    settle,
    signed_headers,
    store_callback,
    wait_until,
)
from .test_webhooks import create_session, play, send


def _inbox(engine, rows):
    with engine.begin() as conn:
        for i, (status, days_old) in enumerate(rows):
            conn.execute(text(
                "INSERT INTO callback_inbox (received_at, event_month, endpoint, method, params, dedupe_key, status) "
                "SELECT at, date_trunc('month', at AT TIME ZONE 'UTC')::date, 'session', 'POST', '{}', :key, :status"
                " FROM (SELECT now() - make_interval(days => :days) AS at) t"
            ), {"days": days_old, "key": f"k{i}", "status": status})


def _statuses(engine):
    with engine.connect() as conn:
        return sorted(conn.execute(text("SELECT dedupe_key, status FROM callback_inbox")).all())


def test_prune_deletes_only_old_recorded_and_ignored_callbacks(app, engine):
    _inbox(engine, [("recorded", 100), ("ignored", 95), ("failed", 120), ("failed", 100), ("recorded", 10),
                    ("recorded", 91)])
    result = app.test_cli_runner().invoke(args=["callbacks", "prune", "--older-than", "90d", "--batch-size", "1",
                                                "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"deleted": 3}
    assert _statuses(engine) == [("k2", "failed"), ("k3", "failed"), ("k4", "recorded")]


def test_prune_skips_rows_a_live_transaction_holds_instead_of_waiting(app, engine):
    _inbox(engine, [("recorded", 100), ("recorded", 100)])
    with rows_locked(engine, "SELECT id FROM callback_inbox WHERE dedupe_key = 'k0' FOR UPDATE"):
        result = app.test_cli_runner().invoke(args=["callbacks", "prune", "--older-than", "90d", "--format", "json"])
    assert json.loads(result.stdout) == {"deleted": 1}
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
                                                "--batch-size", "3", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"deleted": 8}  # 4 finished states x 2 old ages
    kept = [f"{state}-{days}" for state in ATTEMPT_STATES for days in (400, 91, 89, 0)
            if state in ("pending", "unknown") or days < 90]
    assert _attempt_keys(engine) == sorted(kept)


def test_prune_attempts_skips_rows_a_live_transaction_holds_instead_of_waiting(app, engine):
    _attempts(engine, [("succeeded", 100), ("failed", 100), ("not_found", 100)])
    with rows_locked(engine, "SELECT id FROM session_create_attempts WHERE state = 'failed' FOR UPDATE"):
        result = app.test_cli_runner().invoke(args=["sessions", "prune-attempts", "--older-than", "90d",
                                                    "--batch-size", "1", "--format", "json"])
    assert json.loads(result.stdout) == {"deleted": 2}
    assert _attempt_keys(engine) == ["failed-100"]


def _samples(live) -> dict[str, float]:
    return _scrape(live.url)


def _scrape(url: str) -> dict[str, float]:
    """/metrics as {sample with its labels: value}."""
    body = requests.get(url + "/metrics", timeout=5).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line and not line.startswith("#")}


WEBHOOKS = 'route="/webhooks/plivo/<any(session, recording):kind>",status="2xx"'


def test_metrics_count_callbacks_by_kind_and_outcome(live, sandbox, engine):
    before = _samples(live)  # the counters live in this test process, across tests: compare increases
    uuid = create_session(live, record=True)
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
    assert increase('plivo_api_calls_total{op="create",outcome="ok"}') == 1
    assert increase('http_request_duration_seconds_count{' + WEBHOOKS + '}') == 8
    assert increase('http_request_duration_seconds_count{route="/v1/sessions",status="2xx"}') == 1
    assert increase('http_request_duration_seconds_bucket{le="+Inf",' + WEBHOOKS + '}') == 8
    assert after["plivo_callback_inbox_failed"] == 0 and after["projection_oldest_due_seconds"] == 0
    # The gauges are read from the database at each scrape: a failed callback and a fact due for 42 s show.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO callback_inbox (endpoint, method, params, dedupe_key, status, error)"
                          " VALUES ('session', 'POST', '{}', 'failed-one', 'failed', 'for the gauge')"))
        conn.execute(text("INSERT INTO projection_queue (session_uuid, queued_at)"
                          " VALUES (:u, now() - interval '42 s')"), {"u": uuid})
    later = _samples(live)
    assert later["plivo_callback_inbox_failed"] == 1 and 42 <= later["projection_oldest_due_seconds"] < 60


RECORDED = 'plivo_callbacks_total{kind="session",outcome="recorded"}'


def _recorded_by_worker(metrics_dir, pids) -> dict[int, float]:
    """Each worker's own count of recorded session callbacks, from the file it writes its samples to."""
    from prometheus_client.mmap_dict import MmapedDict

    counts = {}
    for pid in pids:
        path = metrics_dir / f"counter_{pid}.db"
        counts[pid] = sum(value for key, value, _, _ in (MmapedDict.read_all_values_from_file(path)
                                                             if path.exists() else ())
                          if json.loads(key)[1:3] == ["plivo_callbacks_total",
                                                      {"kind": "session", "outcome": "recorded"}])
    return counts


def test_metrics_are_summed_across_gunicorn_workers(database_url, sandbox, engine, tmp_path):
    """The real app under gunicorn with two workers: each worker takes a known share of the callbacks
    (the other one is paused with SIGSTOP meanwhile), and /metrics, whichever worker answers, counts all."""
    from .drills.harness import GunicornService, service_env

    service = GunicornService(tmp_path, service_env(database_url, sandbox.url, WEB_CONCURRENCY="2")).start()
    try:
        workers = sorted(service.worker_pids())
        assert len(workers) == 2
        url = service.url + "/webhooks/plivo/session"
        for paused, share in ((workers[0], 3), (workers[1], 2)):
            os.kill(paused, signal.SIGSTOP)  # the other worker alone accepts connections meanwhile
            try:
                for _ in range(share):
                    params = {"EventName": "SessionTimeout", "SessionUUID": str(uuid_module.uuid4()),
                              "EventTimestamp": "2026-11-20 11:00:00"}
                    response = requests.post(url, data=params, headers=signed_headers("POST", url, params), timeout=10)
                    assert response.json() == {"status": "recorded"}
            finally:
                os.kill(paused, signal.SIGCONT)
        assert _recorded_by_worker(tmp_path / "service-metrics", workers) == {workers[0]: 2, workers[1]: 3}
        scrapes = [_scrape(service.url)[RECORDED] for _ in range(6)]  # answered by either worker
        assert scrapes == [5] * 6
    finally:
        service.stop()


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


def test_the_sandbox_process_logs_json_lines_werkzeugs_included(tmp_path):
    port = free_port()
    env = environ_without_settings() | {"PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "plivo_sandbox", "--port", str(port)], env=env,
                                stdout=stderr, stderr=stderr)
    try:
        def answers() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/sandbox/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        assert wait_until(answers, timeout=30, alive=lambda: proc.poll() is None), (tmp_path / "stderr").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    records = [json.loads(line) for line in (tmp_path / "stderr").read_text().splitlines()]
    assert any(r["logger"] == "werkzeug" and "GET /sandbox/healthz" in r["message"] for r in records), records
    assert any(r["logger"] == "plivo_sandbox" for r in records)


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
    result = app.test_cli_runner().invoke(args=["sessions", "project", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"projected": 1}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM projection_queue")).scalar() == 0
        assert conn.execute(text("SELECT call_count FROM masking_sessions WHERE session_uuid = :u"),
                            {"u": uuid}).scalar() == 2


# The operator's commands, run as commands -------------------------------------------------------


class Output:
    """A command's stdout lines, read by a thread, so that the test can wait for the next one."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)  # the process closed its output (it ended)

    def next(self, timeout: float = 30.0) -> str | None:
        return self.lines.get(timeout=timeout)

    def rest(self, timeout: float = 30.0) -> list[str]:
        lines = []
        while (line := self.next(timeout)) is not None:
            lines.append(line)
        return lines


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM, as a process manager stops a command; its exit code (a failure if it does not end)."""
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sessions_reconcile_every_says_when_it_starts_each_pass_in_one_line_and_when_it_stops(
        app, auth, database_url, sandbox, tmp_path):
    uuid = app.test_client().post("/v1/sessions", headers=auth, json={"first_party": FIRST, "second_party": SECOND}
                                  ).get_json()["session_uuid"]
    errors = tmp_path / "stderr"
    with open(errors, "w") as stderr:
        proc = flask_command(["sessions", "reconcile", "--every", "0.1"], database_url, sandbox.url, stderr=stderr)
    try:
        output = Output(proc)
        lines = [output.next() for _ in range(3)]
        assert None not in lines, errors.read_text()
    finally:
        code = _stop(proc)
    assert code == 0, errors.read_text()
    lines += output.rest()  # a pass under way when the signal came finishes; nothing starts after it
    assert lines[0] == "reconciling every 0.1 s until SIGTERM or Ctrl-C\n"
    passes = lines[1:-1]
    assert len(passes) in (2, 3), lines
    assert all(re.fullmatch(r"\S+  checked 1, changed \d, drift \d, not found 0, errors 0; marked expired 0;"
                            r" unknown creates resolved: none\n", line) for line in passes), passes
    assert lines[-1] == f"stopped after {len(passes)} passes\n"
    fetched = [r for r in sandbox.state.request_log() if r["method"] == "GET" and uuid in r["path"]]
    assert len(fetched) == len(passes)
    assert errors.read_text() == ""  # said once, on stdout: no log line repeats it


def test_sessions_reconcile_every_in_json_writes_one_object_per_pass_on_stdout(app, auth, database_url, sandbox,
                                                                               tmp_path):
    uuid = app.test_client().post("/v1/sessions", headers=auth, json={"first_party": FIRST, "second_party": SECOND}
                                  ).get_json()["session_uuid"]
    errors = tmp_path / "stderr"
    with open(errors, "w") as stderr:
        proc = flask_command(["sessions", "reconcile", "--every", "0.1", "--format", "json"], database_url,
                             sandbox.url, stderr=stderr)
    try:
        output = Output(proc)
        runs = [output.next() for _ in range(2)]
        assert None not in runs, errors.read_text()
    finally:
        code = _stop(proc)
    assert code == 0, errors.read_text()
    runs += output.rest()
    reports = [json.loads(line) for line in runs]
    assert len(reports) in (2, 3)
    assert all(report["checked"] == 1 and report["errors"] == 0 for report in reports), reports
    fetched = [r for r in sandbox.state.request_log() if r["method"] == "GET" and uuid in r["path"]]
    assert len(fetched) == len(reports)
    assert errors.read_text().splitlines() == ["reconciling every 0.1 s until SIGTERM or Ctrl-C",
                                               f"stopped after {len(reports)} passes"]


def test_the_worker_command_projects_what_is_due_reconciles_repeatedly_and_stops_on_sigterm(
        app, auth, database_url, sandbox, engine, tmp_path):
    active = app.test_client().post("/v1/sessions", headers=auth, json={"first_party": FIRST, "second_party": SECOND}
                                    ).get_json()["session_uuid"]
    uuid = "5a1c0e6e-0000-4000-8000-00000000w0rk"
    params = {"EventName": "SessionFirstPartyHangup", "SessionUUID": uuid, "EventTimestamp": "2026-11-20 10:00:30",
              "From": FIRST, "To": SECOND, "Duration": "30", "BilledDuration": "60", "Amount": "0.00850"}
    assert store_callback(app, "session", params) == "recorded"  # stored; nothing projects in the test app

    def projected() -> bool:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM projection_queue")).scalar() == 0

    def reconciliations() -> int:  # each run fetches the active session from Plivo
        return sum(1 for r in sandbox.state.request_log() if r["method"] == "GET" and active in r["path"])

    assert not projected()
    errors = tmp_path / "stderr"
    with open(errors, "w") as stderr:
        proc = flask_command(["worker", "--reconcile-every", "0.1", "--poll", "0.05"], database_url, sandbox.url,
                             stderr=stderr)
    try:
        running = lambda: proc.poll() is None  # noqa: E731
        assert wait_until(projected, timeout=30, alive=running), errors.read_text()
        assert wait_until(lambda: reconciliations() >= 2, timeout=30, alive=running), errors.read_text()
    finally:
        code = _stop(proc)
    assert code == 0, errors.read_text()
    assert "Traceback" not in errors.read_text(), errors.read_text()
    with engine.connect() as conn:
        row = conn.execute(text("SELECT origin, call_count, billed_duration FROM masking_sessions"
                                " WHERE session_uuid = :u"), {"u": uuid}).one()
    assert tuple(row) == ("callback", 1, 60)


def test_callbacks_replay_by_id_reads_only_that_row_again(app, engine):
    uuids = [f"5a1c0e6e-0000-4000-8000-0000000re{n:03d}" for n in range(3)]
    for n, uuid in enumerate(uuids):
        params = {"EventName": "SessionTimeout", "SessionUUID": uuid, "EventTimestamp": f"2026-11-20 10:0{n}:00"}
        assert store_callback(app, "session", params) == "recorded"
    settle(app)
    with engine.begin() as conn:  # two of them stored failed, as older code left some
        ids = conn.execute(text("SELECT id FROM callback_inbox ORDER BY id")).scalars().all()
        conn.execute(text("UPDATE callback_inbox SET status = 'failed', error = 'stranded' WHERE id <> :id"),
                     {"id": ids[0]})

    def rows():
        with engine.connect() as conn:
            return conn.execute(text("SELECT id, status, error, attempts FROM callback_inbox ORDER BY id")).all()

    before = rows()
    runner = app.test_cli_runner()
    # One of the failed ones:
    result = runner.invoke(args=["callbacks", "replay", "--id", str(ids[1]), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"recorded": 1}
    assert rows() == [before[0], (ids[1], "recorded", None, before[1].attempts + 1), before[2]]

    before = rows()
    # A recorded one: read again too.
    result = runner.invoke(args=["callbacks", "replay", "--id", str(ids[0]), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"recorded": 1}
    assert rows() == [(ids[0], "recorded", None, before[0].attempts + 1), before[1], before[2]]
