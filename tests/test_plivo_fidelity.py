"""Issue 11, "Plivo fidelity": where a real Plivo account behaves differently from what the service
and its sandbox assumed. Each test goes through the real routes, with Plivo played by the sandbox and
signatures computed by Plivo's own SDK (`plivo.utils.signature_v3`) where a signature is involved.
"""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import urlencode

import pytest
import requests
from plivo.utils.signature_v3 import construct_post_url, get_signature_v3, validate_v3_signature
from sqlalchemy import text

from plivo_sandbox.state import SANDBOX_SUBACCOUNTS
from webhook_service import create_app
from webhook_service.plivo.signature import MA_SIGNATURE_HEADER, NONCE_HEADER, SIGNATURE_HEADER
from webhook_service.settings import SANDBOX_AUTH_TOKEN

from .helpers import API_TOKEN, FIRST, SECOND, make_settings, settle

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
PUBLIC = "http://127.0.0.1:9"  # the test client's PUBLIC_BASE_URL (make_settings' default)
[(SUBACCOUNT, SUBACCOUNT_TOKEN)] = SANDBOX_SUBACCOUNTS.items()
NONCE = "12345678901234567890"


def sdk_signature(url: str, params: dict, token: str, nonce: str = NONCE) -> str:
    """X-Plivo-Signature-V3 / -Ma-V3 of a POST callback, as Plivo's Python SDK computes it."""
    return get_signature_v3(token, construct_post_url(url, dict(params)), nonce).decode()


def timeout_params(session_uuid: str = "sub-session-1") -> dict[str, str]:
    return {"EventName": "SessionTimeout", "SessionUUID": session_uuid, "EventTimestamp": "2026-11-20 11:00:00",
            "VirtualNumber": "+16505550100", "SequenceNumber": "4"}


def post_callback(client, params: dict, *, v3: str | None = None, ma_v3: str | None = None):
    headers = {NONCE_HEADER: NONCE, "Content-Type": "application/x-www-form-urlencoded"}
    if v3 is not None:
        headers[SIGNATURE_HEADER] = v3
    if ma_v3 is not None:
        headers[MA_SIGNATURE_HEADER] = ma_v3
    return client.post("/webhooks/plivo/session", data=urlencode(params), headers=headers)


def inbox_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM callback_inbox")).scalar()


# X-Plivo-Signature-Ma-V3 and subaccount tokens -----------------------------------------------------


def test_a_subaccount_callback_is_accepted_by_its_ma_v3_signature_made_with_the_main_token(client, engine):
    params = timeout_params()
    url = f"{PUBLIC}/webhooks/plivo/session"
    response = post_callback(client, params, v3=sdk_signature(url, params, SUBACCOUNT_TOKEN),
                             ma_v3=sdk_signature(url, params, SANDBOX_AUTH_TOKEN))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"status": "recorded"}


def test_ma_v3_alone_verifies_and_holds_several_signatures_while_rotating(client):
    params = timeout_params("sub-session-2")
    url = f"{PUBLIC}/webhooks/plivo/session"
    header = f"{sdk_signature(url, params, 'a-token-being-retired')},{sdk_signature(url, params, SANDBOX_AUTH_TOKEN)}"
    assert post_callback(client, params, ma_v3=header).status_code == 200


def test_ma_v3_is_never_checked_against_a_subaccount_token(database_url, sandbox, engine):
    # A subaccount's holder must not sign as the main account: Ma-V3 is the main token's only.
    app = create_app({"TESTING": True, "database_url": database_url,
                      "settings": make_settings(sandbox.url, PLIVO_SUBACCOUNT_TOKENS=SUBACCOUNT_TOKEN)})
    params = timeout_params("sub-session-3")
    url = f"{PUBLIC}/webhooks/plivo/session"
    forged = sdk_signature(url, params, SUBACCOUNT_TOKEN)
    response = post_callback(app.test_client(), params, v3="bm90LWEtc2lnbmF0dXJl", ma_v3=forged)
    assert response.status_code == 403 and response.get_json()["error"] == "signature_invalid"
    assert inbox_count(engine) == 0
    app.extensions["webhook_service"].close()


