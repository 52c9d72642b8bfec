"""The Plivo sandbox over real HTTP: the Masking Session API, signed callbacks, faults. No Postgres needed."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import plivo
import plivo.rest.client
import pytest
import requests
from plivo.utils.signature_v3 import validate_v3_signature
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from plivo_sandbox import SandboxServer
from webhook_service.plivo.signature import verify_signature

AUTH_ID = "MATESTSANDBOX0000000"  # 20 characters starting with MA, as the Plivo SDK demands
TOKEN = "test-sandbox-token"
AUTH = (AUTH_ID, TOKEN)
FIRST = "+14155551001"
SECOND = "+14155551002"
GO_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})? \+0000 UTC")
EVENT_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


class Receiver:
    """A tiny HTTP server in a thread that records every request and answers `status`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data(as_text=True)
        self.requests.append(
            {
                # The exact URL requested (REQUEST_URI keeps the query's percent-encoding, e.g. %2B).
                "url": f"http://{environ['HTTP_HOST']}{environ['REQUEST_URI']}",
                "method": request.method,
                "headers": dict(request.headers),
                "body": body,
                "args": request.args.to_dict(),
                "params": json.loads(body) if request.mimetype == "application/json" else dict(parse_qsl(body)),
            }
        )
        return Response("ok", self.status)(environ, start_response)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(AUTH_ID, TOKEN) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def api(sandbox: SandboxServer, method: str, path: str = "", **kwargs: Any) -> requests.Response:
    kwargs.setdefault("auth", AUTH)
    kwargs.setdefault("timeout", 10)
    return requests.request(method, f"{sandbox.url}/v1/Account/{AUTH_ID}/Masking/Session{path}", **kwargs)


def create(sandbox: SandboxServer, **params: Any) -> dict[str, Any]:
    response = api(sandbox, "POST", json={"first_party": FIRST, "second_party": SECOND, **params})
    assert response.status_code == 201, response.text
    return response.json()


def control(sandbox: SandboxServer, path: str, body: Any = None, method: str = "POST") -> requests.Response:
    return requests.request(method, f"{sandbox.url}/sandbox{path}", json=body, timeout=30)


def play(sandbox: SandboxServer, session_uuid: str, **options: Any) -> dict[str, Any]:
    response = control(sandbox, f"/sessions/{session_uuid}/calls", options)
    assert response.status_code == 200, response.text
    return response.json()


def assert_signed(method: str, url: str, headers: dict[str, str], params: dict[str, Any], sdk: bool = True) -> None:
    """The request's V3 signature verifies with our verifier and (for form/GET) with Plivo's SDK."""
    nonce, signature = headers["X-Plivo-Signature-V3-Nonce"], headers["X-Plivo-Signature-V3"]
    assert re.fullmatch(r"\d{20}", nonce)
    assert headers["X-Plivo-Signature-Ma-V3"] == signature  # one account: the main token signs too
    assert verify_signature(method, url, params, nonce, signature, [TOKEN])
    assert not verify_signature(method, url, params, nonce, signature, ["another-token"])
    if sdk:
        assert validate_v3_signature(method, url, nonce, TOKEN, signature, dict(params))


# Masking Session API ------------------------------------------------------------------------------


def test_create_returns_plivo_shapes_and_get_reads_it_back(sandbox):
    body = create(sandbox, callback_url="https://example.com/cb", session_expiry=600)
    assert set(body) == {"api_id", "session_uuid", "virtual_number", "message", "session"}
    assert body["message"] == "Session created"
    assert body["virtual_number"] == "+16505550100"  # '+' at the top level...
    session = body["session"]
    assert session["virtual_number"] == "16505550100"  # ...digits only inside the session object
    assert session["first_party"] == FIRST[1:] and session["second_party"] == SECOND[1:]
    assert session["session_uuid"] == body["session_uuid"] and session["status"] == "active"
    assert all(GO_TIME.fullmatch(session[k]) for k in ("created_time", "modified_time", "expiry_time"))
    assert session["duration"] == 600
    assert session["callback_method"] == "POST" and session["recording_callback_url"] == ""
    assert (session["call_time_limit"], session["ring_timeout"], session["record_file_format"]) == (14400, 120, "mp3")
    assert session["interaction"] is None and session["last_interaction_time"] == ""
    assert session["amount"] == session["total_session_amount"] == session["total_call_count"] == 0
    assert session["is_pin_authentication_required"] is False and session["first_party_pin"] is None

    for path in (f"/{body['session_uuid']}", f"/{body['session_uuid']}/"):  # with and without the slash
        got = api(sandbox, "GET", path)
        assert got.status_code == 200
        assert set(got.json()) == {"api_id", "response"}
        assert got.json()["response"] == session


def test_create_works_with_and_without_trailing_slash(sandbox):
    assert api(sandbox, "POST", "/", json={"first_party": FIRST, "second_party": SECOND}).status_code == 201
    assert api(sandbox, "POST", json={"first_party": "14155551003", "second_party": "14155551004"}).status_code == 201


@pytest.mark.parametrize(
    ("auth", "account"),
    [
        (None, AUTH_ID),
        ((AUTH_ID, "wrong"), AUTH_ID),
        (("MAOTHER0000000000000", TOKEN), AUTH_ID),
        (AUTH, "MAOTHER0000000000000"),
    ],
)
def test_bad_credentials_or_another_account_are_401(sandbox, auth, account):
    response = requests.get(f"{sandbox.url}/v1/Account/{account}/Masking/Session/", auth=auth, timeout=10)
    assert response.status_code == 401
    assert set(response.json()) == {"api_id", "error"} and response.json()["error"] == "Authentication failed"


