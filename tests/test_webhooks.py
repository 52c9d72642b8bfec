"""Plivo's callbacks through the real route, signed by the sandbox exactly as Plivo signs them."""

from __future__ import annotations

import json
import random
import threading
from decimal import Decimal
from urllib.parse import urlencode

import pytest
import requests
from sqlalchemy import text

from webhook_service import create_app
from webhook_service.plivo.signature import MA_SIGNATURE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, compute_signature
from webhook_service.services.reporting import kept_totals, recount
from webhook_service.settings import SANDBOX_AUTH_TOKEN

from .helpers import (
    API_TOKEN,
    FIRST,
    SECOND,
    LiveServer,
    free_port,
    make_settings,
    settle,
    signed_headers,
    unavailable_database_url,
    writes_refused,
)

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


# Helpers --------------------------------------------------------------------------------------


def create_session(live, **body) -> str:
    response = requests.post(live.url + "/v1/sessions", headers=AUTH, timeout=10,
                             json={"first_party": FIRST, "second_party": SECOND} | body)
    assert response.status_code == 201, response.text
    return response.json()["session_uuid"]


def play(sandbox, session_uuid: str, **options) -> dict:
    response = requests.post(f"{sandbox.url}/sandbox/sessions/{session_uuid}/calls", json=options, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def send(callback: dict, *, fresh_nonce: bool = False) -> requests.Response:
    """Deliver a signed callback as the sandbox made it; `fresh_nonce`: re-signed as Plivo redelivers."""
    headers = dict(callback["headers"])
    if fresh_nonce:
        headers |= signed_headers(callback["method"], callback["url"], callback["params"])
    return requests.request(callback["method"], callback["url"], data=callback["body"].encode() or None,
                            headers=headers, timeout=10)


def snapshot(live, engine, session_uuid: str) -> dict:
    """Everything the callbacks determine, once projected, in a form that compares across runs."""
    settle(live.app)
    with engine.connect() as conn:
        session = conn.execute(text(
            "SELECT id, status, call_count, answered_call_count, billed_duration, amount, recording_count, "
            "last_interaction_at, virtual_number, expired_at FROM masking_sessions WHERE session_uuid = :u"
        ), {"u": session_uuid}).mappings().one()
        legs = conn.execute(text(
            "SELECT party, initiated_at, ringing_at, answered_at, ended_at, end_event, duration, billed_duration, "
            "amount, hangup_cause, hangup_cause_code, from_number, to_number FROM call_legs WHERE session_id = :id "
            "ORDER BY party, ended_at NULLS LAST"), {"id": session["id"]}).all()
        recordings = conn.execute(text(
            "SELECT recording_uuid, status, recording_url, resource_url, duration FROM recordings "
            "WHERE session_id = :id ORDER BY recording_uuid"), {"id": session["id"]}).all()
        daily = conn.execute(text(
            "SELECT day, sum(call_legs), sum(answered_legs), sum(billed_duration), sum(amount), sum(recordings), "
            "sum(sessions_with_calls) FROM daily_call_totals GROUP BY day HAVING sum(call_legs) <> 0 "
            "OR sum(recordings) <> 0 ORDER BY day")).all()
    return {"session": {k: v for k, v in session.items() if k != "id"}, "legs": legs,
            "recordings": recordings, "daily": daily}


def assert_daily_totals_match_a_recount(engine) -> None:
    """The totals kept by deltas equal a full recount from the legs and recordings."""
    with engine.connect() as conn:
        kept, recounted = kept_totals(conn), recount(conn)
    assert kept == recounted and kept


def forget_callbacks(engine, session_uuid: str) -> None:
    """Put the session back as it was before any callback (to deliver them again differently)."""
    with engine.begin() as conn:
        for table in ("callback_inbox", "callback_facts", "projection_queue", "call_legs", "recordings",
                      "daily_call_totals", "virtual_number_history"):
            conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text(
            "UPDATE masking_sessions SET status = 'active', expired_at = NULL, call_count = 0, "
            "answered_call_count = 0, billed_duration = 0, amount = 0, recording_count = 0, "
            "last_interaction_at = NULL WHERE session_uuid = :u"), {"u": session_uuid})