def test_v3_made_with_a_subaccount_token_verifies_only_when_that_token_is_configured(database_url, sandbox, engine):
    params = timeout_params("sub-session-4")
    url = f"{PUBLIC}/webhooks/plivo/session"
    v3 = sdk_signature(url, params, SUBACCOUNT_TOKEN)
    without = create_app({"TESTING": True, "database_url": database_url, "settings": make_settings(sandbox.url)})
    assert post_callback(without.test_client(), params, v3=v3).status_code == 403
    without.extensions["webhook_service"].close()
    assert inbox_count(engine) == 0

    configured = make_settings(sandbox.url, PLIVO_SUBACCOUNT_TOKENS=f"other-sub-token, {SUBACCOUNT_TOKEN}")
    assert SUBACCOUNT_TOKEN not in repr(configured)  # a secret: never in a log line of the settings
    app = create_app({"TESTING": True, "database_url": database_url, "settings": configured})
    assert post_callback(app.test_client(), params, v3=v3).status_code == 200
    app.extensions["webhook_service"].close()


def test_a_callback_with_neither_signature_header_is_refused(client, engine):
    response = post_callback(client, timeout_params())
    assert response.status_code == 403 and response.get_json()["error"] == "signature_missing"
    assert inbox_count(engine) == 0


def test_the_sandbox_signs_a_subaccount_sessions_callbacks_like_plivo_and_the_service_takes_them(live, sandbox):
    created = requests.post(f"{live.url}/v1/sessions", headers=AUTH, timeout=10,
                            json={"first_party": FIRST, "second_party": SECOND, "subaccount": SUBACCOUNT})
    assert created.status_code == 201, created.text
    session_uuid = created.json()["session_uuid"]
    played = requests.post(f"{sandbox.url}/sandbox/sessions/{session_uuid}/calls", json={}, timeout=30).json()
    assert played["callbacks"] and all(c["status"] == 200 for c in played["callbacks"])
    for callback in played["callbacks"]:
        headers, params = callback["headers"], callback["params"]
        nonce, url = headers[NONCE_HEADER], callback["url"]
        # V3 with the subaccount's token, Ma-V3 with the main account's, one nonce (Plivo's SDK agrees).
        assert validate_v3_signature("POST", url, nonce, SUBACCOUNT_TOKEN, headers[SIGNATURE_HEADER], dict(params))
        assert not validate_v3_signature("POST", url, nonce, SANDBOX_AUTH_TOKEN, headers[SIGNATURE_HEADER],
                                         dict(params))
        assert validate_v3_signature("POST", url, nonce, SANDBOX_AUTH_TOKEN, headers[MA_SIGNATURE_HEADER],
                                     dict(params))
    settle(live.app)
    details = requests.get(f"{live.url}/v1/sessions/{session_uuid}", headers=AUTH, timeout=10).json()
    assert details["call_count"] == 2 and len(details["call_legs"]) == 2


@pytest.mark.parametrize("subaccount", ["SAUNKNOWN00000000000"])
def test_the_sandbox_refuses_a_subaccount_it_does_not_have(client, subaccount):
    response = client.post("/v1/sessions", headers=AUTH,
                           json={"first_party": FIRST, "second_party": SECOND, "subaccount": subaccount})
    assert response.status_code == 400
    assert "subaccount" in response.get_json()["message"]


# Recovering a create whose outcome is unknown ------------------------------------------------------


def plivo_requests(sandbox, method: str) -> list[dict]:
    return [r for r in requests.get(f"{sandbox.url}/sandbox/requests", timeout=5).json()["requests"]
            if r["method"] == method]


def test_an_unknown_create_is_found_by_the_parties_in_the_form_plivo_stores_them(client, app, sandbox, db):
    # Plivo creates the session, then the connection drops before its answer: the outcome is unknown.
    requests.post(f"{sandbox.url}/sandbox/faults", timeout=5, json=[
        {"method": "POST", "path_contains": "/Masking/Session", "reset": True, "after_effect": True, "times": 1}])
    response = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND})
    assert response.status_code == 504 and response.get_json()["details"]["outcome"] == "unknown"
    [made] = sandbox.state.list({"first_party": FIRST.lstrip("+")})[1]

    from datetime import timedelta

    from webhook_service.services.sessions import resolve_pending_attempts
    assert resolve_pending_attempts(app.extensions["webhook_service"], grace=timedelta(0)) == {"recovered": 1}
    [search] = plivo_requests(sandbox, "GET")
    assert (search["query"]["first_party"], search["query"]["second_party"]) == (FIRST[1:], SECOND[1:])
    with db.transaction() as s:
        [(session_uuid, first)] = s.execute(text("SELECT session_uuid, first_party FROM masking_sessions")).all()
    assert (session_uuid, first) == (made["session_uuid"], FIRST)


