"""Reconciliation against the sandbox's record of each session (Plivo's GET session)."""

from __future__ import annotations

import random
import re
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlencode

import requests
from sqlalchemy import event, text

from plivo_sandbox.server import SandboxServer
from webhook_service.plivo.client import PlivoClient
from webhook_service.plivo.signature import NONCE_HEADER, SIGNATURE_HEADER, compute_signature
from webhook_service.services.reconcile import RateLimiter, apply_plivo_session, reconcile, reconcile_every
from webhook_service.settings import SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN

from .helpers import free_port, settle, wait_for_lock, writes_held
from .test_webhooks import (
    AUTH,
    assert_daily_totals_match_a_recount,
    create_session,
    forget_callbacks,
    inbox_rows,
    play,
    send,
    snapshot,
)


def ctx_of(live):
    return live.app.extensions["webhook_service"]


def session_row(live, engine, uuid: str):
    settle(live.app)
    with engine.connect() as conn:
        query = text("SELECT * FROM masking_sessions WHERE session_uuid = :u")
        return conn.execute(query, {"u": uuid}).mappings().one()


def legs_of(live, engine, uuid: str):
    settle(live.app)
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT l.party, l.source, l.call_uuid, l.billed_duration, l.ended_at FROM call_legs l "
            "JOIN masking_sessions s ON s.id = l.session_id WHERE s.session_uuid = :u ORDER BY l.party"
        ), {"u": uuid}).all()


def test_reconciliation_fills_a_missed_leg_and_a_missed_recording(live, sandbox, engine):
    uuid = create_session(live, record=True)
    result = play(sandbox, uuid, deliver=False, duration=70)
    plivo = result["session"]
    missed = {"SessionSecondPartyHangup", "SessionRecordingInitiated", "SessionRecordingCompleted"}
    late = [c for c in result["callbacks"] if c["params"]["EventName"] in missed]
    for callback in result["callbacks"]:
        if callback not in late:
            assert send(callback).status_code == 200
    before = session_row(live, engine, uuid)
    assert before["billed_duration"] < plivo["total_call_billed_duration"] and before["recording_count"] == 0

    report = reconcile(ctx_of(live))
    assert report.checked == 1 and report.changed == 1 and report.drift == 0
    after = session_row(live, engine, uuid)
    assert after["call_count"] == plivo["total_call_count"] == 2
    assert after["billed_duration"] == plivo["total_call_billed_duration"] == after["plivo_billed_duration"]
    assert after["amount"] == Decimal(str(plivo["total_call_amount"])) == after["plivo_amount"]
    assert after["recording_count"] == 1 and after["answered_call_count"] == 2
    legs = legs_of(live, engine, uuid)
    assert [(leg.party, leg.source) for leg in legs] == [("first", "callback"), ("second", "reconcile")]
    interaction = plivo["interaction"][0]
    assert {leg.call_uuid for leg in legs} == {
        interaction["first_party_resource_url"].rstrip("/").rsplit("/", 1)[1],
        interaction["second_party_resource_url"].rstrip("/").rsplit("/", 1)[1],
    }
    with engine.connect() as conn:
        recording = conn.execute(text("SELECT recording_uuid, status, resource_url FROM recordings")).one()
    assert recording.status == "completed" and recording.resource_url == interaction["recording_resource_url"]

    # The missed callbacks arrive after all: they complete the record and count nothing twice.
    for callback in late:
        assert send(callback).status_code == 200
    final = session_row(live, engine, uuid)
    assert (final["call_count"], final["billed_duration"], final["amount"], final["recording_count"]) == (
        after["call_count"], after["billed_duration"], after["amount"], after["recording_count"])
    assert [(leg.party, leg.source) for leg in legs_of(live, engine, uuid)] == [
        ("first", "callback"), ("second", "callback")]
    assert_daily_totals_match_a_recount(engine)
    assert reconcile(ctx_of(live)).drift == 0


def test_sessions_past_their_expiry_are_marked_expired_without_a_timeout_callback(live, sandbox, engine):
    uuid = create_session(live, session_expiry=600)
    expires_at = session_row(live, engine, uuid)["expires_at"]
    report = reconcile(ctx_of(live), now=expires_at + timedelta(minutes=1))
    assert report.marked_expired == 1
    row = session_row(live, engine, uuid)
    assert row["status"] == "expired" and row["expired_at"] == expires_at
    # Not before its time: a fresh session stays active.
    other = create_session(live, second_party="+14155552671")
    reconcile(ctx_of(live))
    assert session_row(live, engine, other)["status"] == "active"