def inbox_rows(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(text("SELECT event_name, status, error FROM callback_inbox ORDER BY id")).all()


def several_calls(sandbox, session_uuid: str, vocabulary: str = "legacy") -> list[dict]:
    """Four calls' signed callbacks, not delivered: answered and not, either party calling."""
    callbacks = []
    for caller, answered, duration in [("first", True, 30), ("second", True, 95), ("first", False, 0),
                                       ("second", True, 5)]:
        callbacks += play(sandbox, session_uuid, vocabulary=vocabulary, caller=caller, answered=answered,
                          duration=max(duration, 1), deliver=False)["callbacks"]
        requests.post(f"{sandbox.url}/sandbox/clock", json={"advance": 600}, timeout=5)
    return callbacks


# A full call, in each vocabulary --------------------------------------------------------------


@pytest.mark.parametrize("vocabulary", ["legacy", "latest"])
@pytest.mark.parametrize("encoding", ["form", "json"])
def test_a_full_call_gives_the_right_legs_counters_and_recording(live, sandbox, engine, vocabulary, encoding):
    uuid = create_session(live, record=True)
    result = play(sandbox, uuid, vocabulary=vocabulary, encoding=encoding, duration=75)
    assert [c["status"] for c in result["callbacks"]] == [200] * len(result["callbacks"])
    plivo = result["session"]  # the sandbox keeps Plivo's own totals for the session

    body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
    assert body["call_count"] == plivo["total_call_count"] == 2
    assert body["answered_call_count"] == 2
    assert body["billed_duration"] == plivo["total_call_billed_duration"] == 240  # two legs, 2 started minutes each
    assert Decimal(body["amount"]) == Decimal(str(plivo["total_call_amount"]))
    assert body["recording_count"] == 1
    assert body["last_interaction_at"] is not None
    legs = {leg["party"]: leg for leg in body["call_legs"]}
    assert set(legs) == {"first", "second"}
    assert legs["second"]["answered_at"] and legs["second"]["ended_at"] and legs["second"]["duration"] == 75
    assert legs["second"]["hangup_cause"] == "NORMAL_CLEARING"
    assert legs["first"]["from_number"] == FIRST and legs["first"]["to_number"] == SECOND
    [recording] = body["recordings"]
    sent = [c["params"] for c in result["callbacks"] if c["params"]["EventName"] == "SessionRecordingCompleted"][0]
    assert recording["status"] == "completed" and recording["recording_uuid"] == sent["RecordingUUID"]
    assert recording["resource_url"] == sent["RecordingResourceURL"]
    assert recording["recording_url"] == sent.get("RecordingURL")  # the latest vocabulary sends none
    assert {r.status for r in inbox_rows(engine)} == {"recorded"}
    assert_daily_totals_match_a_recount(engine)


def test_an_unanswered_call_counts_legs_but_bills_only_the_caller(live, sandbox):
    uuid = create_session(live, record=True)
    plivo = play(sandbox, uuid, vocabulary="latest", answered=False)["session"]
    body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
    legs = {leg["party"]: leg for leg in body["call_legs"]}
    assert body["call_count"] == plivo["total_call_count"] == 2
    assert legs["second"]["end_event"] == "failed" and legs["second"]["answered_at"] is None
    assert legs["second"]["billed_duration"] == 0
    assert body["billed_duration"] == plivo["total_call_billed_duration"]
    assert body["recording_count"] == 0 and body["answered_call_count"] == 1


# Exactly once, in any order, under concurrency ------------------------------------------------


def test_every_callback_sent_three_times_counts_once(live, sandbox, engine):
    uuid = create_session(live, record=True)
    callbacks = several_calls(sandbox, uuid)
    for callback in callbacks:
        assert send(callback).json() == {"status": "recorded"}
    once = snapshot(live, engine, uuid)
    assert once["session"]["call_count"] == 8
    for fresh_nonce in (False, True):  # the same request again, then Plivo's redelivery with a new nonce
        for callback in callbacks:
            response = send(callback, fresh_nonce=fresh_nonce)
            assert response.status_code == 200 and response.json() == {"status": "duplicate"}
    assert snapshot(live, engine, uuid) == once
    assert len(inbox_rows(engine)) == len(callbacks)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM callback_facts")).scalar() == len(callbacks)


def test_a_redelivery_with_a_new_nonce_is_still_a_duplicate(live, sandbox, engine):
    uuid = create_session(live)
    [first, *_] = play(sandbox, uuid, deliver=False)["callbacks"]
    assert send(first).json() == {"status": "recorded"}
    nonce = "98765432109876543210"
    again = dict(first, headers=dict(first["headers"]) | {
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: compute_signature("POST", first["url"], first["params"], nonce, SANDBOX_AUTH_TOKEN),
    })
    assert send(again).json() == {"status": "duplicate"}


@pytest.mark.parametrize("vocabulary", ["legacy", "latest"])
def test_shuffled_orders_give_the_same_result_as_the_natural_order(live, sandbox, engine, vocabulary):
    uuid = create_session(live, record=True)
    callbacks = several_calls(sandbox, uuid, vocabulary)
    for callback in callbacks:
        send(callback)
    natural = snapshot(live, engine, uuid)
    assert natural["session"]["call_count"] == 8 and len(natural["legs"]) == 8
    orders = [list(reversed(callbacks))] + [random.Random(seed).sample(callbacks, len(callbacks)) for seed in range(4)]
    for order in orders:
        forget_callbacks(engine, uuid)
        for callback in order:
            assert send(callback).status_code == 200
        assert snapshot(live, engine, uuid) == natural
        assert_daily_totals_match_a_recount(engine)


def test_eight_threads_delivering_the_same_callbacks_give_exact_totals(live, sandbox, engine):
    uuid = create_session(live, record=True)
    callbacks = several_calls(sandbox, uuid)
    for callback in callbacks:
        send(callback)
    natural = snapshot(live, engine, uuid)
    forget_callbacks(engine, uuid)

    barrier = threading.Barrier(8)
    statuses: list[int] = []

    def worker(seed: int) -> None:
        order = random.Random(seed).sample(callbacks, len(callbacks))
        barrier.wait()
        with requests.Session() as http:
            for callback in order:
                response = http.request(callback["method"], callback["url"], data=callback["body"].encode(),
                                        headers=callback["headers"], timeout=30)
                statuses.append(response.status_code)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * (8 * len(callbacks))
    assert snapshot(live, engine, uuid) == natural
    assert_daily_totals_match_a_recount(engine)
    assert [r.status for r in inbox_rows(engine)] == ["recorded"] * len(callbacks)


# Verification and bad input: nothing stored ---------------------------------------------------


def _one_callback(sandbox, live) -> dict:
    return play(sandbox, create_session(live), deliver=False)["callbacks"][0]


@pytest.mark.parametrize("tamper", [
    "bad_signature", "missing_signature", "missing_nonce", "wrong_token", "changed_param", "other_path",
])
def test_unverifiable_callbacks_get_403_and_nothing_is_stored(live, sandbox, engine, tamper):
    callback = _one_callback(sandbox, live)
    failures_before = signature_failures(live)
    headers = dict(callback["headers"])
    body, url = callback["body"], callback["url"]
    # Plivo sends two signatures (V3 and Ma-V3) and either one is enough: a forger must beat both.
    if tamper == "bad_signature":
        headers[SIGNATURE_HEADER] = headers[MA_SIGNATURE_HEADER] = "bm90IGEgc2lnbmF0dXJl"
    elif tamper == "missing_signature":
        del headers[SIGNATURE_HEADER], headers[MA_SIGNATURE_HEADER]
    elif tamper == "missing_nonce":
        del headers[NONCE_HEADER]
    elif tamper == "wrong_token":
        headers[SIGNATURE_HEADER] = headers[MA_SIGNATURE_HEADER] = compute_signature(
            "POST", url, callback["params"], headers[NONCE_HEADER], "someone-elses-token")
    elif tamper == "changed_param":
        body = urlencode(callback["params"] | {"BilledDuration": "9999"})
    else:
        url = url.replace("/webhooks/plivo/session", "/webhooks/plivo/recording")
    response = requests.post(url, data=body, headers=headers, timeout=10)
    assert response.status_code == 403
    assert response.json()["error"] in ("signature_missing", "signature_invalid")
    assert inbox_rows(engine) == []
    assert signature_failures(live) == failures_before + 1


def signature_failures(live) -> float:
    """plivo_signature_failures_total as /metrics reports it now."""
    metrics = requests.get(live.url + "/metrics", timeout=5).text
    [value] = [line.split()[1] for line in metrics.splitlines() if line.startswith("plivo_signature_failures_total ")]
    return float(value)


def _signed(live, params: dict, *, path="/webhooks/plivo/session", method="POST", token=SANDBOX_AUTH_TOKEN,
            body: bytes | None = None, content_type="application/x-www-form-urlencoded") -> requests.Response:
    url = live.url + path
    headers = signed_headers(method, url, params, token=token)
    if method == "GET":
        return requests.get(url, params=params, headers=headers, timeout=10)
    headers["Content-Type"] = content_type
    return requests.post(url, data=body if body is not None else urlencode(params), headers=headers, timeout=10)


def test_garbage_json_body_is_400_and_nothing_is_stored(live, engine):
    for body in (b"{not json", b"[1, 2, 3]", b"\xff\xfe", b"[" * 5000 + b"]" * 5000):
        response = _signed(live, {}, body=body, content_type="application/json")
        assert response.status_code == 400, body[:20]
        assert response.json()["error"] == "invalid_body"
    assert inbox_rows(engine) == []


def test_oversized_body_is_413_and_nothing_is_stored(live, engine):
    response = _signed(live, {"EventName": "SessionTimeout", "Padding": "x" * 70_000})
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert inbox_rows(engine) == []


def test_unknown_event_is_stored_and_marked_ignored(live, engine):
    params = {"EventName": "SessionSomethingNew", "SessionUUID": "5a1c0e6e-0000-4000-8000-000000000001",
              "EventTimestamp": "2026-11-20 10:00:00"}
    response = _signed(live, params)
    assert response.status_code == 200 and response.json() == {"status": "ignored"}
    assert inbox_rows(engine) == [("SessionSomethingNew", "ignored", None)]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM masking_sessions")).scalar() == 0


def test_callback_for_an_unknown_session_creates_it_as_discovered(live, engine):
    params = {"EventName": "SessionFirstPartyHangup", "SessionUUID": "5a1c0e6e-0000-4000-8000-000000000002",
              "EventTimestamp": "2026-11-20 10:00:30", "From": FIRST, "To": SECOND, "VirtualNumber": "+16505550199",
              "Duration": "30", "BilledDuration": "60", "Amount": "0.00850", "PlivoHangupCause": "NORMAL_CLEARING",
              "PlivoHangupCauseCode": "4000", "SequenceNumber": "3"}
    assert _signed(live, params).json() == {"status": "recorded"}
    body = requests.get(f"{live.url}/v1/sessions/{params['SessionUUID']}", headers=AUTH, timeout=10).json()
    assert body["origin"] == "callback" and body["virtual_number"] == "+16505550199"
    assert body["call_count"] == 1 and body["billed_duration"] == 60 and body["amount"] == "0.00850"


# Each leg's (Duration, BilledDuration, Amount) as sent, and what must be kept of them (None: dropped).
BILLING_VALUES = [
    (("60", "60", "0.00850"), (60, 60, "0.00850")),
    (("-1", "-60", "0.00850"), (None, None, "0.00850")),  # negative seconds: dropped (Duration=-1)
    (("60.5", "60.5", "0.00425"), (None, None, "0.00425")),  # not a whole number of seconds: dropped, not 60
    (("1e12", "1e12", "1e12"), (None, None, None)),  # out of range
    (("99999999999", "99999999999", "99999999999"), (None, None, None)),
    (("abc", "abc", "abc"), (None, None, None)),  # not numbers
    (("NaN", "NaN", "NaN"), (None, None, None)),
    (("-0", "6E1", "0.01700"), (0, 60, "0.01700")),  # odd spellings of whole numbers are numbers
    (("95", "120", "0.01700"), (95, 120, "0.01700")),
    (("30", "60", "-0.00850"), (30, 60, None)),  # a negative charge: dropped
]


def test_billing_values_out_of_range_fractional_or_not_numbers_are_dropped_from_the_totals(live, sandbox, engine):
    """docs/security.md: a bad Duration, BilledDuration or Amount is "unknown", never counted; the
    rest of the callback applies (its leg counts, with the values that were good)."""
    uuid = create_session(live)
    for i, ((duration, billed, amount), _) in enumerate(BILLING_VALUES):
        party = "First" if i % 2 == 0 else "Second"
        params = {"EventName": f"Session{party}PartyHangup", "SessionUUID": uuid,
                  "EventTimestamp": f"2026-11-20 10:{i:02d}:30", "From": FIRST, "To": SECOND,
                  "Duration": duration, "BilledDuration": billed, "Amount": amount,
                  "PlivoHangupCause": "NORMAL_CLEARING", "PlivoHangupCauseCode": "4000"}
        assert _signed(live, params).json() == {"status": "recorded"}, params
    body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
    kept = [kept for _, kept in BILLING_VALUES]
    legs = sorted(body["call_legs"], key=lambda leg: leg["ended_at"])
    assert [(leg["duration"], leg["billed_duration"], leg["amount"]) for leg in legs] == kept
    assert body["call_count"] == len(BILLING_VALUES)
    billed = sum(b for _, b, _ in kept if b is not None)
    amount = sum(Decimal(a) for _, _, a in kept if a is not None)
    assert (body["billed_duration"], Decimal(body["amount"])) == (billed, amount) == (300, Decimal("0.05525"))
    with engine.connect() as conn:
        daily = conn.execute(text(
            "SELECT day::text, sum(call_legs), sum(answered_legs), sum(billed_duration), sum(amount),"
            " sum(sessions_with_calls) FROM daily_call_totals GROUP BY day")).all()
    assert [tuple(row) for row in daily] == [
        ("2026-11-20", len(BILLING_VALUES), 0, billed, amount, 1)]
    assert_daily_totals_match_a_recount(engine)


def test_callbacks_come_by_the_configured_method_only(live, database_url, sandbox, engine):
    params = {"EventName": "SessionTimeout", "SessionUUID": "5a1c0e6e-0000-4000-8000-000000000003",
              "EventTimestamp": "2026-11-20 11:00:00", "VirtualNumber": "+16505550199", "SequenceNumber": "9"}
    refused = _signed(live, params, method="GET")  # POST is configured: a GET, even signed, is refused
    assert refused.status_code == 405 and refused.headers["Allow"] == "POST" and inbox_rows(engine) == []
    port = free_port()
    settings = make_settings(sandbox.url, f"http://127.0.0.1:{port}", CALLBACK_METHOD="GET")
    server = LiveServer(create_app({"TESTING": True, "settings": settings, "database_url": database_url}), port)
    server.start()
    try:
        assert _signed(server, params, method="GET").json() == {"status": "recorded"}
        assert _signed(server, params, method="POST").status_code == 405
        head = requests.head(server.url + "/webhooks/plivo/session", params=params,
                             headers=signed_headers("GET", server.url + "/webhooks/plivo/session", params), timeout=10)
        assert head.status_code == 405
    finally:
        server.stop()
    assert inbox_rows(engine) == [("SessionTimeout", "recorded", None)]


def test_a_callback_signed_with_the_previous_token_is_accepted_during_rotation(database_url, sandbox, engine):
    port = free_port()
    settings = make_settings(sandbox.url, f"http://127.0.0.1:{port}", PLIVO_AUTH_TOKEN="brand-new-token,old-token")
    server = LiveServer(create_app({"TESTING": True, "settings": settings, "database_url": database_url}), port)
    server.start()
    try:
        params = {"EventName": "SessionTimeout", "SessionUUID": "5a1c0e6e-0000-4000-8000-000000000004",
                  "EventTimestamp": "2026-11-20 11:00:00"}
        assert _signed(server, params, token="old-token").status_code == 200
        assert _signed(server, params | {"SequenceNumber": "2"}, token="brand-new-token").status_code == 200
        assert _signed(server, params | {"SequenceNumber": "3"}, token=SANDBOX_AUTH_TOKEN).status_code == 403
    finally:
        server.stop()


def test_database_down_gives_503_quickly_and_stores_nothing(sandbox, engine):
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url, "http://localhost"),
                      "database_url": unavailable_database_url()})
    params = {"EventName": "SessionTimeout", "SessionUUID": "5a1c0e6e-0000-4000-8000-000000000005"}
    nonce = "1"
    url = "http://localhost/webhooks/plivo/session"
    response = app.test_client().post("/webhooks/plivo/session", data=params, headers={
        NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature("POST", url, params, nonce, SANDBOX_AUTH_TOKEN)})
    assert response.status_code == 503
    assert response.get_json()["error"] == "database_unavailable"
    assert inbox_rows(engine) == []