# Plivo's answers: unreadable 2xx, 403, api_id -----------------------------------------------------


def add_faults(sandbox, *rules) -> None:
    requests.post(f"{sandbox.url}/sandbox/faults", json=list(rules), timeout=5).raise_for_status()


def attempt_row(db) -> dict:
    with db.transaction() as s:
        return dict(s.execute(text("SELECT state, plivo_api_id, session_uuid FROM session_create_attempts")).one()
                    ._mapping)


def test_a_2xx_create_answer_that_cannot_be_read_is_an_unknown_outcome_then_recovered(client, app, sandbox, db):
    # Plivo created the session, but its 201 carries a body that is not JSON.
    add_faults(sandbox, {"method": "POST", "path_contains": "/Masking/Session", "status": 201,
                         "body": "<html>gateway</html>", "after_effect": True, "times": 1})
    response = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND})
    assert response.status_code == 502, response.get_data(as_text=True)
    body = response.get_json()
    assert body["details"]["outcome"] == "unknown" and "may have been created" in body["message"]
    assert attempt_row(db)["state"] == "unknown"

    from datetime import timedelta

    from webhook_service.services.sessions import resolve_pending_attempts
    assert resolve_pending_attempts(app.extensions["webhook_service"], grace=timedelta(0)) == {"recovered": 1}


def test_a_plivo_403_passes_plivos_message_and_api_id_through(client, sandbox, db):
    refusal = "Geo permissions are not enabled for the destination country"
    add_faults(sandbox, {"method": "POST", "path_contains": "/Masking/Session", "status": 403,
                         "body": {"api_id": "api-403-e1", "error": refusal}, "times": 1})
    response = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND})
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "plivo_forbidden" and refusal in body["message"]
    assert body["details"] == {"plivo_status": 403, "plivo_api_id": "api-403-e1", "plivo_message": refusal}
    assert attempt_row(db) == {"state": "failed", "plivo_api_id": "api-403-e1", "session_uuid": None}


def test_a_plivo_401_is_still_plivo_auth_failed_with_its_api_id(client, sandbox):
    add_faults(sandbox, {"method": "POST", "path_contains": "/Masking/Session", "status": 401,
                         "body": {"api_id": "api-401-e1", "error": "Authentication failed"}, "times": 1})
    response = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND})
    assert response.status_code == 502
    body = response.get_json()
    assert body["error"] == "plivo_auth_failed" and body["details"]["plivo_api_id"] == "api-401-e1"


def test_plivos_api_id_of_the_create_is_kept_on_the_attempt_and_the_session(client, db):
    response = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND})
    assert response.status_code == 201
    api_id = response.get_json()["plivo_api_id"]
    assert api_id and attempt_row(db)["plivo_api_id"] == api_id
    got = client.get(f"/v1/sessions/{response.get_json()['session_uuid']}", headers=AUTH).get_json()
    assert got["plivo_api_id"] == api_id


# Generated PINs -------------------------------------------------------------------------------------

PIN_SESSION = {"first_party": FIRST, "second_party": SECOND, "is_pin_authentication_required": True,
               "generate_pin": True, "generate_pin_length": 6, "pin_prompt_play": "https://example.com/pin.mp3"}


@pytest.mark.parametrize("in_create_answer", [False, True])
def test_generated_pins_are_stored_returned_and_masked_in_reporting(client, sandbox, engine, caplog,
                                                                   in_create_answer):
    sandbox.state.pins_in_create_answer = in_create_answer
    with caplog.at_level("DEBUG"):
        response = client.post("/v1/sessions", headers=AUTH, json=PIN_SESSION)
    assert response.status_code == 201, response.get_data(as_text=True)
    created = response.get_json()
    plivos = sandbox.state.get(created["session_uuid"])
    pins = (plivos["first_party_pin"], plivos["second_party_pin"])
    assert all(len(p) == 6 and p.isdigit() for p in pins)
    assert (created["first_party_pin"], created["second_party_pin"]) == pins
    got = client.get(f"/v1/sessions/{created['session_uuid']}", headers=AUTH).get_json()
    assert (got["first_party_pin"], got["second_party_pin"]) == pins
    # Fetched once when the create answer lacks them, not at all when it has them.
    assert len(plivo_requests(sandbox, "GET")) == (0 if in_create_answer else 1)
    with engine.connect() as conn:
        masked = conn.execute(text("SELECT first_party_pin, second_party_pin FROM reporting.session_summary")).one()
    assert tuple(masked) == ("******", "******")
    assert not any(p in record.getMessage() or p in str(record.__dict__) for p in pins for record in caplog.records)