def test_drift_against_plivos_totals_is_recorded(live, sandbox, engine):
    uuid = create_session(live)
    callbacks = play(sandbox, uuid, deliver=False)["callbacks"]
    for callback in callbacks:
        params = dict(callback["params"])
        if params["EventName"] == "SessionFirstPartyHangup":
            params["Amount"] = "0.50000"  # a charge that disagrees with what Plivo settles on
            nonce = "55555555555555555555"
            callback = dict(callback, body=urlencode(params), headers=dict(callback["headers"]) | {
                NONCE_HEADER: nonce,
                SIGNATURE_HEADER: compute_signature("POST", callback["url"], params, nonce, SANDBOX_AUTH_TOKEN)})
        assert send(callback).status_code == 200
    report = reconcile(ctx_of(live))
    assert report.drift == 1
    row = session_row(live, engine, uuid)
    assert row["amount"] - row["plivo_amount"] == Decimal("0.50000") - Decimal("0.00850")
    assert row["call_count"] == row["plivo_call_count"] and row["reconciled_at"] is not None


def test_callbacks_and_reconciliation_racing_count_nothing_twice(live, sandbox, engine):
    uuids, callbacks = [], []
    for i in range(4):
        uuid = create_session(live, record=True, second_party=f"+1415555267{i}")
        uuids.append(uuid)
        for answered in (True, False):
            callbacks += play(sandbox, uuid, deliver=False, answered=answered)["callbacks"]
            requests.post(f"{sandbox.url}/sandbox/clock", json={"advance": 300}, timeout=5)
    # Reference: all callbacks in order, then one reconciliation.
    for callback in callbacks:
        send(callback)
    reconcile(ctx_of(live))
    reference = {uuid: snapshot(live, engine, uuid) for uuid in uuids}
    for uuid in uuids:
        forget_callbacks(engine, uuid)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM plivo_interactions"))

    stop = threading.Event()
    reports, failures, statuses = [], [], []

    def reconcile_repeatedly():
        try:
            while not stop.is_set():
                reports.append(reconcile(ctx_of(live), concurrency=4))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    racer = threading.Thread(target=reconcile_repeatedly)
    racer.start()
    try:
        senders = []
        for seed in range(3):
            order = random.Random(seed).sample(callbacks, len(callbacks))
            senders.append(threading.Thread(target=lambda o=order: statuses.extend(
                send(c, fresh_nonce=True).status_code for c in o)))
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
    finally:
        stop.set()
        racer.join()
    assert failures == [] and reports and all(r.errors == 0 for r in reports)
    assert statuses == [200] * (3 * len(callbacks))
    final = reconcile(ctx_of(live))
    assert final.errors == 0 and final.drift == 0
    assert_daily_totals_match_a_recount(engine)
    for uuid in uuids:
        assert snapshot(live, engine, uuid) == reference[uuid]
        row = session_row(live, engine, uuid)
        assert (row["call_count"], row["billed_duration"], row["amount"]) == (
            row["plivo_call_count"], row["plivo_billed_duration"], row["plivo_amount"])


def test_rate_limited_answers_are_retried(live, sandbox, engine):
    uuid = create_session(live)
    requests.post(f"{sandbox.url}/sandbox/faults", json=[
        {"method": "GET", "path_contains": uuid, "status": 429, "retry_after": "0", "times": 2}], timeout=5)
    report = reconcile(ctx_of(live))
    assert report.checked == 1 and report.errors == 0
    log = requests.get(f"{sandbox.url}/sandbox/requests", timeout=5).json()["requests"]
    assert [r["status"] for r in log if r["method"] == "GET" and uuid in r["path"]] == [429, 429, 200]


def test_dropped_connections_to_plivo_are_retried(live, sandbox, engine):
    """The sandbox closes the first two connections of the session's GET without answering."""
    uuid = create_session(live)
    requests.post(f"{sandbox.url}/sandbox/faults", json=[
        {"method": "GET", "path_contains": uuid, "reset": True, "times": 2}], timeout=5).raise_for_status()
    report = reconcile(ctx_of(live))
    assert report.checked == 1 and report.errors == 0
    assert session_row(live, engine, uuid)["reconciled_at"] is not None
    log = requests.get(f"{sandbox.url}/sandbox/requests", timeout=5).json()["requests"]
    assert [r["status"] for r in log if r["method"] == "GET" and uuid in r["path"]] == [None, None, 200]


def test_a_refused_connection_to_plivo_is_retried():
    """Plivo not listening at the first attempt, back by the second: the client's wait between the two
    (its `sleep`) is where the test starts Plivo again, on the same port with the same sessions."""
    port = free_port()
    plivo = SandboxServer(port=port).start()
    session_uuid = plivo.state.create({"first_party": "+14155550100", "second_party": "+14155550123"})["session_uuid"]
    plivo.stop()  # connections to its port are refused now
    waits = []

    def plivo_comes_back(seconds: float) -> None:
        waits.append(seconds)
        plivo.start()

    client = PlivoClient(f"http://127.0.0.1:{port}", SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN, connect_timeout=1,
                         read_timeout=2, sleep=plivo_comes_back)
    try:
        assert client.get_session(session_uuid).session_uuid == session_uuid
    finally:
        plivo.stop()
    assert len(waits) == 1  # one refused attempt, then the answer
    assert [r["status"] for r in plivo.state.request_log()] == [200]


