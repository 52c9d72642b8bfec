"""The internal sessions API, against real Postgres and the sandbox Plivo over HTTP."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select, text

from webhook_service import create_app
from webhook_service.persistence.models import MaskingSession, SessionCreateAttempt
from webhook_service.services.sessions import resolve_pending_attempts

from .helpers import (
    API_TOKEN,
    FIRST,
    SECOND,
    make_settings,
    rows_locked,
    settle,
    signed_headers,
    store_callback,
    trigger_on,
    unavailable_database_url,
)

CREATE_PATH = "/Masking/Session"


def faults(sandbox, *rules):
    requests.post(sandbox.url + "/sandbox/faults", json=list(rules), timeout=5).raise_for_status()


def plivo_requests(sandbox, method: str | None = None, create_only: bool = False) -> list[dict]:
    log = requests.get(sandbox.url + "/sandbox/requests", timeout=5).json()["requests"]
    if method:
        log = [r for r in log if r["method"] == method]
    if create_only:
        log = [r for r in log if r["method"] == "POST" and r["path"].rstrip("/").endswith(CREATE_PATH)]
    return log


def create(client, auth, body=None, **headers):
    return client.post("/v1/sessions", json=body or {"first_party": FIRST, "second_party": SECOND},
                       headers=auth | headers)


def assert_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "message", "details"}
    if code:
        assert body["error"] == code
    return body


# Create -------------------------------------------------------------------------------------


def test_create_session_calls_plivo_with_our_callback_urls_and_stores_the_session(client, auth, sandbox, db):
    response = create(client, auth, {
        "first_party": "14155550100", "second_party": "+1 415 555 0123", "record": True,
        "session_expiry": 600, "external_ref": "order-42", "metadata": {"city": "SF"},
    })
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert body["first_party"] == FIRST and body["second_party"] == SECOND  # normalised to E.164
    assert body["virtual_number"].startswith("+")
    assert body["status"] == "active" and body["origin"] == "api"
    assert body["external_ref"] == "order-42" and body["metadata"] == {"city": "SF"}
    assert body["call_count"] == 0 and body["amount"] == "0.00000"

    sent = plivo_requests(sandbox, create_only=True)
    assert len(sent) == 1
    params = sent[0]["body"]
    assert params["callback_url"] == "http://127.0.0.1:9/webhooks/plivo/session"
    assert params["recording_callback_url"] == "http://127.0.0.1:9/webhooks/plivo/recording"
    assert params["callback_method"] == params["recording_callback_method"] == "POST"
    assert params["record"] is True and params["session_expiry"] == 600

    with db.transaction() as s:
        row = s.scalars(select(MaskingSession)).one()
    assert row.session_uuid == body["session_uuid"]
    assert row.create_params["callback_url"].endswith("/webhooks/plivo/session")
    assert row.expires_at is not None and row.plivo_created_at is not None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"second_party": SECOND}, "first_party"),
        ({"first_party": FIRST}, "second_party"),
        ({"first_party": "not-a-number", "second_party": SECOND}, "first_party"),
        ({"first_party": "+1415555", "second_party": SECOND}, "first_party"),
        ({"first_party": FIRST, "second_party": FIRST}, "second_party"),
        ({"first_party": FIRST, "second_party": SECOND, "record": "yes"}, "record"),
        ({"first_party": FIRST, "second_party": SECOND, "record_file_format": "ogg"}, "record_file_format"),
        ({"first_party": FIRST, "second_party": SECOND, "session_expiry": -5}, "session_expiry"),
        ({"first_party": FIRST, "second_party": SECOND, "session_expiry": "60"}, "session_expiry"),
        ({"first_party": FIRST, "second_party": SECOND, "ring_timeout": True}, "ring_timeout"),
        ({"first_party": FIRST, "second_party": SECOND, "first_party_play_url": "ftp://x/a.mp3"},
         "first_party_play_url"),
        ({"first_party": FIRST, "second_party": SECOND, "generate_pin_length": 3}, "generate_pin_length"),
        ({"first_party": FIRST, "second_party": SECOND, "first_party_pin": "12a4"}, "first_party_pin"),
        ({"first_party": FIRST, "second_party": SECOND, "first_party_pin": "1234", "second_party_pin": 1234},
         "second_party_pin"),
        ({"first_party": FIRST, "second_party": SECOND, "pin_retry": 9}, "pin_retry"),
        ({"first_party": FIRST, "second_party": SECOND, "virtual_number_cooloff_period": 4000},
         "virtual_number_cooloff_period"),
        ({"first_party": FIRST, "second_party": SECOND, "metadata": [1, 2]}, "metadata"),
        ({"first_party": FIRST, "second_party": SECOND, "external_ref": ""}, "external_ref"),
        ({"first_party": FIRST, "second_party": SECOND, "colour": "blue"}, "colour"),
        ({"first_party": FIRST, "second_party": SECOND, "callback_url": "https://evil.example/x"}, "callback_url"),
        ({"first_party": FIRST, "second_party": SECOND, "recording_callback_method": "GET"},
         "recording_callback_method"),
        ({"create_session_with_single_party": True}, "first_party"),
    ],
)
def test_create_rejects_invalid_input_naming_the_field_and_calls_nothing(client, auth, sandbox, db, body, field):
    body_out = assert_error(create(client, auth, body), 400, "invalid_request")
    assert field in body_out["details"]["fields"]
    assert field in body_out["message"] or "fields are invalid" in body_out["message"]
    assert plivo_requests(sandbox) == []
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(SessionCreateAttempt)) == 0


def test_single_party_session_needs_only_one_party(client, auth, sandbox):
    response = create(client, auth, {"first_party": FIRST, "create_session_with_single_party": True})
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["second_party"] is None


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", "null"])
def test_create_rejects_bodies_that_are_not_json_objects(client, auth, raw):
    response = client.post("/v1/sessions", data=raw, headers=auth | {"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request")


def test_create_requires_a_json_content_type(client, auth):
    assert_error(client.post("/v1/sessions", data="first_party=1", headers=auth), 400, "invalid_request")


# Auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-123"}, {"Authorization": f"Basic {API_TOKEN}"},
     {"Authorization": "Bearer "}, {"Authorization": API_TOKEN}],
)
def test_api_requires_a_valid_bearer_token(client, sandbox, headers):
    for method, path in [("post", "/v1/sessions"), ("get", "/v1/sessions"), ("get", "/v1/sessions/x"),
                         ("patch", "/v1/sessions/x"), ("delete", "/v1/sessions/x"), ("post", "/v1/sessions/x/refresh")]:
        response = getattr(client, method)(path, headers=headers, json={"first_party": FIRST})
        assert_error(response, 401, "unauthorized")
        assert "Bearer" in response.headers["WWW-Authenticate"]
    assert plivo_requests(sandbox) == []


def test_every_configured_token_is_accepted(client, sandbox):
    for token in (API_TOKEN, "second-token-2"):
        assert client.get("/v1/sessions", headers={"Authorization": f"Bearer {token}"}).status_code == 200


# Idempotency --------------------------------------------------------------------------------


def test_same_idempotency_key_and_body_returns_first_response_without_calling_plivo_again(client, auth, sandbox):
    first = create(client, auth, None, **{"Idempotency-Key": "k-1"})
    second = create(client, auth, {"second_party": "+14155550123", "first_party": "14155550100"},
                    **{"Idempotency-Key": "k-1"})
    assert first.status_code == second.status_code == 201
    assert second.get_json() == first.get_json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(plivo_requests(sandbox, create_only=True)) == 1


def test_same_idempotency_key_with_a_different_body_is_a_conflict(client, auth, sandbox):
    assert create(client, auth, None, **{"Idempotency-Key": "k-2"}).status_code == 201
    response = create(client, auth, {"first_party": FIRST, "second_party": "+14155552671"},
                      **{"Idempotency-Key": "k-2"})
    assert_error(response, 409, "idempotency_key_reused")
    assert len(plivo_requests(sandbox, create_only=True)) == 1


def test_an_idempotency_key_is_scoped_to_the_token_that_sent_it(client, auth, sandbox, db):
    # Token B sends the key and body token A used: B gets a session of its own, never A's answer.
    other = {"Authorization": "Bearer second-token-2"}
    first = create(client, auth, None, **{"Idempotency-Key": "order-42"})
    second = create(client, other, None, **{"Idempotency-Key": "order-42"})
    assert first.status_code == second.status_code == 201
    assert "Idempotent-Replayed" not in second.headers
    assert second.get_json()["session_uuid"] != first.get_json()["session_uuid"]
    assert len(plivo_requests(sandbox, create_only=True)) == 2
    # Each token's repeat replays its own answer; each token's key conflicts only with its own body.
    again_a, again_b = (create(client, h, None, **{"Idempotency-Key": "order-42"}) for h in (auth, other))
    assert again_a.get_json() == first.get_json() and again_b.get_json() == second.get_json()
    assert again_a.headers["Idempotent-Replayed"] == again_b.headers["Idempotent-Replayed"] == "true"
    assert_error(create(client, other, {"first_party": FIRST, "second_party": "+14155552671"},
                        **{"Idempotency-Key": "order-42"}), 409, "idempotency_key_reused")
    assert len(plivo_requests(sandbox, create_only=True)) == 2
    with db.transaction() as s:  # the caller is stored as an identifier of its token, never the token
        token_ids = s.scalars(select(SessionCreateAttempt.token_id).order_by(SessionCreateAttempt.id)).all()
    assert len(set(token_ids)) == 2 and all(len(t) == 64 for t in token_ids)
    assert not {API_TOKEN, "second-token-2"} & set(token_ids)


def test_every_token_sees_changes_and_expires_every_session(client, auth, sandbox):
    # The trust model (docs/security.md): the tokens are one group of trusted internal callers.
    other = {"Authorization": "Bearer second-token-2"}
    uuid = create(client, auth).get_json()["session_uuid"]
    assert client.get(f"/v1/sessions/{uuid}", headers=other).status_code == 200
    assert [s["session_uuid"] for s in client.get("/v1/sessions", headers=other).get_json()["sessions"]] == [uuid]
    assert client.patch(f"/v1/sessions/{uuid}", headers=other, json={"record": True}).status_code == 200
    assert client.delete(f"/v1/sessions/{uuid}", headers=other).get_json()["status"] == "expired"


def test_racing_requests_with_one_idempotency_key_create_one_session(app, auth, sandbox, db):
    # Plivo answers slowly, so the second request arrives while the first is still waiting.
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "delay": 0.5, "after_effect": True})
    barrier = threading.Barrier(2)

    def send():
        barrier.wait()
        return create(app.test_client(), auth, None, **{"Idempotency-Key": "race"})

    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: send(), range(2)))
    assert [r.status_code for r in responses] == [201, 201]
    assert responses[0].get_json()["session_uuid"] == responses[1].get_json()["session_uuid"]
    assert len(plivo_requests(sandbox, create_only=True)) == 1
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(MaskingSession)) == 1


def test_requests_without_a_key_are_independent(client, auth, sandbox):
    a = create(client, auth).get_json()
    b = create(client, auth, {"first_party": "+14155552671", "second_party": SECOND}).get_json()
    assert a["session_uuid"] != b["session_uuid"]


# Plivo failures -----------------------------------------------------------------------------


def test_plivo_input_error_is_passed_on_as_400(client, auth, sandbox, db):
    error = "Invalid parameter. session_expiry is outside the allowed range"
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "status": 400,
                     "body": {"api_id": "x", "error": error}})
    body = assert_error(create(client, auth), 400, "invalid_request")
    assert "session_expiry is outside the allowed range" in body["message"]
    with db.transaction() as s:
        assert s.scalars(select(SessionCreateAttempt.state)).one() == "failed"
        assert s.scalar(select(func.count()).select_from(MaskingSession)) == 0


def test_plivo_refusal_that_is_not_about_input_is_422(client, auth, sandbox):
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "status": 400,
                     "body": {"api_id": "x", "error": "Number pool exhausted or not available"}})
    body = assert_error(create(client, auth), 422, "plivo_rejected")
    assert "Number pool exhausted" in body["message"]


def test_plivo_server_error_on_create_is_502_and_recorded_as_unknown(client, auth, sandbox, db):
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "status": 500,
                     "body": {"api_id": "x", "error": "Internal server error"}})
    body = assert_error(create(client, auth), 502)
    assert body["details"]["outcome"] == "unknown"
    # Never retried: a 5xx may hide a created session.
    assert len(plivo_requests(sandbox, create_only=True)) == 1
    with db.transaction() as s:
        assert s.scalars(select(SessionCreateAttempt.state)).one() == "unknown"


def test_plivo_unreachable_is_502_and_frees_the_idempotency_key(app, auth, database_url, sandbox):
    settings = make_settings("http://127.0.0.1:9")  # nothing listens on the discard port
    down = create_app({"TESTING": True, "settings": settings, "database_url": database_url})
    body = assert_error(create(down.test_client(), auth, None, **{"Idempotency-Key": "k-down"}), 502,
                        "plivo_unavailable")
    assert "could not be reached" in body["message"]
    # Plivo certainly did nothing, so the same key may be retried once Plivo is back.
    retry = create(app.test_client(), auth, None, **{"Idempotency-Key": "k-down"})
    assert retry.status_code == 201
    down.extensions["webhook_service"].close()


def impatient_app(database_url, sandbox):
    """The app with a short Plivo read timeout, for the tests where the sandbox holds Plivo's answer."""
    settings = make_settings(sandbox.url, PLIVO_READ_TIMEOUT=0.2)
    return create_app({"TESTING": True, "settings": settings, "database_url": database_url})