# A failed recording without a RecordingUUID -----------------------------------------------------------


def test_a_failed_recording_without_a_recording_uuid_shows_in_the_api_and_in_reporting(live, sandbox, engine):
    created = requests.post(f"{live.url}/v1/sessions", headers=AUTH, timeout=10,
                            json={"first_party": FIRST, "second_party": SECOND, "record": True})
    session_uuid = created.json()["session_uuid"]
    played = requests.post(f"{sandbox.url}/sandbox/sessions/{session_uuid}/calls", timeout=30,
                           json={"recording_fails": True}).json()
    [failure] = [c["params"] for c in played["callbacks"] if c["params"]["EventName"] == "SessionRecordingFailed"]
    assert "RecordingUUID" not in failure and all(c["status"] == 200 for c in played["callbacks"])
    settle(live.app)

    details = requests.get(f"{live.url}/v1/sessions/{session_uuid}", headers=AUTH, timeout=10).json()
    [recording] = details["recordings"]
    assert recording["status"] == "failed"
    assert recording["recording_uuid"] == "failed:" + failure["EventTimestamp"].replace(" ", "T") + "+00:00"
    assert details["recording_count"] == 0  # a failed recording is not a recording made
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT session_uuid, status FROM reporting.recordings")).all()
    assert [tuple(r) for r in rows] == [(session_uuid, "failed")]


# Fields kept as columns of the facts ----------------------------------------------------------------


def test_sequence_number_pin_status_and_a_parties_hangups_billing_outlive_the_raw_inbox_row(client, app, engine):
    url = f"{PUBLIC}/webhooks/plivo/session"
    common = {"SessionUUID": "facts-kept-1", "VirtualNumber": "+16505550100", "From": FIRST, "To": SECOND}
    answer = common | {"EventName": "SessionFirstPartyAnswer", "EventTimestamp": "2026-11-20 11:00:00",
                       "PinAuthenticationStatus": "success", "PinRetryCounter": "1", "SequenceNumber": "3"}
    done = common | {"EventName": "SessionPartiesHangup", "EventTimestamp": "2026-11-20 11:02:00",
                     "Amount": "0.01700", "BilledDuration": "120", "Duration": "75", "SequenceNumber": "9"}
    for params in (answer, done):
        response = post_callback(client, params, v3=sdk_signature(url, params, SANDBOX_AUTH_TOKEN))
        assert response.get_json() == {"status": "recorded"}
    settle(app)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM callback_inbox"))  # what retention does after 90 days
        facts = conn.execute(text(
            "SELECT event_name, sequence_number, pin_status, amount, billed_duration, duration FROM callback_facts"
            " ORDER BY sequence_number")).all()
        amount = conn.execute(text("SELECT amount FROM masking_sessions WHERE session_uuid = 'facts-kept-1'")).scalar()
    assert [tuple(f) for f in facts] == [
        ("SessionFirstPartyAnswer", 3, "success", None, None, None),
        ("SessionPartiesHangup", 9, None, Decimal("0.01700"), 120, 75),
    ]
    assert amount == 0  # the parties' hangup is not a leg: its billing is kept, never added to the legs'


# Validation that matches Plivo: one table for the service and the sandbox ---------------------------

PROMPT = "https://example.com/pin.mp3"
# Where PIN authentication is on, so that a PIN parameter is judged by its own rule.
PIN_ON = {"is_pin_authentication_required": True, "pin_prompt_play": PROMPT, "generate_pin": True}