def test_unknown_session_is_404(sandbox):
    for method in ("GET", "POST", "DELETE"):
        response = api(sandbox, method, "/00000000-0000-4000-8000-000000000000/", json={})
        assert response.status_code == 404
        assert response.json()["error"] == "session not found" and "api_id" in response.json()


PARTIES = {"first_party": FIRST, "second_party": SECOND}
PIN = {"is_pin_authentication_required": True, "pin_prompt_play": "https://x.example/p.mp3"}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"second_party": SECOND}, "Mandatory parameter missing. first_party must be present"),
        ({"first_party": FIRST}, "Mandatory parameter missing. second_party must be present"),
        ({**PARTIES, "first_party": "12345"}, "Invalid parameter. first_party is not a valid phone number"),
        ({**PARTIES, "second_party": "+1 415 555"}, "Invalid parameter. second_party is not a valid phone number"),
        ({**PARTIES, "first_party": 14155551001}, "Invalid parameter. first_party is not a valid phone number"),
        ({**PARTIES, "record": "true"}, "Invalid parameter. record allowed values are true or false"),
        (
            {**PARTIES, "record_file_format": "ogg"},
            "Invalid parameter. record_file_format allowed values are mp3 or wav",
        ),
        ({**PARTIES, "session_expiry": -1}, "Invalid parameter. session_expiry is outside the allowed range"),
        ({**PARTIES, "session_expiry": 2678401}, "Invalid parameter. session_expiry is outside the allowed range"),
        ({**PARTIES, "call_time_limit": 86401}, "Invalid parameter. call_time_limit is outside the allowed range"),
        ({**PARTIES, "ring_timeout": 3601}, "Invalid parameter. ring_timeout is outside the allowed range"),
        ({**PARTIES, "ring_timeout": "45"}, "Invalid parameter. ring_timeout should be an integer"),
        (
            {**PARTIES, "recording_callback_url": "ftp://x.example"},
            "Invalid parameter. recording_callback_url should be a valid URL",
        ),
        (
            {**PARTIES, "recording_callback_url": "https://x.example/" + "a" * 990},
            "Invalid parameter. recording_callback_url should be under 1000 characters",
        ),
        ({**PARTIES, "callback_method": "PUT"}, "Invalid parameter. callback_method allowed values are GET or POST"),
        ({**PARTIES, "colour": "red"}, "Invalid parameter. colour is not a valid parameter"),
        (
            {**PARTIES, **PIN, "first_party_pin": "12", "second_party_pin": "1234"},
            "Invalid parameter. first_party_pin should be 4 to 15 digits",
        ),
        (
            {**PARTIES, **PIN, "first_party_pin": "1234"},
            "Mandatory parameter missing. second_party_pin must be present",
        ),
        (
            {**PARTIES, "first_party_pin": "1234"},
            "Invalid parameter. first_party_pin is allowed only when is_pin_authentication_required is true",
        ),
        (
            {"first_party": FIRST, "second_party": FIRST[1:]},
            "Invalid parameter. first_party and second_party must be different",
        ),
    ],
)
def test_create_validates_like_plivo(sandbox, body, error):
    response = api(sandbox, "POST", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"api_id", "error"} and response.json()["error"] == error


def test_create_rejects_a_non_json_body(sandbox):
    response = api(sandbox, "POST", data={"first_party": FIRST, "second_party": SECOND})
    assert response.status_code == 400 and "JSON" in response.json()["error"]


def test_pin_authentication_and_single_party_sessions(sandbox):
    pin = create(
        sandbox,
        is_pin_authentication_required=True,
        generate_pin=True,
        generate_pin_length=6,
        pin_prompt_play="https://x.example/prompt.mp3",
    )["session"]
    # The create answer leaves the generated PINs out (the reading of §6.2 a client must survive); GET has them.
    assert pin["first_party_pin"] is None and pin["second_party_pin"] is None
    pin = api(sandbox, "GET", f"/{pin['session_uuid']}").json()["response"]
    assert re.fullmatch(r"\d{6}", pin["first_party_pin"]) and pin["first_party_pin"] != pin["second_party_pin"]
    assert (pin["pin_retry"], pin["pin_retry_wait"], pin["generate_pin_length"]) == (1, 5, 6)

    response = api(sandbox, "POST", json={"first_party": "14155551010", "create_session_with_single_party": True})
    assert response.status_code == 201
    single = response.json()["session"]
    assert single["second_party"] == "" and single["create_session_with_single_party"] is True
    refused = control(sandbox, f"/sessions/{single['session_uuid']}/calls", {"deliver": False})
    assert refused.status_code == 409  # nobody to dial yet
    updated = api(sandbox, "POST", f"/{single['session_uuid']}/", json={"second_party": "+14155551011"})
    assert updated.status_code == 200 and updated.json()["session"]["second_party"] == "14155551011"