def test_unreachable_plivo_is_counted_as_errors_and_changes_nothing(live, sandbox, engine):
    uuid = create_session(live)
    requests.post(f"{sandbox.url}/sandbox/faults", json=[
        {"method": "GET", "path_contains": uuid, "status": 503}], timeout=5)
    report = reconcile(ctx_of(live))
    assert report.errors == 1 and session_row(live, engine, uuid)["reconciled_at"] is None


def test_rate_limiter_allows_at_most_limit_per_period():
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds

    limiter = RateLimiter(limit=3, period=5.0, clock=lambda: clock[0], sleep=sleep)
    stamps = []
    for _ in range(7):
        limiter.acquire()
        stamps.append(clock[0])
    assert stamps == [0, 0, 0, 5, 5, 5, 10]
    for i, stamp in enumerate(stamps):
        assert sum(1 for s in stamps if stamp - 5 < s <= stamp) <= 3, i


def test_only_sessions_that_can_still_change_are_fetched(live, sandbox, engine):
    active = create_session(live)
    old = create_session(live, second_party="+14155552671")
    with engine.begin() as conn:  # expired long ago and already read settled
        conn.execute(text("UPDATE masking_sessions SET status = 'expired', expired_at = now() - interval '3 days', "
                          "reconciled_at = now() - interval '2 days' WHERE session_uuid = :u"), {"u": old})
    requests.delete(f"{sandbox.url}/sandbox/requests", timeout=5)
    reconcile(ctx_of(live), now=datetime.now(UTC))
    fetched = {r["path"].rstrip("/").rsplit("/", 1)[1]
               for r in requests.get(f"{sandbox.url}/sandbox/requests", timeout=5).json()["requests"]
               if r["method"] == "GET"}
    assert active in fetched and old not in fetched


def test_a_callback_arriving_while_reconciliation_projects_is_counted_once(live, sandbox, engine):
    """Reconciliation is held (by an advisory lock in a trigger) after it has stored Plivo's record of
    the call and while it projects; the second party's own callbacks arrive then. They are recorded at
    once (nothing waits on the session), and the projection after them gives the callback legs with
    Plivo's call UUIDs: the billing counted once, whichever source came first."""
    uuid = create_session(live)
    result = play(sandbox, uuid, deliver=False, duration=70)
    second = [c for c in result["callbacks"] if "SecondParty" in c["params"]["EventName"]]
    for callback in result["callbacks"]:
        if callback not in second:
            assert send(callback).status_code == 200
    plivo_session = ctx_of(live).plivo.get_session(uuid)
    outcomes: dict[str, object] = {}
    with writes_held(engine, "call_legs", 4242) as release:
        reconciliation = threading.Thread(target=lambda: outcomes.update(
            reconciled=apply_plivo_session(ctx_of(live), plivo_session, datetime.now(UTC))))
        reconciliation.start()
        wait_for_lock(engine, "%INSERT INTO call_legs%")  # reconciliation's projection waits in the trigger
        outcomes["during"] = [send(c).json()["status"] for c in second]
        release()
        reconciliation.join(10)
    assert outcomes["during"] == ["recorded"] * len(second)
    assert outcomes["reconciled"][1] is False  # no drift: Plivo's record gave the missing leg's billing
    final = snapshot(live, engine, uuid)  # projects the callbacks that came in meanwhile
    plivo = result["session"]
    assert (final["session"]["call_count"], final["session"]["billed_duration"], final["session"]["amount"]) == (
        plivo["total_call_count"], plivo["total_call_billed_duration"], Decimal(str(plivo["total_call_amount"])))
    assert [(leg.party, leg.source, leg.call_uuid is not None) for leg in legs_of(live, engine, uuid)] == [
        ("first", "callback", True), ("second", "callback", True)]
    assert [row.status for row in inbox_rows(engine)] == ["recorded"] * len(result["callbacks"])
    assert_daily_totals_match_a_recount(engine)