def both_verdicts(body: dict) -> tuple[bool, bool]:
    """Whether the service's validation and the sandbox's accept a create body (True: accepted)."""
    from plivo_sandbox.validation import ApiError as SandboxRefusal
    from plivo_sandbox.validation import validate_create as sandbox_validates
    from webhook_service.domain.requests import validate_create as service_validates
    from webhook_service.errors import ApiError as ServiceRefusal

    verdicts = []
    for validate, refusal in ((service_validates, ServiceRefusal), (sandbox_validates, SandboxRefusal)):
        try:
            validate(body)
        except refusal:
            verdicts.append(False)
        else:
            verdicts.append(True)
    return verdicts[0], verdicts[1]


def test_the_service_and_the_sandbox_accept_and_refuse_the_same_values_from_one_table():
    from webhook_service.domain.plivo_parameters import PARAMETERS

    parties = {"first_party": FIRST, "second_party": SECOND}
    compared = 0
    for name, parameter in PARAMETERS.items():
        base = parties | (PIN_ON if parameter.needs or name in PIN_ON else {})
        if parameter.kind == "int":
            values = [(parameter.low, True), (parameter.high, True), (parameter.low - 1, False),
                      (parameter.high + 1, False), (str(parameter.low), False)]
        elif parameter.kind == "choice":
            values = [(choice, True) for choice in parameter.choices] + [("not-" + parameter.choices[0], False)]
        elif parameter.kind == "bool":
            values = [(True, True), (False, True), (1, False), ("true", False)]
        else:
            continue
        for value, accepted in values:
            body = (parties if value is False else base) | {name: value}  # false asks for nothing: no PIN needed
            assert both_verdicts(body) == (accepted, accepted), (name, value)
            compared += 1
    assert compared > 40


def test_session_expiry_0_as_plivos_go_sdk_sends_it_creates_a_session(client, sandbox):
    response = client.post("/v1/sessions", headers=AUTH,
                           json={"first_party": FIRST, "second_party": SECOND, "session_expiry": 0})
    assert response.status_code == 201, response.get_data(as_text=True)
    [sent] = plivo_requests(sandbox, "POST")
    assert sent["body"]["session_expiry"] == 0  # passed on as given: what it means is Plivo's to say
    assert sandbox.state.get(response.get_json()["session_uuid"])["duration"] == 3600  # the sandbox's reading


def test_a_ring_timeout_the_service_accepts_the_sandbox_accepts_too(client, sandbox):
    accepted = client.post("/v1/sessions", headers=AUTH,
                           json={"first_party": FIRST, "second_party": SECOND, "ring_timeout": 3600})
    assert accepted.status_code == 201, accepted.get_data(as_text=True)
    assert sandbox.state.get(accepted.get_json()["session_uuid"])["ring_timeout"] == 3600
    refused = client.post("/v1/sessions", headers=AUTH,
                          json={"first_party": FIRST, "second_party": "+14155550124", "ring_timeout": 3601})
    assert refused.status_code == 400
    assert refused.get_json()["details"]["fields"] == {"ring_timeout": "must be between 1 and 3600"}
    assert len(plivo_requests(sandbox, "POST")) == 1  # the refused one never reached Plivo


PIN_REQUIRED = "is required when is_pin_authentication_required is true"


@pytest.mark.parametrize(("body", "fields"), [
    ({"first_party_pin": "1234"}, {"first_party_pin": "is allowed only when is_pin_authentication_required is true"}),
    ({"force_pin_authentication": True, "pin_prompt_play": PROMPT},
     {"force_pin_authentication": "is allowed only when is_pin_authentication_required is true",
      "pin_prompt_play": "is allowed only when is_pin_authentication_required is true"}),
    ({"is_pin_authentication_required": True},
     {"pin_prompt_play": PIN_REQUIRED, "first_party_pin": PIN_REQUIRED, "second_party_pin": PIN_REQUIRED}),
    ({"is_pin_authentication_required": True, "pin_prompt_play": PROMPT, "generate_pin_length": 6},
     {"generate_pin_length": "is allowed only when generate_pin is true", "first_party_pin": PIN_REQUIRED,
      "second_party_pin": PIN_REQUIRED}),
    ({"is_pin_authentication_required": True, "pin_prompt_play": PROMPT, "first_party_pin": "12",
      "second_party_pin": "1234"}, {"first_party_pin": "must be 4 to 15 digits"}),
    ({"is_pin_authentication_required": True, "pin_prompt_play": PROMPT, "first_party_pin": "0123",
      "second_party_pin": "0123"}, {"second_party_pin": "must differ from first_party_pin"}),
    ({"is_pin_authentication_required": True, "pin_prompt_play": PROMPT, "generate_pin": True,
      "generate_pin_length": 16}, {"generate_pin_length": "must be between 4 and 15"}),
])
def test_the_pin_rules_are_checked_by_the_service_naming_every_field(client, sandbox, db, body, fields):
    response = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND} | body)
    assert response.status_code == 400, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["error"] == "invalid_request" and answer["details"]["fields"] == fields
    assert plivo_requests(sandbox, "POST") == []  # refused before Plivo: no attempt, nothing paid
    with db.transaction() as s:
        assert s.execute(text("SELECT count(*) FROM session_create_attempts")).scalar() == 0