def test_create_timeout_after_sending_is_504_and_resolved_later_without_a_duplicate(client, auth, app, sandbox, db,
                                                                                    database_url):
    # Plivo creates the session but holds its answer past our read timeout (until the test releases it).
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "delay": 30, "after_effect": True, "times": 1})
    impatient = impatient_app(database_url, sandbox)
    try:
        response = create(impatient.test_client(), auth,
                          {"first_party": FIRST, "second_party": SECOND, "external_ref": "o-7"},
                          **{"Idempotency-Key": "k-timeout"})
        assert sandbox.state.wait_held(1)  # Plivo has not answered: it holds the request until released
    finally:
        sandbox.state.release_held()
        impatient.extensions["webhook_service"].close()
    body = assert_error(response, 504, "plivo_timeout")
    assert body["details"]["outcome"] == "unknown"
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(MaskingSession)) == 0

    counts = resolve_pending_attempts(app.extensions["webhook_service"])
    assert counts == {"recovered": 1}
    with db.transaction() as s:
        row = s.scalars(select(MaskingSession)).one()
        attempt = s.scalars(select(SessionCreateAttempt)).one()
    assert row.external_ref == "o-7" and row.first_party == FIRST
    assert attempt.state == "recovered" and attempt.session_uuid == row.session_uuid

    # The caller's retry with the same key now gets the session, and Plivo was asked once.
    retry = create(client, auth, {"first_party": FIRST, "second_party": SECOND, "external_ref": "o-7"},
                   **{"Idempotency-Key": "k-timeout"})
    assert retry.status_code == 201 and retry.get_json()["session_uuid"] == row.session_uuid
    assert len(plivo_requests(sandbox, create_only=True)) == 1