def test_a_session_long_expired_and_reconciled_is_fetched_again_while_a_leg_has_no_end(live, sandbox, engine):
    """The first party's hangup never came: its leg stays open. Long after the session expired and
    was read settled, reconciliation still fetches it, and Plivo's record of the call closes the leg."""
    uuid = create_session(live)
    result = play(sandbox, uuid, deliver=False, duration=70)
    for callback in result["callbacks"]:
        if callback["params"]["EventName"] != "SessionFirstPartyHangup":
            assert send(callback).status_code == 200
    legs = legs_of(live, engine, uuid)
    assert [(leg.party, leg.ended_at is None) for leg in legs] == [("first", True), ("second", False)]
    with engine.begin() as conn:  # expired long ago, and already read settled since
        conn.execute(text("UPDATE masking_sessions SET status = 'expired', expired_at = now() - interval '3 days', "
                          "reconciled_at = now() - interval '2 days' WHERE session_uuid = :u"), {"u": uuid})
    requests.delete(f"{sandbox.url}/sandbox/requests", timeout=5)

    report = reconcile(ctx_of(live), now=datetime.now(UTC))
    fetched = [r["path"] for r in requests.get(f"{sandbox.url}/sandbox/requests", timeout=5).json()["requests"]
               if r["method"] == "GET"]
    assert [path.rstrip("/").rsplit("/", 1)[1] for path in fetched] == [uuid]
    assert report.checked == 1 and report.changed == 1 and report.errors == 0
    legs = legs_of(live, engine, uuid)
    assert [(leg.party, leg.ended_at is not None) for leg in legs] == [("first", True), ("second", True)]
    plivo = result["session"]
    row = session_row(live, engine, uuid)
    assert (row["call_count"], row["billed_duration"]) == (plivo["total_call_count"],
                                                           plivo["total_call_billed_duration"])
    assert row["reconciled_at"] > row["expired_at"]
    # Settled now: the next run leaves it alone.
    requests.delete(f"{sandbox.url}/sandbox/requests", timeout=5)
    reconcile(ctx_of(live), now=datetime.now(UTC))
    assert [r for r in requests.get(f"{sandbox.url}/sandbox/requests", timeout=5).json()["requests"]
            if r["method"] == "GET"] == []


def test_reconcile_every_stops_at_once_while_it_waits_for_its_next_run(live, sandbox):
    """The worker and `sessions reconcile --every` wait between runs on their stop event: a SIGTERM
    (which sets it) ends the wait, not the end of the interval (here an hour)."""
    uuid = create_session(live)
    stop, ran, reports = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=reconcile_every, args=(ctx_of(live), 3600, stop), daemon=True,
                              kwargs={"report": lambda report: (reports.append(report), ran.set())})
    thread.start()
    assert ran.wait(30)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert [(r.checked, r.errors) for r in reports] == [(1, 0)]
    assert len([r for r in sandbox.state.request_log() if r["method"] == "GET" and uuid in r["path"]]) == 1


def test_only_the_projection_writes_a_sessions_status_expiry_and_last_interaction(live, sandbox, engine):
    """Reconciliation, the API's update and expire and the overdue sweep store what they were told
    (Plivo's expiry and last interaction, the API's expire); the projection alone makes the status,
    the time it expired and the last interaction of them, so those rules have one home."""
    ctx = ctx_of(live)
    updates: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if re.match(r"\s*UPDATE masking_sessions\b", statement):
            updates.append(statement.split(" WHERE ")[0])

    event.listen(ctx.db.engine, "before_cursor_execute", seen)
    try:
        overdue = create_session(live, session_expiry=600)
        expired = create_session(live, second_party="+14155552671", session_expiry=1200)
        used = create_session(live, second_party="+14155552672")
        play(sandbox, used)
        patched = requests.patch(f"{live.url}/v1/sessions/{expired}", headers=AUTH, json={"record": True}, timeout=10)
        assert patched.status_code == 200, patched.text
        reconcile(ctx)
        gone = requests.delete(f"{live.url}/v1/sessions/{expired}", headers=AUTH, timeout=10)
        assert gone.status_code == 200 and gone.json()["status"] == "expired", gone.text
        assert reconcile(ctx).errors == 0  # Plivo now says it expired too
        expires_at = session_row(live, engine, overdue)["expires_at"]
        assert reconcile(ctx, now=expires_at + timedelta(minutes=1)).marked_expired == 1
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", seen)
    assert len(updates) >= 5
    assert [u for u in updates if re.search(r"\b(status|expired_at|last_interaction_at)\s*=", u)] == []

    row = session_row(live, engine, overdue)
    assert (row["status"], row["expired_at"]) == ("expired", expires_at)
    row = session_row(live, engine, expired)
    assert row["status"] == "expired" and row["api_expired_at"] is not None and row["plivo_expired_at"] is not None
    assert row["expired_at"] == min(row["api_expired_at"], row["plivo_expired_at"])
    row = session_row(live, engine, used)
    assert row["plivo_last_interaction_at"] is not None and row["status"] == "active"
    assert row["last_interaction_at"] >= row["plivo_last_interaction_at"]