def test_pin_switches_left_off_ask_for_nothing_and_are_accepted(client):
    response = client.post("/v1/sessions", headers=AUTH, json={
        "first_party": FIRST, "second_party": SECOND, "generate_pin": False, "force_pin_authentication": False})
    assert response.status_code == 201, response.get_data(as_text=True)


# POST /v1/sessions/<uuid>/refresh ------------------------------------------------------------------------


def test_refresh_reconciles_one_session_from_plivo_now_as_the_worker_would(client, sandbox):
    created = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND})
    session_uuid, create_api_id = created.get_json()["session_uuid"], created.get_json()["plivo_api_id"]
    # A call whose callbacks never arrive: only Plivo's record knows it.
    requests.post(f"{sandbox.url}/sandbox/sessions/{session_uuid}/calls", json={"deliver": False},
                  timeout=10).raise_for_status()
    assert client.get(f"/v1/sessions/{session_uuid}", headers=AUTH).get_json()["call_count"] == 0

    response = client.post(f"/v1/sessions/{session_uuid}/refresh", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["refresh"] == {"changed": True, "drift": False}
    assert body["call_count"] == 2 and body["amount"] != "0"
    assert sorted(leg["party"] for leg in body["call_legs"]) == ["first", "second"]
    assert all(leg["call_uuid"] and leg["source"] == "reconcile" for leg in body["call_legs"])
    assert body["plivo_api_id"] and body["plivo_api_id"] != create_api_id  # the refresh's own GET
    assert [r["method"] for r in plivo_requests(sandbox, "GET")] == ["GET"]  # one fetch, now

    again = client.post(f"/v1/sessions/{session_uuid}/refresh", headers=AUTH).get_json()
    assert again["refresh"] == {"changed": False, "drift": False} and again["call_count"] == 2
    assert client.get(f"/v1/sessions/{session_uuid}", headers=AUTH).get_json()["call_count"] == 2


def test_refresh_of_a_session_the_service_does_not_know_is_404_without_calling_plivo(client, sandbox):
    response = client.post("/v1/sessions/00000000-0000-4000-8000-000000000000/refresh", headers=AUTH)
    assert response.status_code == 404 and response.get_json()["error"] == "not_found"
    assert plivo_requests(sandbox, "GET") == []


def test_refresh_of_a_session_plivo_no_longer_has_passes_plivos_404_on(client, sandbox):
    created = client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND})
    requests.post(f"{sandbox.url}/sandbox/reset", timeout=5).raise_for_status()  # Plivo forgets it (90 days on)
    response = client.post(f"/v1/sessions/{created.get_json()['session_uuid']}/refresh", headers=AUTH)
    assert response.status_code == 404, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == "not_found" and body["details"]["plivo_status"] == 404


def test_refresh_gets_the_generated_pins_the_create_could_not_fetch(client, sandbox):
    # The create answer lacks the PINs and the one fetch for them fails (a 500, after its retries).
    add_faults(sandbox, {"method": "GET", "path_contains": "/Masking/Session", "status": 500, "times": 4})
    created = client.post("/v1/sessions", headers=AUTH, json=PIN_SESSION)
    assert created.status_code == 201, created.get_data(as_text=True)
    session_uuid = created.get_json()["session_uuid"]
    assert created.get_json()["first_party_pin"] is None
    plivos = sandbox.state.get(session_uuid)

    refreshed = client.post(f"/v1/sessions/{session_uuid}/refresh", headers=AUTH).get_json()
    assert (refreshed["first_party_pin"], refreshed["second_party_pin"]) == (
        plivos["first_party_pin"], plivos["second_party_pin"])