def test_a_create_whose_connection_drops_after_sending_is_an_unknown_outcome_never_retried(client, auth, sandbox,
                                                                                          db):
    # Plivo creates the session, then the connection drops before its answer: maybe created.
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "reset": True, "after_effect": True, "times": 1})
    body = assert_error(create(client, auth), 504, "plivo_timeout")
    assert body["details"]["outcome"] == "unknown"
    assert [r["status"] for r in plivo_requests(sandbox, create_only=True)] == [None]  # asked once, no answer
    with db.transaction() as s:
        assert s.scalars(select(SessionCreateAttempt.state)).one() == "unknown"


def test_unknown_create_that_plivo_never_made_is_marked_not_found(client, auth, app, sandbox, db):
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "status": 503, "times": 1})
    assert_error(create(client, auth), 502)
    ctx = app.extensions["webhook_service"]
    assert resolve_pending_attempts(ctx, grace=__import__("datetime").timedelta(0)) == {"not_found": 1}
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(MaskingSession)) == 0


def test_reads_are_retried_on_5xx_and_429(client, auth, sandbox):
    uuid = create(client, auth).get_json()["session_uuid"]
    faults(sandbox,
           {"method": "DELETE", "status": 503, "times": 1},
           {"method": "DELETE", "status": 429, "retry_after": "0", "times": 1})
    response = client.delete(f"/v1/sessions/{uuid}", headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(plivo_requests(sandbox, "DELETE")) == 3


# Read, list ---------------------------------------------------------------------------------


def test_get_session_returns_the_stored_row_with_counters(client, auth, sandbox):
    uuid = create(client, auth, {"first_party": FIRST, "second_party": SECOND, "external_ref": "o-1"}
                  ).get_json()["session_uuid"]
    body = client.get(f"/v1/sessions/{uuid}", headers=auth).get_json()
    assert body["session_uuid"] == uuid and body["external_ref"] == "o-1"
    assert {k: body[k] for k in ("call_count", "answered_call_count", "billed_duration", "amount", "recording_count",
                                 "last_interaction_at", "projection_pending", "call_legs", "recordings")} == {
        "call_count": 0, "answered_call_count": 0, "billed_duration": 0, "amount": "0.00000", "recording_count": 0,
        "last_interaction_at": None, "projection_pending": False, "call_legs": [], "recordings": []}
    assert_error(client.get("/v1/sessions/no-such-session", headers=auth), 404, "not_found")


def test_a_session_uuid_matches_whatever_its_case(client, auth, sandbox):
    uuid = create(client, auth).get_json()["session_uuid"]
    shouting = uuid.upper()
    assert shouting != uuid
    assert client.get(f"/v1/sessions/{shouting}", headers=auth).get_json()["session_uuid"] == uuid
    patched = client.patch(f"/v1/sessions/{shouting}", headers=auth, json={"ring_timeout": 30})
    assert patched.status_code == 200, patched.get_data(as_text=True)
    deleted = client.delete(f"/v1/sessions/{uuid.title()}", headers=auth)
    assert deleted.status_code == 200 and deleted.get_json()["status"] == "expired"


NATIONAL = ["4155550100", "(415) 555-0100", "415-555-0100", "415.555.0100"]


@pytest.mark.parametrize("written", NATIONAL)
def test_a_number_without_country_code_is_refused_as_needing_one_without_a_default_region(client, auth, sandbox,
                                                                                           written):
    body = assert_error(create(client, auth, {"first_party": written, "second_party": SECOND}), 400)
    assert body["details"]["fields"] == {
        "first_party": "is not a valid phone number: give it with its country code, e.g. +14155550100"}
    assert plivo_requests(sandbox) == []


@pytest.mark.parametrize("written", NATIONAL)
def test_a_number_without_country_code_is_read_in_the_default_phone_region(database_url, auth, sandbox, written):
    app = create_app({"TESTING": True, "database_url": database_url,
                      "settings": make_settings(sandbox.url, DEFAULT_PHONE_REGION="US")})
    try:
        client = app.test_client()
        response = create(client, auth, {"first_party": written, "second_party": "+44 20 7946 0958"})
        assert response.status_code == 201, response.get_data(as_text=True)
        assert (response.get_json()["first_party"], response.get_json()["second_party"]) == (FIRST, "+442079460958")
        assert plivo_requests(sandbox, create_only=True)[-1]["body"]["first_party"] in (FIRST, FIRST[1:])
        # International forms still read as before, with or without the '+'; the filters read alike.
        assert create(client, auth, {"first_party": "14155550100", "second_party": "442079460959"}
                      ).get_json()["second_party"] == "+442079460959"
        found = client.get("/v1/sessions", headers=auth, query_string={"first_party": written}).get_json()
        assert {s["first_party"] for s in found["sessions"]} == {FIRST}
        assert_error(create(client, auth, {"first_party": "555-0100", "second_party": SECOND}), 400)
    finally:
        app.extensions["webhook_service"].close()


def test_list_filters_and_paginates_with_a_cursor(client, auth, sandbox):
    numbers = ["+14155552671", "+14155552672", "+14155552673", "+14155552674", "+14155552675"]
    uuids = []
    for i, second in enumerate(numbers):
        response = create(client, auth, {"first_party": FIRST, "second_party": second,
                                         "external_ref": "even" if i % 2 == 0 else "odd"})
        assert response.status_code == 201, response.get_data(as_text=True)
        uuids.append(response.get_json()["session_uuid"])

    seen, cursor = [], None
    while True:
        query = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/sessions", headers=auth, query_string=query).get_json()
        seen += [s["session_uuid"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(uuids))  # newest first, each exactly once

    even = client.get("/v1/sessions", headers=auth, query_string={"external_ref": "even"}).get_json()
    assert {s["session_uuid"] for s in even["sessions"]} == {uuids[0], uuids[2], uuids[4]}
    one = client.get("/v1/sessions", headers=auth, query_string={"second_party": "14155552672"}).get_json()
    assert [s["session_uuid"] for s in one["sessions"]] == [uuids[1]]
    assert client.get("/v1/sessions", headers=auth, query_string={"status": "expired"}).get_json()["sessions"] == []
    later = client.get("/v1/sessions", headers=auth, query_string={"created_after": "2999-01-01T00:00:00Z"})
    assert later.get_json()["sessions"] == []
    assert len(client.get("/v1/sessions", headers=auth,
                          query_string={"created_before": "2999-01-01T00:00:00Z"}).get_json()["sessions"]) == 5


@pytest.mark.parametrize("query,field", [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
    ({"status": "open"}, "status"), ({"cursor": "garbage!"}, "cursor"),
    ({"created_after": "yesterday"}, "created_after"), ({"first_party": "12"}, "first_party"),
    ({"order": "asc"}, "order"), ({"external_ref": "x' OR 1=1 --"}, None),
])
def test_list_rejects_bad_filters(client, auth, sandbox, query, field):
    response = client.get("/v1/sessions", headers=auth, query_string=query)
    if field is None:  # a hostile but well-formed value is just a value: no match, no error
        assert response.status_code == 200 and response.get_json()["sessions"] == []
        return
    assert field in assert_error(response, 400, "invalid_request")["details"]["fields"]


def _cursor(raw: str) -> str:
    """A cursor made here, in the form `next_cursor` has (base64url of "time|id"), to forge one."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


ID_RANGE = "is not a cursor this API returned: its id must be a whole number from 1 to 9223372036854775807"


@pytest.mark.parametrize(("raw", "problem"), [
    ("2026-11-20T10:00:00+00:00|9223372036854775808", ID_RANGE),  # 2^63: NumericValueOutOfRange, a 500 before
    ("2026-11-20T10:00:00+00:00|" + "9" * 40, ID_RANGE),
    ("2026-11-20T10:00:00+00:00|0", ID_RANGE),
    ("2026-11-20T10:00:00+00:00|-5", ID_RANGE),
    ("2026-11-20T10:00:00+00:00| 5", ID_RANGE),
    ("2026-11-20T10:00:00+00:00|١٢", ID_RANGE),  # Arabic-Indic digits, which int() reads
    ("2026-11-20T10:00:00|12", "is not a cursor this API returned: its time has no UTC offset"),
    ("yesterday|12", "is not a cursor this API returned"),
    ("2026-11-20T10:00:00+00:00", "is not a cursor this API returned"),
], ids=["2^63", "40 digits", "zero", "negative", "space", "arabic-indic", "no offset", "no time", "no id"])
def test_list_refuses_a_forged_cursor_with_a_precise_400(client, auth, sandbox, raw, problem):
    response = client.get("/v1/sessions", headers=auth, query_string={"cursor": _cursor(raw)})
    assert assert_error(response, 400, "invalid_request")["details"]["fields"] == {"cursor": problem}


@pytest.mark.parametrize("raw", ["2026-11-20T10:00:00+00:00|9223372036854775807", "0001-01-01T00:00:00+14:00|1",
                                 "9999-12-31T23:59:59.999999-14:00|1"], ids=["2^63-1", "year 1", "year 9999"])
def test_list_takes_any_cursor_within_the_ranges(client, auth, sandbox, raw):
    response = client.get("/v1/sessions", headers=auth, query_string={"cursor": _cursor(raw)})
    assert response.status_code == 200 and response.get_json() == {"sessions": [], "next_cursor": None}


# Update, expire -----------------------------------------------------------------------------


def test_update_changes_plivo_and_the_stored_copy(client, auth, sandbox, db):
    uuid = create(client, auth).get_json()["session_uuid"]
    response = client.patch(f"/v1/sessions/{uuid}", headers=auth, json={"session_expiry": 1200, "record": True})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["session_expiry"] == 1200 and body["record"] is True
    sent = [r for r in plivo_requests(sandbox, "POST") if uuid in r["path"]]
    assert sent and sent[-1]["body"]["session_expiry"] == 1200
    with db.transaction() as s:
        row = s.scalars(select(MaskingSession)).one()
    assert row.create_params["session_expiry"] == 1200


@pytest.mark.parametrize("body,field", [
    ({"first_party": "+14155552671"}, "first_party"),   # only in single-party mode
    ({"geomatch": False}, "geomatch"),                   # not updatable on Plivo
    ({"callback_url": "https://x.example/cb"}, "callback_url"),
    ({"session_expiry": "long"}, "session_expiry"),
    ({"nope": 1}, "nope"),
])
def test_update_rejects_fields_plivo_does_not_allow_to_change(client, auth, sandbox, body, field):
    uuid = create(client, auth).get_json()["session_uuid"]
    response = client.patch(f"/v1/sessions/{uuid}", headers=auth, json=body)
    assert field in assert_error(response, 400, "invalid_request")["details"]["fields"]
    assert [r for r in plivo_requests(sandbox, "POST") if uuid in r["path"]] == []


def test_update_of_a_single_party_session_may_add_the_second_party(client, auth, sandbox):
    uuid = create(client, auth, {"first_party": FIRST, "create_session_with_single_party": True}
                  ).get_json()["session_uuid"]
    response = client.patch(f"/v1/sessions/{uuid}", headers=auth, json={"second_party": SECOND})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["second_party"] == SECOND


def test_delete_expires_on_plivo_and_keeps_the_row(client, auth, sandbox, db):
    uuid = create(client, auth).get_json()["session_uuid"]
    response = client.delete(f"/v1/sessions/{uuid}", headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "expired" and body["expired_at"]
    # Idempotent: a second DELETE changes nothing and does not call Plivo again.
    again = client.delete(f"/v1/sessions/{uuid}", headers=auth)
    assert again.status_code == 200 and again.get_json()["expired_at"] == body["expired_at"]
    assert len(plivo_requests(sandbox, "DELETE")) == 1
    assert client.get(f"/v1/sessions/{uuid}", headers=auth).get_json()["status"] == "expired"
    assert_error(client.patch(f"/v1/sessions/{uuid}", headers=auth, json={"ring_timeout": 30}), 409)


def test_plivo_timeout_on_expire_is_504_and_leaves_the_row_active(client, auth, sandbox, db, database_url):
    uuid = create(client, auth).get_json()["session_uuid"]
    faults(sandbox, {"method": "DELETE", "delay": 30})
    impatient = impatient_app(database_url, sandbox)
    try:
        assert_error(impatient.test_client().delete(f"/v1/sessions/{uuid}", headers=auth), 504, "plivo_timeout")
        assert sandbox.state.wait_held(1)  # Plivo has not answered: it holds the request until released
    finally:
        sandbox.state.release_held()
        impatient.extensions["webhook_service"].close()
    with db.transaction() as s:
        assert s.scalars(select(MaskingSession.status)).one() == "active"


# Errors are JSON everywhere -----------------------------------------------------------------


def test_unknown_routes_and_methods_answer_json(client, auth):
    assert_error(client.get("/nope", headers=auth), 404)
    assert_error(client.put("/v1/sessions", headers=auth), 405)


def test_database_down_is_503_json(auth, sandbox):
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url, DB_CONNECT_TIMEOUT=1),
                      "database_url": unavailable_database_url()})
    client = app.test_client()
    assert_error(client.get("/v1/sessions", headers=auth), 503, "database_unavailable")
    assert_error(create(client, auth), 503, "database_unavailable")
    assert plivo_requests(sandbox) == []  # nothing is sent to Plivo that we could not record
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def _in_thread(call) -> tuple[threading.Event, dict]:
    """Run `call()` in a thread; the event is set once it has returned (its result in the dict)."""
    done, result = threading.Event(), {}

    def run():
        try:
            result["response"] = call()
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, result


def test_a_request_blocked_on_the_database_answers_503_within_the_statement_timeout(database_url, auth, sandbox,
                                                                                    engine):
    """DB_STATEMENT_TIMEOUT_MS bounds each wait on Postgres: a request blocked on a lock the test holds,
    or on a statement that does not end (an insert held by a trigger until the test opens a gate),
    is answered 503 while the test still holds it, instead of hanging."""
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url, DB_STATEMENT_TIMEOUT_MS=300),
                      "database_url": database_url})
    db = app.extensions["webhook_service"].db
    with db.engine.connect() as conn:  # both pools' connections carry the setting
        assert conn.execute(text("SELECT current_setting('statement_timeout'), current_setting('lock_timeout')")
                            ).one() == ("300ms", "300ms")
    with db.pg() as pg:
        assert pg.execute("SELECT current_setting('statement_timeout')").fetchone() == ("300ms",)
    uuid = "5a1c0e6e-0000-4000-8000-0000000000t0"
    hangup = {"EventName": "SessionFirstPartyHangup", "SessionUUID": uuid, "EventTimestamp": "2026-11-20 10:00:30",
              "BilledDuration": "60"}
    assert store_callback(app, "session", hangup) == "recorded"
    settle(app)
    assert store_callback(app, "session", hangup | {"EventName": "SessionSecondPartyHangup"}) == "recorded"
    try:
        # 1. A read must project its session first (read-your-writes) and waits for the session's lock.
        with rows_locked(engine, f"SELECT 1 FROM masking_sessions WHERE session_uuid = '{uuid}' FOR UPDATE"):
            done, result = _in_thread(lambda: app.test_client().get(f"/v1/sessions/{uuid}", headers=auth))
            assert done.wait(10), "the read still waits for the lock the test holds"
        assert_error(result["response"], 503, "database_unavailable")
        assert result["response"].headers["Retry-After"] == "1"

        # 2. A callback whose insert does not end (no lock involved: the trigger polls a gate).
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE statement_gate (opened boolean)"))
        waits = "WHILE NOT EXISTS (SELECT 1 FROM statement_gate) LOOP PERFORM pg_sleep(0.01); END LOOP"
        try:
            with trigger_on(engine, "callback_inbox", waits):
                try:
                    timeout = {"EventName": "SessionTimeout", "SessionUUID": uuid,
                               "EventTimestamp": "2026-11-20 11:00:00"}
                    headers = signed_headers("POST", "http://127.0.0.1:9/webhooks/plivo/session", timeout)
                    done, result = _in_thread(lambda: app.test_client().post("/webhooks/plivo/session",
                                                                             data=timeout, headers=headers))
                    assert done.wait(10), "the callback still waits for its insert"
                    assert_error(result["response"], 503, "database_unavailable")
                finally:
                    with engine.begin() as conn:
                        conn.execute(text("INSERT INTO statement_gate VALUES (true)"))
        finally:
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE statement_gate"))
        with engine.connect() as conn:  # nothing of it was stored: Plivo will send it again
            assert conn.execute(text("SELECT count(*) FROM callback_inbox")).scalar() == 2
    finally:
        app.extensions["webhook_service"].close()


def test_healthz_reports_the_mode_and_readyz_the_migration_and_the_projection_lag(client, engine):
    assert client.get("/healthz").get_json()["mode"] == "production"
    ready = client.get("/readyz").get_json()
    with engine.connect() as conn:
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert ready == {"status": "ok", "database": "ok", "migration": head, "projection_lag_seconds": 0.0}
    with engine.begin() as conn:  # a fact waiting for its projection for 42 s: reported, not a failure
        conn.execute(text("INSERT INTO projection_queue (session_uuid, queued_at)"
                          " VALUES ('s', now() - interval '42 s')"))
    lagging = client.get("/readyz")
    assert lagging.status_code == 200 and 42 <= lagging.get_json()["projection_lag_seconds"] < 60


def test_readyz_fails_while_the_schema_is_behind_this_codes_head(sandbox, scratch_url):
    from alembic import command
    from alembic.script import ScriptDirectory

    from webhook_service.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(scratch_url)).get_current_head()
    command.upgrade(alembic_config(scratch_url), "0005")
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url), "database_url": scratch_url})
    try:
        behind = app.test_client().get("/readyz")
        assert behind.status_code == 503
        assert behind.get_json() == {"status": "unavailable", "database": "ok", "migration": "0005", "head": head}
        command.upgrade(alembic_config(scratch_url), "head")
        assert app.test_client().get("/readyz").status_code == 200
    finally:
        app.extensions["webhook_service"].close()


def test_readyz_stays_ready_when_the_schema_is_ahead_of_this_code(sandbox, scratch_url):
    # `release` of the next version migrated first (a revision this code does not know): a rolling
    # upgrade's old nodes keep serving.
    from sqlalchemy import create_engine

    from webhook_service.migrate import upgrade
    from webhook_service.persistence.db import sqlalchemy_url

    upgrade(scratch_url)
    engine = create_engine(sqlalchemy_url(scratch_url))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'from_the_next_release'"))
    engine.dispose()
    app = create_app({"TESTING": True, "settings": make_settings(sandbox.url), "database_url": scratch_url})
    try:
        ahead = app.test_client().get("/readyz")
        assert ahead.status_code == 200, ahead.get_json()
        assert ahead.get_json()["migration"] == "from_the_next_release"
    finally:
        app.extensions["webhook_service"].close()


def test_readyz_answers_draining_while_the_drain_file_exists_and_the_node_still_serves(database_url, sandbox,
                                                                                       tmp_path):
    drain = tmp_path / "drain"
    settings = make_settings(sandbox.url, DRAIN_FILE=str(drain))
    app = create_app({"TESTING": True, "settings": settings, "database_url": database_url})
    try:
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        drain.touch()
        draining = client.get("/readyz")
        assert (draining.status_code, draining.get_json()["status"]) == (503, "draining")
        assert client.get("/healthz").status_code == 200  # alive, and serving what it is still sent
        assert client.get("/v1/sessions", headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 200
        drain.unlink()
        assert client.get("/readyz").status_code == 200
    finally:
        app.extensions["webhook_service"].close()


def test_slow_plivo_cannot_take_every_thread_of_a_worker(database_url, auth, sandbox):
    # One slot: while one create waits on a slow Plivo, the next is refused at once (503), so the
    # worker's other threads stay free for Plivo's callbacks. "At once": before Plivo answers the first.
    settings = make_settings(sandbox.url, PLIVO_MAX_CONCURRENCY=1, PLIVO_READ_TIMEOUT=30)
    app = create_app({"TESTING": True, "settings": settings, "database_url": database_url})
    faults(sandbox, {"method": "POST", "path_contains": CREATE_PATH, "delay": 10, "after_effect": True})
    results = {}
    thread = threading.Thread(target=lambda: results.update(slow=create(app.test_client(), auth)))
    thread.start()
    try:
        assert sandbox.state.wait_held(1)  # the first create holds the slot, and Plivo holds its answer
        busy = create(app.test_client(), auth, {"first_party": FIRST, "second_party": "+14155552671"})
        assert "slow" not in results and sandbox.state.held() == 1  # answered while Plivo still held the first
        assert_error(busy, 503, "plivo_busy")
        assert busy.headers["Retry-After"] == "1"
        assert app.test_client().get("/healthz").status_code == 200
    finally:
        sandbox.state.release_held()
        thread.join(30)
    assert results["slow"].status_code == 201
    assert len(plivo_requests(sandbox, create_only=True)) == 1
    app.extensions["webhook_service"].close()