# Status, number changes -----------------------------------------------------------------------


def test_session_timeout_expires_the_session_and_late_calls_do_not_revive_it(live, sandbox, engine):
    uuid = create_session(live)
    call = play(sandbox, uuid, deliver=False)["callbacks"]
    timeout = requests.post(f"{sandbox.url}/sandbox/sessions/{uuid}/timeout", json={"deliver": False},
                            timeout=10).json()["callbacks"]
    for callback in timeout + call:  # the timeout arrives before the call's (earlier) events
        assert send(callback).status_code == 200
    body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
    assert body["status"] == "expired" and body["expired_at"] is not None
    assert body["call_count"] == 2


def test_virtual_number_replacement_keeps_the_old_number_in_history(live, sandbox, engine):
    uuid = create_session(live)
    original = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()["virtual_number"]
    requests.post(f"{sandbox.url}/sandbox/clock", json={"advance": 5}, timeout=5)  # callbacks carry whole seconds
    first = requests.post(f"{sandbox.url}/sandbox/sessions/{uuid}/replace-number", json={"deliver": False},
                          timeout=10).json()["callbacks"]
    requests.post(f"{sandbox.url}/sandbox/clock", json={"advance": 60}, timeout=5)
    second = requests.post(f"{sandbox.url}/sandbox/sessions/{uuid}/replace-number", json={"deliver": False},
                           timeout=10).json()["callbacks"]
    newest = second[0]["params"]["VirtualNumber"]
    for callback in second + first:  # the newer replacement arrives first
        assert send(callback).status_code == 200
    body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
    assert body["virtual_number"] == newest
    history = [h["virtual_number"] for h in body["virtual_number_history"]]
    assert history == [original, first[0]["params"]["VirtualNumber"], newest]