# List filters Plivo has: expiry time, duration, subaccount ----------------------------------------------


def test_the_list_filters_by_expiry_time_duration_and_subaccount(client, sandbox):
    from datetime import UTC, datetime, timedelta

    def make(second_party: str, **params) -> str:
        response = client.post("/v1/sessions", headers=AUTH,
                               json={"first_party": FIRST, "second_party": second_party} | params)
        assert response.status_code == 201, response.get_data(as_text=True)
        return response.get_json()["session_uuid"]

    short = make("+14155550124", session_expiry=600)
    sub = make("+14155550125", session_expiry=7200, subaccount=SUBACCOUNT)
    plain = make("+14155550126")

    def listed(**query) -> list[str]:
        response = client.get("/v1/sessions", headers=AUTH, query_string=query)
        assert response.status_code == 200, response.get_data(as_text=True)
        return [s["session_uuid"] for s in response.get_json()["sessions"]]

    now = datetime.now(UTC)
    assert listed(subaccount=SUBACCOUNT) == [sub] and listed(subaccount="SAOTHER0000000000000") == []
    assert listed(duration_max=600) == [short] and listed(duration_min=3600) == [plain, sub]
    assert listed(duration_min=3601, duration_max=7200) == [sub]
    assert listed(expires_before=(now + timedelta(seconds=1800)).isoformat()) == [short]
    assert listed(expires_after=(now + timedelta(seconds=5400)).isoformat()) == [sub]
    got = client.get(f"/v1/sessions/{sub}", headers=AUTH).get_json()
    assert got["subaccount"] == SUBACCOUNT and client.get(f"/v1/sessions/{plain}", headers=AUTH).get_json()[
        "subaccount"] is None

    for query, field in [({"duration_min": "-1"}, "duration_min"), ({"duration_max": "1.5"}, "duration_max"),
                         ({"expires_after": "tomorrow"}, "expires_after"), ({"subaccount": " "}, "subaccount")]:
        response = client.get("/v1/sessions", headers=AUTH, query_string=query)
        assert response.status_code == 400 and field in response.get_json()["details"]["fields"], query


def test_an_unknown_create_on_a_subaccount_is_found_by_searching_that_subaccount(client, app, sandbox, db):
    from datetime import timedelta

    from webhook_service.services.sessions import resolve_pending_attempts

    add_faults(sandbox, {"method": "POST", "path_contains": "/Masking/Session", "reset": True, "after_effect": True,
                         "times": 1})
    response = client.post("/v1/sessions", headers=AUTH,
                           json={"first_party": FIRST, "second_party": SECOND, "subaccount": SUBACCOUNT})
    assert response.get_json()["details"]["outcome"] == "unknown"
    # The sandbox lists a subaccount's sessions only to a search naming it (the strict reading of §5).
    assert sandbox.state.list({"first_party": FIRST[1:]})[0] == 0
    assert resolve_pending_attempts(app.extensions["webhook_service"], grace=timedelta(0)) == {"recovered": 1}
    [search] = plivo_requests(sandbox, "GET")
    assert search["query"]["subaccount"] == SUBACCOUNT
    with db.transaction() as s:
        assert s.execute(text("SELECT subaccount FROM masking_sessions")).scalar() == SUBACCOUNT


# The sandbox speaks like Plivo: geomatch and number pools --------------------------------------------------


def test_a_session_gets_a_number_of_its_first_partys_country_or_plivos_pool_exhausted(client, sandbox):
    british = client.post("/v1/sessions", headers=AUTH, json={"first_party": "+447911123456", "second_party": SECOND})
    assert british.status_code == 201 and british.get_json()["virtual_number"].startswith("+44")

    andorran = {"first_party": "+376312345", "second_party": SECOND}  # the sandbox has no Andorran numbers
    refused = client.post("/v1/sessions", headers=AUTH, json=andorran)
    assert refused.status_code == 422, refused.get_data(as_text=True)
    body = refused.get_json()
    assert body["error"] == "plivo_rejected" and "Number pool exhausted or not available" in body["message"]
    anywhere = client.post("/v1/sessions", headers=AUTH, json=andorran | {"geomatch": False})
    assert anywhere.status_code == 201, anywhere.get_data(as_text=True)