def test_update_changes_allowed_fields_and_counts_expiry_from_now(sandbox):
    session_uuid = create(sandbox)["session_uuid"]
    control(sandbox, "/clock", {"advance": 100})
    response = api(
        sandbox,
        "POST",
        f"/{session_uuid}/",
        json={"session_uuid": session_uuid, "session_expiry": 600, "ring_timeout": 30, "record": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == "Session updated"
    session = body["session"]
    assert session["duration"] == 700  # 100 s after creation + 600 s from the update
    assert session["ring_timeout"] == 30 and session["record"] is True
    assert session["modified_time"] != session["created_time"]

    for params, error in [
        ({"first_party": "+14155559999"}, "first_party can be updated only for sessions created with"),
        ({"geomatch": False}, "geomatch cannot be updated"),
        ({"is_pin_authentication_required": True}, "is_pin_authentication_required cannot be updated"),
        ({"session_uuid": "another"}, "session_uuid does not match"),
        ({"call_time_limit": 0}, "call_time_limit is outside the allowed range"),
    ]:
        refused = api(sandbox, "POST", f"/{session_uuid}", json=params)
        assert refused.status_code == 400 and error in refused.json()["error"], params


def test_expire_marks_the_session_expired_and_only_once(sandbox):
    session_uuid = create(sandbox)["session_uuid"]
    # The Python SDK sends the UUID as a DELETE body too.
    response = api(sandbox, "DELETE", f"/{session_uuid}/", json={"session_uuid": session_uuid})
    assert response.status_code == 200 and response.json()["message"] == "Session expired"
    assert api(sandbox, "GET", f"/{session_uuid}").json()["response"]["status"] == "expired"
    for method in ("DELETE", "POST"):
        again = api(sandbox, method, f"/{session_uuid}", json={"ring_timeout": 30})
        assert again.status_code == 400 and again.json()["error"] == "Session already expired"
    assert control(sandbox, f"/sessions/{session_uuid}/calls", {}).status_code == 409


def test_a_session_past_its_expiry_time_reads_expired(sandbox):
    session_uuid = create(sandbox, session_expiry=60)["session_uuid"]
    assert control(sandbox, "/clock", {"advance": 61}).status_code == 200
    assert api(sandbox, "GET", f"/{session_uuid}").json()["response"]["status"] == "expired"


def test_list_filters_paginates_and_validates(sandbox):
    uuids = [
        create(sandbox, first_party=f"+1415555200{i}", second_party=f"+1415555210{i}")["session_uuid"] for i in range(3)
    ]
    api(sandbox, "DELETE", f"/{uuids[0]}")

    everything = api(sandbox, "GET", "/").json()["response"]
    assert [o["session_uuid"] for o in everything["objects"]] == uuids[::-1]  # newest first
    assert everything["objects"][0]["resource_uri"] == f"/v1/Account/{AUTH_ID}/Masking/Session/{uuids[2]}/"
    assert everything["meta"] == {"limit": 20, "next": None, "offset": 0, "previous": None, "total_count": 3}

    page = api(sandbox, "GET", params={"limit": 1, "offset": 1}).json()["response"]
    assert [o["session_uuid"] for o in page["objects"]] == [uuids[1]]
    assert "offset=2" in page["meta"]["next"] and "offset=0" in page["meta"]["previous"]

    def found(**query: Any) -> list[str]:
        response = api(sandbox, "GET", params=query)
        assert response.status_code == 200, response.text
        return [o["session_uuid"] for o in response.json()["response"]["objects"]]

    # Exact matches on the stored digits: the '+E.164' form finds nothing (the strict reading of §5).
    assert found(first_party="14155552001") == [uuids[1]] and found(first_party="+14155552001") == []
    assert found(status="expired") == [uuids[0]]
    assert found(status="active", second_party="14155552102") == [uuids[2]]
    assert found(virtual_number="16505550100") == uuids[::-1]  # disjoint parties: all on one number
    assert found(created_time__gte="2000-01-01 00:00") == uuids[::-1]
    assert found(created_time__lt="2000-01-01 00:00:00.000001") == []

    for query in (
        {"limit": 21},
        {"limit": 0},
        {"offset": -1},
        {"status": "gone"},
        {"created_time__gt": "yesterday"},
        {"first_party": "abc"},
        {"colour": "red"},
    ):
        response = api(sandbox, "GET", params=query)
        assert response.status_code == 400 and response.json()["error"].startswith("Invalid parameter."), query


def test_a_number_serves_many_sessions_but_never_two_sharing_a_party():
    with SandboxServer(AUTH_ID, TOKEN, pool=["+14155550100", "14155550101"]) as sandbox:
        a = create(sandbox, first_party="+14155553001", second_party="+14155553002")
        b = create(sandbox, first_party="+14155553003", second_party="+14155553004")
        assert a["virtual_number"] == b["virtual_number"] == "+14155550100"  # disjoint parties share it
        c = create(sandbox, first_party="+14155553001", second_party="+14155553005")
        assert c["virtual_number"] == "+14155550101"
        exhausted = api(sandbox, "POST", json={"first_party": "+14155553001", "second_party": "+14155553006"})
        assert exhausted.status_code == 400
        assert exhausted.json()["error"] == "Number pool exhausted or not available"

        api(sandbox, "DELETE", f"/{a['session_uuid']}")
        assert create(sandbox, first_party="+14155553001", second_party="+14155553006")["virtual_number"] == (
            "+14155550100"
        )

        # A cool-off period keeps an ended session's parties off its number a while longer.
        d = create(sandbox, first_party="+14155553010", second_party="+14155553011", virtual_number_cooloff_period=600)
        api(sandbox, "DELETE", f"/{d['session_uuid']}")
        e = create(sandbox, first_party="+14155553010", second_party="+14155553012")
        assert e["virtual_number"] != d["virtual_number"]


def test_official_sdk_talks_to_the_sandbox(sandbox, monkeypatch):
    monkeypatch.setattr(plivo.rest.client, "API_VOICE_BASE_URI", sandbox.url + "/v1/Account")
    client = plivo.RestClient(AUTH_ID, TOKEN)
    created = client.masking_sessions.create_masking_session(first_party=FIRST, second_party=SECOND)
    session_uuid = created["session_uuid"]
    assert client.masking_sessions.get_masking_session(session_uuid)["response"]["status"] == "active"
    assert (
        client.masking_sessions.update_masking_session(session_uuid, ring_timeout=30)["session"]["ring_timeout"] == 30
    )
    listed = client.masking_sessions.list_masking_session(first_party=FIRST[1:])  # the stored form (§5)
    assert listed["response"]["meta"]["total_count"] == 1
    client.masking_sessions.delete_masking_session(session_uuid)
    with pytest.raises(plivo.exceptions.ValidationError, match="Session already expired"):
        client.masking_sessions.delete_masking_session(session_uuid)


def test_every_api_request_is_logged_and_reset_forgets_everything(sandbox):
    session_uuid = create(sandbox)["session_uuid"]
    api(sandbox, "GET", params={"status": "active"})
    api(sandbox, "GET", auth=None)
    log = control(sandbox, "/requests", method="GET").json()["requests"]
    assert [(r["method"], r["status"]) for r in log] == [("POST", 201), ("GET", 200), ("GET", 401)]
    assert log[0]["body"] == {"first_party": FIRST, "second_party": SECOND}
    assert log[1]["query"] == {"status": "active"} and log[1]["body"] is None
    assert control(sandbox, "/requests", method="DELETE").json() == {"requests": []}
    assert sandbox.state.request_log() == []

    assert control(sandbox, "/reset").status_code == 200
    assert api(sandbox, "GET", f"/{session_uuid}").status_code == 404
    assert requests.get(sandbox.url + "/sandbox/healthz", timeout=5).json() == {"status": "ok"}


# Faults -------------------------------------------------------------------------------------------


def test_fault_rule_answers_a_status_a_limited_number_of_times(sandbox):
    rules = [{"method": "post", "path_contains": "/Masking/Session", "status": 503, "retry_after": 2, "times": 1}]
    assert control(sandbox, "/faults", rules).status_code == 200
    first = api(sandbox, "POST", json={"first_party": FIRST, "second_party": SECOND})
    assert first.status_code == 503 and first.headers["Retry-After"] == "2" and "error" in first.json()
    assert control(sandbox, "/faults", method="GET").json() == {"faults": []}  # used up
    assert api(sandbox, "POST", json={"first_party": FIRST, "second_party": SECOND}).status_code == 201
    assert [r["status"] for r in sandbox.state.request_log()] == [503, 201]

    control(sandbox, "/faults", [{"method": "GET", "status": 502, "body": "<html>Bad gateway</html>"}])
    proxied = api(sandbox, "GET")
    assert proxied.status_code == 502 and proxied.text == "<html>Bad gateway</html>"
    assert control(sandbox, "/faults", method="DELETE").status_code == 200
    assert api(sandbox, "GET").status_code == 200

    assert control(sandbox, "/faults", [{"status": "teapot"}]).status_code == 400
    assert control(sandbox, "/faults", [{"colour": "red"}]).status_code == 400


def test_fault_delay_holds_the_request_before_the_operation_until_released(sandbox):
    sandbox.state.add_faults([{"method": "POST", "delay": 60, "times": 1}])
    answers: dict[str, requests.Response] = {}
    held = threading.Thread(target=lambda: answers.update(
        held=api(sandbox, "POST", json={"first_party": FIRST, "second_party": SECOND}, timeout=30)))
    held.start()
    try:
        assert sandbox.state.wait_held(1)
        # Held before the operation: nothing is created yet, and the rule, used up, holds nobody else.
        assert api(sandbox, "GET").json()["response"]["meta"]["total_count"] == 0
        assert api(sandbox, "POST", json={"first_party": "+14155551020", "second_party": SECOND}).status_code == 201
        assert "held" not in answers and sandbox.state.held() == 1
    finally:
        released = control(sandbox, "/faults/release").json()
        held.join(30)
    assert released == {"released": 1}
    assert answers["held"].status_code == 201
    assert api(sandbox, "GET").json()["response"]["meta"]["total_count"] == 2
    assert [(r["method"], r["status"]) for r in sandbox.state.request_log()] == [
        ("POST", 201), ("GET", 200), ("POST", 201), ("GET", 200)]  # in the order they were received


def test_after_effect_fault_performs_the_operation_then_fails(sandbox):
    sandbox.state.add_faults(
        [{"method": "POST", "path_contains": "/Masking/Session", "delay": 60, "after_effect": True, "times": 1}]
    )
    answers: dict[str, requests.Response] = {}
    held = threading.Thread(target=lambda: answers.update(
        held=api(sandbox, "POST", json={"first_party": FIRST, "second_party": SECOND}, timeout=30)))
    held.start()
    try:
        assert sandbox.state.wait_held(1)  # no answer yet: the outcome is unknown to the client...
        listed = api(sandbox, "GET", params={"first_party": FIRST[1:]}).json()["response"]
        assert listed["meta"]["total_count"] == 1  # ...but the session was created
        assert "held" not in answers
    finally:
        sandbox.state.release_held()
        held.join(30)
    assert answers["held"].status_code == 201

    sandbox.state.add_faults([{"method": "DELETE", "status": 500, "after_effect": True}])
    session_uuid = listed["objects"][0]["session_uuid"]
    assert api(sandbox, "DELETE", f"/{session_uuid}").status_code == 500
    assert api(sandbox, "GET", f"/{session_uuid}").json()["response"]["status"] == "expired"


def test_reset_fault_drops_the_connection_without_an_answer(sandbox):
    sandbox.state.add_faults([{"method": "POST", "reset": True, "times": 1},
                              {"method": "DELETE", "reset": True, "after_effect": True, "times": 1}])
    with pytest.raises(requests.ConnectionError):
        api(sandbox, "POST", json={"first_party": FIRST, "second_party": SECOND})
    assert api(sandbox, "GET").json()["response"]["meta"]["total_count"] == 0  # dropped before the operation
    session_uuid = create(sandbox)["session_uuid"]  # the rule is used up
    with pytest.raises(requests.ConnectionError):
        api(sandbox, "DELETE", f"/{session_uuid}")
    # With after_effect, the operation happens and then the connection is dropped: outcome unknown.
    assert api(sandbox, "GET", f"/{session_uuid}").json()["response"]["status"] == "expired"
    assert [(r["method"], r["status"]) for r in sandbox.state.request_log()] == [
        ("POST", None), ("GET", 200), ("POST", 201), ("DELETE", None), ("GET", 200)]
    assert control(sandbox, "/faults", [{"reset": "yes"}]).status_code == 400


# Calls and callbacks ------------------------------------------------------------------------------


def event_names(callbacks: list[dict[str, Any]]) -> list[str]:
    return [c["params"]["EventName"] for c in callbacks]


def test_legacy_call_posts_signed_form_callbacks_in_order(sandbox, receiver):
    session = create(
        sandbox, callback_url=receiver.url + "/cb", record=True, recording_callback_url=receiver.url + "/rec"
    )["session"]
    result = play(sandbox, session["session_uuid"], duration=75)

    assert event_names(result["callbacks"]) == [
        "SessionFirstPartyAnswer",
        "SessionSecondPartyRing",
        "SessionSecondPartyAnswer",
        "SessionRecordingInitiated",
        "SessionSecondPartyHangup",
        "SessionFirstPartyHangup",
        "SessionRecordingCompleted",
    ]
    assert len(receiver.requests) == 7 and all(c["status"] == 200 for c in result["callbacks"])
    for sent, got in zip(result["callbacks"], receiver.requests, strict=True):
        assert got["url"] == sent["url"] and got["body"] == sent["body"] and got["params"] == sent["params"]
        assert got["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
        assert_signed("POST", got["url"], got["headers"], got["params"])
    params = [c["params"] for c in result["callbacks"]]
    assert [p["SequenceNumber"] for p in params] == [str(i) for i in range(1, 8)]
    assert all(EVENT_TIME.fullmatch(p["EventTimestamp"]) for p in params)
    assert params[0]["PinAuthenticationStatus"] == "AuthorizedCaller"
    assert "PinAuthenticationStatus" not in params[1] and "CallUUID" not in str(params)
    assert (params[0]["From"], params[0]["To"], params[0]["VirtualNumber"]) == (FIRST, SECOND, "+16505550100")
    assert receiver.requests[3]["url"].endswith("/rec") and receiver.requests[0]["url"].endswith("/cb")

    callee, caller = params[4], params[5]
    assert (callee["Duration"], callee["BilledDuration"], callee["Amount"]) == ("75", "120", "0.01700")
    assert (callee["PlivoHangupCause"], callee["PlivoHangupCauseCode"]) == ("NORMAL_CLEARING", "4000")
    assert (caller["Duration"], caller["BilledDuration"], caller["Amount"]) == ("82", "120", "0.01700")

    recording = params[6]
    assert recording["RecordingURL"] == (
        f"https://media.plivo.com/v1/Account/{AUTH_ID}/Recording/{recording['RecordingUUID']}.mp3"
    )
    assert recording["RecordingResourceURL"].endswith(f"/Recording/{recording['RecordingUUID']}/")
    assert (recording["RecordingDuration"], recording["RecordingFormat"]) == ("75", ".mp3")
    assert (recording["From"], recording["To"]) == (FIRST, SECOND)

    after = result["session"]
    assert api(sandbox, "GET", f"/{session['session_uuid']}").json()["response"] == after
    [interaction] = after["interaction"]
    assert interaction["type"] == "call" and interaction["total_call_count"] == 2
    assert interaction["first_party_resource_url"].startswith(f"https://api.plivo.com/v1/Account/{AUTH_ID}/Call/")
    assert interaction["second_party_resource_url"].endswith("/")
    assert (interaction["first_party_status"], interaction["second_party_status"]) == ("completed", "completed")
    assert interaction["recording_resource_url"] == recording["RecordingResourceURL"]
    assert (interaction["duration"], interaction["call_billed_duration"], interaction["total_call_amount"]) == (
        82,
        240,
        0.034,
    )
    assert (after["total_call_count"], after["total_call_billed_duration"]) == (2, 240)
    assert after["total_call_amount"] == after["total_session_amount"] == 0.034
    assert after["last_interaction_time"] == interaction["end_time"]


def test_latest_call_from_the_second_party_that_is_not_answered(sandbox, receiver):
    session_uuid = create(
        sandbox,
        callback_url=receiver.url + "/cb",
        record=True,
        recording_callback_url=receiver.url + "/rec",
        ring_timeout=30,
    )["session_uuid"]
    result = play(sandbox, session_uuid, vocabulary="latest", caller="second", answered=False)
    assert event_names(result["callbacks"]) == [
        "SessionVirtualNumberAnswer",
        "SessionFirstPartyInitiated",
        "SessionFirstPartyRinging",
        "SessionFirstPartyFailed",
        "SessionSecondPartyComplete",
    ]  # no answer, so no recording
    assert [got["params"]["EventName"] for got in receiver.requests] == event_names(result["callbacks"])
    for got in receiver.requests:
        assert_signed("POST", got["url"], got["headers"], got["params"])
    params = [c["params"] for c in result["callbacks"]]
    assert (params[0]["From"], params[0]["To"]) == (SECOND, FIRST)
    assert (params[0]["FirstParty"], params[0]["SecondParty"]) == (FIRST, SECOND)
    failed, caller = params[3], params[4]
    assert (failed["Duration"], failed["BilledDuration"], failed["Amount"]) == ("0", "0", "0.00000")
    assert (failed["PlivoHangupCause"], failed["PlivoHangupCauseCode"]) == ("NO_ANSWER", "3000")
    assert (caller["Duration"], caller["BilledDuration"], caller["Amount"]) == ("32", "60", "0.00850")
    [interaction] = result["session"]["interaction"]
    assert (interaction["first_party_status"], interaction["second_party_status"]) == ("no-answer", "completed")
    assert interaction["recording_resource_url"] is None


def test_legacy_names_swap_when_the_second_party_calls(sandbox):
    session_uuid = create(sandbox, callback_url="http://127.0.0.1:9/cb")["session_uuid"]
    result = play(sandbox, session_uuid, caller="second", deliver=False)
    assert event_names(result["callbacks"]) == [
        "SessionSecondPartyAnswer",
        "SessionFirstPartyRing",
        "SessionFirstPartyAnswer",
        "SessionFirstPartyHangup",
        "SessionSecondPartyHangup",
    ]
    latest = play(sandbox, session_uuid, vocabulary="latest", deliver=False)
    assert event_names(latest["callbacks"])[1:4] == [
        "SessionSecondPartyInitiated",
        "SessionSecondPartyRing",
        "SessionSecondPartyAnswer",
    ]
    assert latest["callbacks"][0]["params"]["SequenceNumber"] == "6"  # one counter per session
    assert latest["session"]["total_call_count"] == 4 and len(latest["session"]["interaction"]) == 2


def test_json_and_get_callbacks_are_signed_over_what_is_sent(sandbox, receiver):
    session_uuid = create(sandbox, callback_url=receiver.url + "/cb")["session_uuid"]
    sent = play(sandbox, session_uuid, encoding="json")["callbacks"]
    assert [got["params"] for got in receiver.requests] == [c["params"] for c in sent] and sent
    for got in receiver.requests:
        assert got["headers"]["Content-Type"] == "application/json"
        assert_signed("POST", got["url"], got["headers"], got["params"])

    receiver.requests.clear()
    url = receiver.url + "/cb/get?tenant=acme"  # a query of its own: Plivo merges it into the signed pairs
    session_uuid = create(sandbox, first_party="+14155551030", callback_url=url, callback_method="GET")["session_uuid"]
    result = play(sandbox, session_uuid, vocabulary="latest")
    assert len(receiver.requests) == 6
    for got in receiver.requests:
        assert got["method"] == "GET" and got["body"] == "" and got["args"]["tenant"] == "acme"
        assert got["args"]["From"] == "+14155551030"  # '+' arrives intact (sent as %2B)
        assert_signed("GET", got["url"], got["headers"], got["args"])
    assert result["callbacks"][0]["content_type"] is None


def test_undelivered_callbacks_can_be_sent_later_in_any_order(sandbox, receiver):
    session_uuid = create(sandbox, callback_url=receiver.url + "/cb")["session_uuid"]
    result = play(sandbox, session_uuid, deliver=False)
    assert receiver.requests == [] and all(c["status"] is None for c in result["callbacks"])
    assert result["session"]["total_call_count"] == 2  # the call happened all the same

    for callback in reversed(result["callbacks"] * 2):  # reversed and duplicated
        response = requests.post(callback["url"], data=callback["body"], headers=callback["headers"], timeout=5)
        assert response.status_code == 200
    assert len(receiver.requests) == 10
    for got in receiver.requests:
        assert_signed("POST", got["url"], got["headers"], got["params"])


def test_delivery_reports_receiver_status_or_none_when_unreachable(sandbox, receiver):
    receiver.status = 500
    session_uuid = create(sandbox, callback_url=receiver.url + "/cb")["session_uuid"]
    assert {c["status"] for c in play(sandbox, session_uuid)["callbacks"]} == {500}

    unreachable = create(sandbox, first_party="+14155551040", callback_url="http://127.0.0.1:9/cb")
    assert {c["status"] for c in play(sandbox, unreachable["session_uuid"])["callbacks"]} == {None}


def test_call_options_are_validated(sandbox):
    session_uuid = create(sandbox)["session_uuid"]
    for options in (
        {"vocabulary": "newest"},
        {"caller": "third"},
        {"answered": "yes"},
        {"duration": 0},
        {"duration": 20000},
        {"encoding": "xml"},
        {"colour": "red"},
    ):
        assert control(sandbox, f"/sessions/{session_uuid}/calls", options).status_code == 400, options
    assert control(sandbox, "/sessions/unknown/calls", {}).status_code == 404


def test_timeout_expires_the_session_and_posts_session_timeout(sandbox, receiver):
    session_uuid = create(sandbox, callback_url=receiver.url + "/cb")["session_uuid"]
    result = control(sandbox, f"/sessions/{session_uuid}/timeout").json()
    assert event_names(result["callbacks"]) == ["SessionTimeout"] and result["callbacks"][0]["status"] == 200
    assert result["session"]["status"] == "expired"
    [got] = receiver.requests
    assert got["params"]["SessionUUID"] == session_uuid and got["params"]["SequenceNumber"] == "1"
    assert_signed("POST", got["url"], got["headers"], got["params"])
    assert control(sandbox, f"/sessions/{session_uuid}/timeout").status_code == 409
    assert control(sandbox, f"/sessions/{session_uuid}/calls", {}).status_code == 409


def test_replace_number_moves_the_session_and_announces_the_new_number(sandbox, receiver):
    body = create(sandbox, callback_url=receiver.url + "/cb")
    result = control(sandbox, f"/sessions/{body['session_uuid']}/replace-number").json()
    assert event_names(result["callbacks"]) == ["SessionVirtualNumberReplaced"]
    new_number = result["session"]["virtual_number"]
    assert new_number != body["session"]["virtual_number"]
    assert result["callbacks"][0]["params"]["VirtualNumber"] == "+" + new_number
    assert_signed("POST", receiver.requests[0]["url"], receiver.requests[0]["headers"], receiver.requests[0]["params"])
    assert api(sandbox, "GET", params={"virtual_number": new_number}).json()["response"]["meta"]["total_count"] == 1


# Number pools -------------------------------------------------------------------------------------


def test_geomatch_takes_the_number_from_the_first_partys_country(sandbox):
    british = create(sandbox, first_party="+447700900555", second_party="+14155551050")
    assert british["virtual_number"].startswith("+44")
    indian = create(sandbox, first_party="+919876543210", second_party="+447700900556")
    assert indian["virtual_number"].startswith("+91")
    # A single-party session with only its second party: that party's country.
    single = create(sandbox, first_party=None, second_party="+33612345678", create_session_with_single_party=True)
    assert single["virtual_number"].startswith("+33")

    andorran = {"first_party": "+376312345", "second_party": SECOND}  # no Andorran numbers in the pool
    refused = api(sandbox, "POST", json=andorran)
    assert refused.status_code == 400 and refused.json()["error"] == "Number pool exhausted or not available"
    anywhere = create(sandbox, **andorran, geomatch=False)  # any country will do
    assert anywhere["virtual_number"] != "" and not anywhere["virtual_number"].startswith("+376")


def test_a_country_has_100_numbers_and_an_expired_session_frees_its_number(sandbox):
    # One party in many live sessions at once needs a number per session (calls are routed by caller).
    numbers = [create(sandbox, first_party=FIRST, second_party=f"+1212555{n:04d}", session_expiry=600 + n)
               ["virtual_number"] for n in range(100)]
    assert len(set(numbers)) == 100 and all(n.startswith("+1") for n in numbers)
    exhausted = api(sandbox, "POST", json={"first_party": FIRST, "second_party": "+12125559999"})
    assert exhausted.status_code == 400 and exhausted.json()["error"] == "Number pool exhausted or not available"

    control(sandbox, "/clock", {"advance": 600})  # the first session (600 s) runs out; the others last longer
    assert create(sandbox, first_party=FIRST, second_party="+12125559999")["virtual_number"] == numbers[0]


def test_the_pool_size_is_configurable():
    with SandboxServer(AUTH_ID, TOKEN, pool_size=2) as small:
        assert [create(small, second_party=f"+1212555100{n}")["virtual_number"] for n in range(2)] == [
            "+16505550100", "+16505550101"]
        assert api(small, "POST", json={"first_party": FIRST, "second_party": "+12125551009"}).status_code == 400


# SessionTimeout, sent by the sandbox itself ------------------------------------------------------------


def test_a_session_that_runs_out_gets_its_session_timeout_without_being_asked(sandbox, receiver):
    ending = create(sandbox, callback_url=receiver.url + "/cb", session_expiry=60)["session"]
    lasting = create(sandbox, first_party="+14155551060", callback_url=receiver.url + "/cb")["session_uuid"]
    deleted = create(sandbox, first_party="+14155551061", callback_url=receiver.url + "/cb",
                     session_expiry=30)["session_uuid"]
    api(sandbox, "DELETE", f"/{deleted}")

    assert control(sandbox, "/clock", {"advance": 61}).json()["timed_out"] == 1  # delivered before the answer
    [got] = receiver.requests
    assert got["params"]["EventName"] == "SessionTimeout" and got["params"]["SessionUUID"] == ending["session_uuid"]
    # Dated at the session's expiry, not when the clock was moved.
    assert got["params"]["EventTimestamp"] == ending["expiry_time"][:19]
    assert_signed("POST", got["url"], got["headers"], got["params"])
    assert control(sandbox, "/clock", {"advance": 1}).json()["timed_out"] == 0  # once only
    assert api(sandbox, "GET", f"/{lasting}").json()["response"]["status"] == "active"
    assert len(receiver.requests) == 1  # none for the session expired by DELETE


def test_on_the_wall_clock_too(receiver):
    with SandboxServer(AUTH_ID, TOKEN, expiry_poll=0.05) as sandbox:
        session_uuid = create(sandbox, callback_url=receiver.url + "/cb", session_expiry=1)["session_uuid"]
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [(r["params"]["EventName"], r["params"]["SessionUUID"]) for r in receiver.requests] == [
        ("SessionTimeout", session_uuid)]


# Calls Plivo starts itself: initiate_call_to_first_party ----------------------------------------------


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


INITIATED_LEGACY = ["SessionFirstPartyRing", "SessionFirstPartyAnswer", "SessionSecondPartyRing",
                    "SessionSecondPartyAnswer", "SessionSecondPartyHangup", "SessionFirstPartyHangup"]


def test_a_session_created_to_call_the_first_party_calls_it_then_the_second(sandbox, receiver):
    body = create(sandbox, callback_url=receiver.url + "/cb", initiate_call_to_first_party=True)
    # Plivo starts the call by itself once the session exists: no one dialled the number.
    assert wait_for(lambda: len(receiver.requests) == len(INITIATED_LEGACY))
    assert [r["params"]["EventName"] for r in receiver.requests] == INITIATED_LEGACY
    for got in receiver.requests:
        assert_signed("POST", got["url"], got["headers"], got["params"])
    second_end, first_end = receiver.requests[-2]["params"], receiver.requests[-1]["params"]
    # Both legs are outbound, each billed from its answer: 30 s of talk, the first leg 7 s more.
    assert (second_end["Duration"], first_end["Duration"]) == ("30", "37")
    [interaction] = api(sandbox, "GET", f"/{body['session_uuid']}").json()["response"]["interaction"]
    assert (interaction["first_party_status"], interaction["second_party_status"]) == ("completed", "completed")


def test_an_initiated_call_the_first_party_does_not_answer_dials_nobody_else(sandbox):
    session_uuid = create(sandbox, callback_url="http://127.0.0.1:9/cb", initiate_call_to_first_party=True,
                          ring_timeout=30)["session_uuid"]
    result = play(sandbox, session_uuid, initiated=True, answered=False, vocabulary="latest", deliver=False)
    assert event_names(result["callbacks"]) == ["SessionFirstPartyInitiated", "SessionFirstPartyRinging",
                                                "SessionFirstPartyFailed"]
    failed = result["callbacks"][-1]["params"]
    assert (failed["BilledDuration"], failed["PlivoHangupCause"]) == ("0", "NO_ANSWER")
    # (The call Plivo started on creating the session is there too, answered.)
    [unanswered] = [i for i in result["session"]["interaction"] if i["total_call_count"] == 1]
    assert unanswered["second_party_resource_url"] is None and unanswered["total_call_count"] == 1
    assert unanswered["first_party_status"] == "no-answer"

    plain = create(sandbox, first_party="+14155551070")["session_uuid"]
    assert control(sandbox, f"/sessions/{plain}/calls", {"initiated": True}).status_code == 409
    assert control(sandbox, f"/sessions/{session_uuid}/calls", {"initiated": True, "caller": "second"}
                   ).status_code == 400


# PIN authentication ---------------------------------------------------------------------------------

STRANGER = "+14155559876"
PINNED = {"is_pin_authentication_required": True, "pin_prompt_play": "https://x.example/p.mp3",
          "first_party_pin": "1111", "second_party_pin": "2222", "pin_retry": 1, "pin_retry_wait": 5}


def test_a_stranger_gets_in_with_a_partys_pin_on_a_retry_and_plays_that_partys_part(sandbox):
    session_uuid = create(sandbox, callback_url="http://127.0.0.1:9/cb", **PINNED)["session_uuid"]
    result = play(sandbox, session_uuid, from_number=STRANGER, pins=["0000", "2222"], deliver=False)
    assert event_names(result["callbacks"]) == [
        "SessionSecondPartyAnswer", "SessionPinAuthenticationStatus", "SessionPinAuthenticationStatus",
        "SessionFirstPartyRing", "SessionFirstPartyAnswer", "SessionFirstPartyHangup", "SessionSecondPartyHangup"]
    params = [c["params"] for c in result["callbacks"]]
    checks = [(p["PinAuthenticationStatus"], p["PinRetryCounter"], p["From"]) for p in params[1:3]]
    assert checks == [("failed", "0", STRANGER), ("success", "1", STRANGER)]
    assert "PinAuthenticationStatus" not in params[0]  # prompted: no AuthorizedCaller on the answer
    assert (params[-1]["From"], params[-1]["To"]) == (STRANGER, FIRST)  # the stranger's leg, as the second party's
    # The first party is dialled once the PIN is right (two tries of pin_retry_wait = 5 s).
    assert (EVENT_TIME.fullmatch(params[3]["EventTimestamp"]) and
            params[3]["EventTimestamp"] > params[0]["EventTimestamp"])
    assert result["session"]["total_call_count"] == 2


def test_wrong_pins_end_the_call_a_stranger_costs_nothing_a_party_pays_its_leg(sandbox):
    session_uuid = create(sandbox, callback_url="http://127.0.0.1:9/cb", force_pin_authentication=True,
                          **PINNED)["session_uuid"]
    stranger = play(sandbox, session_uuid, from_number=STRANGER, pins=["1234"], vocabulary="latest", deliver=False)
    assert event_names(stranger["callbacks"]) == ["SessionVirtualNumberAnswer", "SessionPinAuthenticationStatus",
                                                  "SessionPinAuthenticationStatus"]
    assert [c["params"]["PinAuthenticationStatus"] for c in stranger["callbacks"][1:]] == ["failed", "failed"]
    assert stranger["session"]["interaction"] is None  # the second try had no input: nothing was bridged

    # force_pin_authentication: a party's own number is prompted too, and must enter its own PIN.
    party = play(sandbox, session_uuid, caller="first", pins=["2222", "2222"], deliver=False)
    assert event_names(party["callbacks"]) == ["SessionFirstPartyAnswer", "SessionPinAuthenticationStatus",
                                               "SessionPinAuthenticationStatus", "SessionFirstPartyHangup"]
    assert party["callbacks"][-1]["params"]["Duration"] == "10"  # two tries of 5 s, then it hangs up
    [interaction] = party["session"]["interaction"]
    assert interaction["total_call_count"] == 1 and interaction["second_party_resource_url"] is None
    assert play(sandbox, session_uuid, caller="first", pins=["1111"], deliver=False)["session"][
        "total_call_count"] == 3


def test_a_stranger_without_pin_authentication_is_refused_and_call_options_are_checked(sandbox):
    session_uuid = create(sandbox)["session_uuid"]
    assert control(sandbox, f"/sessions/{session_uuid}/calls", {"from_number": STRANGER}).status_code == 409
    for options in ({"from_number": "12"}, {"pins": "1111"}, {"pins": [1111]}, {"pins": ["1"] * 7},
                    {"from_number": FIRST, "caller": "second"}):
        assert control(sandbox, f"/sessions/{session_uuid}/calls", options).status_code == 400, options