# Failure, then replay -------------------------------------------------------------------------


def test_a_projection_that_fails_keeps_the_session_due_until_it_succeeds(live, sandbox, engine):
    uuid = create_session(live, record=True)
    callbacks = several_calls(sandbox, uuid)
    # Break the projection for real: the database refuses new legs for a while.
    with writes_refused(engine, "call_legs", "'legs are refused for this test'"):
        # Plivo is answered all the same: the callbacks are stored, their facts too.
        assert {send(callback).json()["status"] for callback in callbacks} == {"recorded"}
        body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
        assert body["projection_pending"] is True and body["call_count"] == 0 and body["call_legs"] == []
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM projection_queue")).scalar() == len(callbacks)
    live.app.extensions["webhook_service"].projector._failed_until.clear()  # no waiting for the retry delay
    body = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
    assert body["projection_pending"] is False and body["call_count"] == 8
    fixed = snapshot(live, engine, uuid)
    assert_daily_totals_match_a_recount(engine)
    forget_callbacks(engine, uuid)  # the same callbacks delivered cleanly give the same record
    for callback in callbacks:
        send(callback)
    assert snapshot(live, engine, uuid) == fixed


def test_replay_reads_failed_callbacks_again_and_projects_them(live, sandbox, engine, app):
    """A callback stored as failed (read by older code, or with a value it could not read) is read again."""
    uuid = create_session(live, record=True)
    result = play(sandbox, uuid, deliver=False, duration=75)
    callbacks, plivo = result["callbacks"], result["session"]
    [stranded] = [c for c in callbacks if c["params"]["EventName"] == "SessionFirstPartyHangup"]
    for callback in callbacks:
        if callback is not stranded:
            assert send(callback).json() == {"status": "recorded"}
    with engine.begin() as conn:  # as revision 0006 leaves a callback stored but never applied before it
        conn.execute(text(
            "INSERT INTO callback_inbox (endpoint, method, params, dedupe_key, event_name, session_uuid, status, error)"
            " VALUES ('session', 'POST', CAST(:params AS jsonb), 'pre-0006', :name, :uuid, 'failed', 'stranded')"
        ), {"params": json.dumps(stranded["params"]), "name": stranded["params"]["EventName"], "uuid": uuid})
    before = snapshot(live, engine, uuid)
    assert before["session"]["billed_duration"] < plivo["total_call_billed_duration"]
    result = app.test_cli_runner().invoke(args=["callbacks", "replay", "--failed", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"recorded": 1}
    after = snapshot(live, engine, uuid)
    assert after["session"]["billed_duration"] == plivo["total_call_billed_duration"]
    assert {r.status for r in inbox_rows(engine)} == {"recorded"}
    again = app.test_cli_runner().invoke(args=["callbacks", "replay", "--since", "2000-01-01"])
    assert again.exit_code == 0, again.output
    assert snapshot(live, engine, uuid) == after  # replaying everything again changes nothing
    assert_daily_totals_match_a_recount(engine)