# The sandbox speaks like Plivo: SessionTimeout sent by itself ----------------------------------------------


def test_a_session_running_out_on_the_sandbox_is_expired_in_the_service_by_its_own_session_timeout(live, sandbox):
    created = requests.post(f"{live.url}/v1/sessions", headers=AUTH, timeout=10,
                            json={"first_party": FIRST, "second_party": SECOND, "session_expiry": 60})
    session_uuid = created.json()["session_uuid"]
    moved = requests.post(f"{sandbox.url}/sandbox/clock", json={"advance": 61}, timeout=30).json()
    assert moved["timed_out"] == 1
    got = requests.get(f"{live.url}/v1/sessions/{session_uuid}", headers=AUTH, timeout=10).json()
    # Expired when the session ran out (the callback's EventTimestamp carries whole seconds).
    assert got["status"] == "expired" and got["expired_at"] == created.json()["expires_at"][:19] + "+00:00"


# The sandbox speaks like Plivo: calls started by initiate_call_to_first_party -------------------------------


def test_the_call_plivo_starts_for_initiate_call_to_first_party_is_recorded_by_the_service(live, sandbox):
    from .helpers import wait_until

    created = requests.post(f"{live.url}/v1/sessions", headers=AUTH, timeout=10, json={
        "first_party": FIRST, "second_party": SECOND, "initiate_call_to_first_party": True, "record": True})
    assert created.status_code == 201, created.text
    session_uuid = created.json()["session_uuid"]

    def details() -> dict:
        return requests.get(f"{live.url}/v1/sessions/{session_uuid}", headers=AUTH, timeout=10).json()

    # Plivo's callbacks come on their own after the create answered: the test waits for them.
    assert wait_until(lambda: details()["recording_count"] == 1)
    got = details()
    assert got["call_count"] == 2 and got["answered_call_count"] == 2
    legs = {leg["party"]: leg for leg in got["call_legs"]}
    assert legs["first"]["answered_at"] < legs["second"]["answered_at"]  # the first party was dialled first
    assert (legs["first"]["duration"], legs["second"]["duration"]) == (37, 30)


# The sandbox speaks like Plivo: PIN authentication, success and failure --------------------------------------

STRANGER = "+14155559876"


def test_pin_checks_of_a_stranger_reach_the_service_right_and_wrong(live, sandbox, engine):
    created = requests.post(f"{live.url}/v1/sessions", headers=AUTH, timeout=10, json={
        "first_party": FIRST, "second_party": SECOND, "is_pin_authentication_required": True,
        "pin_prompt_play": PROMPT, "first_party_pin": "1111", "second_party_pin": "2222", "pin_retry": 1})
    assert created.status_code == 201, created.text
    session_uuid = created.json()["session_uuid"]

    def call(**options) -> list[dict]:
        played = requests.post(f"{sandbox.url}/sandbox/sessions/{session_uuid}/calls", timeout=30, json=options)
        assert played.status_code == 200, played.text
        assert all(c["status"] == 200 for c in played.json()["callbacks"])
        return played.json()["callbacks"]

    call(from_number=STRANGER, pins=["0000", "2222"])  # wrong, then the second party's PIN
    requests.post(f"{sandbox.url}/sandbox/clock", json={"advance": 300}, timeout=10)
    call(from_number=STRANGER, pins=["9999", "8888"], vocabulary="latest")  # wrong twice: not let in
    settle(live.app)

    got = requests.get(f"{live.url}/v1/sessions/{session_uuid}", headers=AUTH, timeout=10).json()
    assert got["call_count"] == 2  # only the call the PIN let in
    legs = {leg["party"]: leg for leg in got["call_legs"]}
    assert legs["second"]["from_number"] == STRANGER and legs["first"]["answered_at"] is not None
    with engine.connect() as conn:
        checks = conn.execute(text("SELECT status, retry_counter, from_number FROM reporting.pin_authentications"
                                   " ORDER BY event_at")).all()
    assert [tuple(c) for c in checks] == [("failed", 0, STRANGER), ("success", 1, STRANGER),
                                          ("failed", 0, STRANGER), ("failed", 1, STRANGER)]
