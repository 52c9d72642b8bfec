"""Security tests for the threats in docs/security.md that other test files do not already cover.

Each test names the threat it covers; docs/security.md maps every threat to its tests. The tests
on NUL characters, lone surrogates, non-finite numbers and deep nesting began as the findings
of the fuzzers (each was a 500) and now prove their fixes (`webhook_service/jsonbody.py`).
"""

from __future__ import annotations

import hmac
import inspect
import io
import json
import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import pytest
import requests
from sqlalchemy import text

from webhook_service import create_app
from webhook_service.logs import JsonFormatter, mask_phone
from webhook_service.plivo.signature import (
    NONCE_HEADER,
    SIGNATURE_HEADER,
    compute_signature,
    verify_signature,
    verify_signed,
)
from webhook_service.settings import SANDBOX_AUTH_TOKEN
from webhook_service.web import sessions as session_views

from .helpers import (
    API_TOKEN,
    FIRST,
    SECOND,
    LiveServer,
    free_port,
    make_settings,
    settle,
    unavailable_database_url,
    writes_refused,
)

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
PUBLIC = "http://127.0.0.1:9"  # the test client's PUBLIC_BASE_URL (make_settings' default)
GENERIC_500 = {"error": "internal_error", "message": "Internal error; it has been logged", "details": {}}


def signed_post(client, kind: str, params: dict, *, body: bytes | None = None, content_type: str | None = None,
                token: str = SANDBOX_AUTH_TOKEN):
    """A callback through the test client, signed over PUBLIC_BASE_URL + path as Plivo signs it."""
    nonce = "40414243"
    headers = {NONCE_HEADER: nonce,
               SIGNATURE_HEADER: compute_signature("POST", f"{PUBLIC}/webhooks/plivo/{kind}", params, nonce, token)}
    if body is None:
        body, content_type = urlencode(params, doseq=True).encode(), "application/x-www-form-urlencoded"
    return client.post(f"/webhooks/plivo/{kind}", data=body, headers=headers | {"Content-Type": content_type})


def inbox_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM callback_inbox")).scalar()


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert set(body) == {"error", "message", "details"}
    return body


# Forged and rotated-token callbacks -----------------------------------------------------------


def test_after_a_rotation_completes_the_old_token_is_refused(database_url, sandbox, engine):
    app = create_app({"TESTING": True, "database_url": database_url,
                      "settings": make_settings(sandbox.url, PLIVO_AUTH_TOKEN="brand-new-token")})
    client = app.test_client()
    params = {"EventName": "SessionTimeout", "SessionUUID": "rotation-done", "EventTimestamp": "2026-11-20 11:00:00"}
    assert signed_post(client, "session", params, token="old-token").status_code == 403
    assert inbox_count(engine) == 0
    assert signed_post(client, "session", params, token="brand-new-token").status_code == 200
    app.extensions["webhook_service"].close()


def test_a_signature_computed_for_one_endpoint_is_refused_on_the_other(client, engine):
    # The callback paths are public knowledge (guessable): what protects them is that the path is signed.
    params = {"EventName": "SessionRecordingCompleted", "SessionUUID": "path-swap", "RecordingUUID": "r-1"}
    nonce = "1"
    headers = {NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature(
        "POST", f"{PUBLIC}/webhooks/plivo/session", params, nonce, SANDBOX_AUTH_TOKEN)}
    response = client.post("/webhooks/plivo/recording", data=params, headers=headers)
    assert assert_error(response, 403)["error"] == "signature_invalid"
    assert inbox_count(engine) == 0


def test_the_signature_covers_the_configured_public_url_not_the_host_header(client, engine):
    # A callback signed for another origin, sent with that origin as its Host, is still refused: the
    # service checks against PUBLIC_BASE_URL + path, whatever Host or X-Forwarded-* say.
    params = {"EventName": "SessionTimeout", "SessionUUID": "host-spoof"}
    for origin in ("http://evil.example", "https://127.0.0.1:9"):
        headers = {NONCE_HEADER: "1", SIGNATURE_HEADER: compute_signature(
            "POST", f"{origin}/webhooks/plivo/session", params, "1", SANDBOX_AUTH_TOKEN),
            "Host": origin.split("://")[1], "X-Forwarded-Proto": origin.split("://")[0],
            "X-Forwarded-Host": origin.split("://")[1]}
        assert_error(client.post("/webhooks/plivo/session", data=params, headers=headers), 403)
    assert inbox_count(engine) == 0


# API token: every token compared, in constant time, no early exit ------------------------------


@pytest.fixture
def compare_digest_calls(monkeypatch) -> list[tuple[bytes, bytes]]:
    """Record every hmac.compare_digest call (still comparing for real)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    return calls


WRONG_TOKENS = ["x", "test", "test-api-token-", "test-api-token-2", "test-api-token-11", "TEST-API-TOKEN-1",
                "second-token-", "a" * 10_000, "tést-api-token-1", API_TOKEN[::-1]]


@pytest.mark.parametrize("token", WRONG_TOKENS)
def test_a_wrong_bearer_token_of_any_length_or_prefix_is_401_after_comparing_every_token(client, sandbox, token,
                                                                                        compare_digest_calls):
    response = client.get("/v1/sessions", headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(compare_digest_calls) == 2  # both configured tokens, whatever the input
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in compare_digest_calls)


@pytest.mark.parametrize("token", [API_TOKEN, "second-token-2"])
def test_a_right_token_is_also_compared_with_every_token_no_early_exit(client, sandbox, token, compare_digest_calls):
    assert client.get("/v1/sessions", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert len(compare_digest_calls) == 2


@pytest.mark.parametrize("header", [f"bearer {API_TOKEN}", f"Bearer   {API_TOKEN}  "])
def test_the_scheme_is_case_insensitive_and_spaces_around_the_token_are_ignored(client, sandbox, header):
    assert client.get("/v1/sessions", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("where", ["query", "cookie", "x-api-key"])
def test_the_token_is_accepted_only_in_the_authorization_header(client, sandbox, where):
    if where == "query":
        response = client.get("/v1/sessions", query_string={"access_token": API_TOKEN})
    elif where == "cookie":
        client.set_cookie("token", API_TOKEN)
        response = client.get("/v1/sessions")
    else:
        response = client.get("/v1/sessions", headers={"X-Api-Key": API_TOKEN})
    assert_error(response, 401)


def test_the_token_checks_use_compare_digest_and_never_return_early():
    # Structural: the bearer check and the signature check OR the results of every comparison.
    for function in (session_views.require_bearer_token, verify_signed):
        source = inspect.getsource(function)
        assert "hmac.compare_digest" in source and "ok |=" in source, function.__name__
        assert "break" not in source and " == " not in source, function.__name__
    assert "return True" not in inspect.getsource(verify_signed)


def test_a_callback_signature_is_compared_with_every_token_and_candidate(compare_digest_calls):
    params = {"EventName": "SessionTimeout"}
    url = f"{PUBLIC}/webhooks/plivo/session"
    good = compute_signature("POST", url, params, "1", "new-token")
    header = f"{good},bm90LWl0"
    assert verify_signature("POST", url, params, "1", header, ["new-token", "old-token"])
    assert len(compare_digest_calls) == 4  # 2 candidates x 2 tokens, although the first matched


# SQL injection through filters, paths and callbacks ------------------------------------------


INJECTIONS = ["x' OR '1'='1", "x'; DROP TABLE masking_sessions; --", "%", "_", "order-1%", "order-1' --",
              "\\", "order-1\\' OR 1=1", "$1", "order-1); DELETE FROM masking_sessions; --", "' UNION SELECT 1 --"]


def test_sql_injection_through_list_filters_and_paths_matches_nothing_and_changes_nothing(client, auth, sandbox,
                                                                                           engine):
    created = client.post("/v1/sessions", headers=auth,
                          json={"first_party": FIRST, "second_party": SECOND, "external_ref": "order-1"})
    assert created.status_code == 201
    uuid = created.get_json()["session_uuid"]
    for payload in INJECTIONS:
        response = client.get("/v1/sessions", headers=auth, query_string={"external_ref": payload})
        assert response.status_code == 200 and response.get_json()["sessions"] == [], payload
        for field in ("status", "first_party", "created_after", "cursor", "limit"):
            assert_error(client.get("/v1/sessions", headers=auth, query_string={field: payload}), 400)
        assert_error(client.get(f"/v1/sessions/{payload}", headers=auth), 404)
        assert_error(client.delete(f"/v1/sessions/{payload}", headers=auth), 404)
    # Exact match only: the real value still finds exactly its session, and nothing was dropped or changed.
    found = client.get("/v1/sessions", headers=auth, query_string={"external_ref": "order-1"}).get_json()
    assert [s["session_uuid"] for s in found["sessions"]] == [uuid]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM masking_sessions")).scalar() == 1


def test_sql_injection_in_stored_values_is_stored_verbatim(client, auth, sandbox, engine):
    payload = "x'); DROP TABLE callback_inbox; --"
    response = client.post("/v1/sessions", headers=auth, json={
        "first_party": FIRST, "second_party": SECOND, "external_ref": payload, "metadata": {payload: payload}})
    assert response.status_code == 201
    assert response.get_json()["external_ref"] == payload and response.get_json()["metadata"] == {payload: payload}
    params = {"EventName": "SessionTimeout", "SessionUUID": payload, "EventTimestamp": "2026-11-20 10:00:00"}
    assert signed_post(client, "session", params).get_json() == {"status": "recorded"}
    stored = client.get("/v1/sessions/" + requests.utils.quote(payload, safe=""), headers=auth)
    assert stored.status_code == 200 and stored.get_json()["status"] == "expired"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM callback_inbox")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM masking_sessions")).scalar() == 2


# Oversized and deeply nested JSON ------------------------------------------------------------


def test_api_bodies_over_one_mebibyte_are_413_json_and_reach_nobody(client, auth, sandbox, engine):
    body = json.dumps({"first_party": FIRST, "second_party": SECOND, "metadata": {"pad": "x" * (1024 * 1024)}})
    for method in ("post", "patch"):
        path = "/v1/sessions" if method == "post" else "/v1/sessions/some-uuid"
        response = getattr(client, method)(path, data=body, headers=auth | {"Content-Type": "application/json"})
        assert_error(response, 413)
    assert requests.get(sandbox.url + "/sandbox/requests", timeout=5).json()["requests"] == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM session_create_attempts")).scalar() == 0


def test_metadata_over_16_kib_is_refused(client, auth, sandbox):
    response = client.post("/v1/sessions", headers=auth, json={
        "first_party": FIRST, "second_party": SECOND, "metadata": {"pad": "x" * (16 * 1024)}})
    assert "metadata" in assert_error(response, 400)["details"]["fields"]


def test_a_body_of_90000_unknown_fields_gets_a_short_answer_listing_twenty(client, auth, sandbox):
    # Just under the 1 MiB limit: the answer once listed every field (2.87 MB for 979 KB).
    fields = {f"f{n:05d}": 0 for n in range(90_000)}
    body = json.dumps({"first_party": FIRST, "second_party": SECOND} | fields, separators=(",", ":")).encode()
    assert 900_000 < len(body) < 1024 * 1024
    for method, path in (("post", "/v1/sessions"), ("patch", "/v1/sessions/some-uuid")):
        response = getattr(client, method)(path, data=body, headers=auth | {"Content-Type": "application/json"})
        if method == "patch":  # no such session: the 404 comes first, and is short too
            assert_error(response, 404)
            continue
        answer = assert_error(response, 400)
        assert len(response.get_data()) < 4096
        assert answer["message"] == "90000 fields are invalid; the first 20 are listed"
        assert answer["details"]["fields"] == {f"f{n:05d}": "is not a known field" for n in range(20)}
        assert answer["details"]["fields_not_listed"] == 89_980
    # One field with a 200 000-character name: named, but not echoed whole.
    response = client.post("/v1/sessions", headers=auth, json={"first_party": FIRST, "second_party": SECOND,
                                                                "n" * 200_000: 1})
    answer = assert_error(response, 400)
    assert len(response.get_data()) < 1024
    assert answer["details"]["fields"] == {"n" * 100 + "…": "is not a known field"}
    assert "fields_not_listed" not in answer["details"]


@pytest.mark.parametrize("raw", ["²", "¹⁰", "١٠", "５", "9" * 5000, " 5", "+5", "5_0", "1e1", "-1"])
def test_limit_takes_ascii_digits_only_and_says_so_in_its_own_words(client, auth, raw):
    # int() reads "١٠" as 10 and fails on "²" (which str.isdigit() accepts) or on 5000 digits in
    # Python's words ("invalid literal for int()", "Exceeds the limit"); the answer says what is expected.
    response = client.get("/v1/sessions", headers=auth, query_string={"limit": raw})
    answer = assert_error(response, 400)
    assert answer["details"]["fields"] == {"limit": "must be a whole number from 1 to 100"}
    assert "int()" not in response.get_data(as_text=True) and "literal" not in response.get_data(as_text=True)


@pytest.mark.parametrize("pin", ["١٢٣٤", "1234²", "１２３４"])
def test_pins_take_ascii_digits_only(client, auth, sandbox, pin):
    response = client.post("/v1/sessions", headers=auth, json={"first_party": FIRST, "second_party": SECOND,
                                                                "first_party_pin": pin})
    assert assert_error(response, 400)["details"]["fields"] == {"first_party_pin": "must be 4 to 15 digits"}
    assert requests.get(sandbox.url + "/sandbox/requests", timeout=5).json()["requests"] == []


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 8192):
        yield data[start:start + 8192]


def test_chunked_bodies_over_the_limit_are_refused_and_never_stored(live, engine):
    # No Content-Length: the body is cut at the limit (WEBHOOK_MAX_BODY_BYTES, 1 MiB for the API), so an
    # oversized chunked callback cannot verify or parse and nothing is stored.
    url = live.url + "/webhooks/plivo/session"
    for size in (100_000, 1_000_000):
        params = {"EventName": "SessionTimeout", "SessionUUID": f"chunked-{size}", "Padding": "x" * size}
        headers = {NONCE_HEADER: "1", SIGNATURE_HEADER: compute_signature("POST", url, params, "1",
                                                                          SANDBOX_AUTH_TOKEN)}
        for body, content_type in ((urlencode(params).encode(), "application/x-www-form-urlencoded"),
                                   (json.dumps(params).encode(), "application/json")):
            response = requests.post(url, data=_chunks(body), headers=headers | {"Content-Type": content_type},
                                     timeout=10)
            assert 400 <= response.status_code < 500 and set(response.json()) == {"error", "message", "details"}
    assert inbox_count(engine) == 0
    body = json.dumps({"first_party": FIRST, "second_party": SECOND, "metadata": {"pad": "x" * 1_100_000}})
    response = requests.post(live.url + "/v1/sessions", data=_chunks(body.encode()), timeout=10,
                             headers=AUTH | {"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500 and set(response.json()) == {"error", "message", "details"}


def _nested(depth: int, kind: str = "object") -> str:
    return ('{"a":' * depth + "1" + "}" * depth) if kind == "object" else ("[" * depth + "]" * depth)


def _post_nested(client, depth: int, kind: str):
    body = ('{"EventName": "SessionTimeout", "Deep": ' + _nested(depth, kind) + "}").encode()
    if len(body) > 64 * 1024:
        body = body[: 64 * 1024 - 1]  # still deeply nested; the size check has its own test
    return client.post("/webhooks/plivo/session", data=body, headers={
        NONCE_HEADER: "1", SIGNATURE_HEADER: "bm90LWl0", "Content-Type": "application/json"})


@pytest.mark.parametrize(("kind", "depth"), [("object", 50), ("object", 900), ("object", 5000), ("object", 50_000),
                                             ("array", 50), ("array", 400), ("array", 5000), ("array", 50_000)])
def test_deeply_nested_json_to_the_webhooks_is_a_4xx_and_stores_nothing(client, engine, kind, depth):
    response = _post_nested(client, depth, kind)
    assert response.status_code in (400, 403), response.get_data()[:200]  # unsigned: never verifies
    assert set(response.get_json()) == {"error", "message", "details"}
    assert inbox_count(engine) == 0


def test_unsigned_deeply_nested_json_arrays_are_a_4xx_not_a_500(client, engine):
    statuses = {depth: _post_nested(client, depth, "array").status_code for depth in range(460, 961, 20)}
    assert set(statuses.values()) <= {400, 403}, statuses
    assert inbox_count(engine) == 0


def _sign_deep(url: str, params: dict) -> str:
    # Our own recursion limit would stop us signing what the service may still parse: raise it briefly.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        return compute_signature("POST", url, params, "1", SANDBOX_AUTH_TOKEN)
    finally:
        sys.setrecursionlimit(limit)


def _nested_value(depth: int):
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deeply_nested_signed_json_callbacks_are_never_a_500(live, engine):
    url = live.url + "/webhooks/plivo/session"
    statuses = {}
    for depth in range(900, 1001, 5):
        params = {"EventName": "SessionTimeout", "Deep": _nested_value(depth)}
        body = json.dumps(params).encode() if depth < 950 else (
            '{"EventName": "SessionTimeout", "Deep": ' + _nested(depth) + "}").encode()
        response = requests.post(url, data=body, timeout=10, headers={
            NONCE_HEADER: "1", SIGNATURE_HEADER: _sign_deep(url, params), "Content-Type": "application/json"})
        statuses[depth] = response.status_code
    assert all(status in (200, 400) for status in statuses.values()), statuses


@pytest.mark.parametrize("body", [_nested(1000, "array"), _nested(100_000, "array"),
                                  '{"first_party": "+14155550100", "second_party": "+14155550123", "metadata": '
                                  + _nested(990) + "}"])
def test_deeply_nested_json_to_the_api_is_a_400_not_a_500(client, auth, sandbox, body):
    for method, path in (("post", "/v1/sessions"), ("patch", "/v1/sessions/some-uuid")):
        response = getattr(client, method)(path, data=body, headers=auth | {"Content-Type": "application/json"})
        assert_error(response, 400)


@pytest.mark.parametrize(("depth", "accepted"), [(3, True), (8, True), (9, False), (100, False), (900, False)])
def test_metadata_nested_up_to_eight_levels_is_accepted_and_returned_as_given(client, auth, sandbox, depth,
                                                                             accepted):
    body = '{"first_party": "+14155550100", "second_party": "+14155550123", "metadata": ' + _nested(depth) + "}"
    response = client.post("/v1/sessions", data=body, headers=auth | {"Content-Type": "application/json"})
    if not accepted:
        assert "nested more than" in assert_error(response, 400)["message"]
    else:
        assert response.status_code == 201
        assert json.dumps(response.get_json()["metadata"], separators=(",", ":")) == _nested(depth)


# Inputs Postgres cannot store: NUL, lone surrogates, non-finite numbers ----------------------


def test_nul_characters_in_api_input_are_a_400_not_a_500(client, auth, sandbox):
    base = {"first_party": FIRST, "second_party": SECOND}
    responses = [
        client.get("/v1/sessions/a%00b", headers=auth),
        client.delete("/v1/sessions/a%00b", headers=auth),
        client.patch("/v1/sessions/a%00b", headers=auth, json={"record": True}),
        client.get("/v1/sessions", headers=auth, query_string={"external_ref": "a\x00"}),
        client.post("/v1/sessions", headers=auth, json=base | {"external_ref": "a\x00"}),
        client.post("/v1/sessions", headers=auth, json=base | {"metadata": {"k": "v\x00"}}),
        client.post("/v1/sessions", headers=auth, json=base | {"subaccount": "sub\x00"}),
    ]
    assert [r.status_code for r in responses] == [404, 404, 404, 400, 400, 400, 400]


def test_lone_surrogates_in_json_are_a_4xx_not_a_500(client, auth, sandbox, engine):
    callback = client.post("/webhooks/plivo/session", data='{"EventName": "\\ud800"}', headers={
        NONCE_HEADER: "1", SIGNATURE_HEADER: "bm90LWl0", "Content-Type": "application/json"})
    api = client.post("/v1/sessions", headers=auth | {"Content-Type": "application/json"},
                      data='{"first_party": "+14155550100", "second_party": "+14155550123", "metadata": '
                           '{"k": "\\ud800"}}')
    assert (callback.status_code, api.status_code) == (400, 400)
    assert inbox_count(engine) == 0


def test_signed_callbacks_postgres_cannot_store_are_a_400_not_a_500(client, engine):
    statuses = [signed_post(client, "session", {"EventName": "SessionTimeout", "SessionUUID": "x\x00"}).status_code]
    for raw in ('{"EventName": "SessionTimeout", "SessionUUID": "nul\\u0000"}',
                '{"EventName": "SessionTimeout", "SessionUUID": "big", "X": 1e309}',
                '{"EventName": "SessionTimeout", "SessionUUID": "nan", "X": NaN}'):
        statuses.append(signed_post(client, "session", json.loads(raw), body=raw.encode(),
                                    content_type="application/json").status_code)
    assert statuses == [400, 400, 400, 400]
    assert inbox_count(engine) == 0


# Recording and play URLs: stored, never fetched (no SSRF) ----------------------------------------


class _HitRecorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    do_POST = do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def trap() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request made to it."""
    hits: list[str] = []
    handler = type("Trap", (_HitRecorder,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_recording_and_play_urls_that_are_not_plivos_are_stored_and_never_fetched(live, sandbox, engine, trap):
    from webhook_service.services.reconcile import reconcile

    base, hits = trap
    assert requests.get(f"{base}/control", timeout=5).status_code == 200 and hits == ["/control"]  # it records
    hits.clear()
    created = requests.post(live.url + "/v1/sessions", headers=AUTH, timeout=10, json={
        "first_party": FIRST, "second_party": SECOND, "record": True,
        "first_party_play_url": f"{base}/play.mp3", "second_party_play_url": f"{base}/play2.mp3"})
    assert created.status_code == 201, created.text
    uuid = created.json()["session_uuid"]
    url = live.url + "/webhooks/plivo/recording"
    for n, target in enumerate([f"{base}/rec.mp3", "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd",
                                f"{base}/../../admin?x=1"]):
        params = {"EventName": "SessionRecordingCompleted", "SessionUUID": uuid, "RecordingUUID": f"rec-{n}",
                  "EventTimestamp": "2026-11-20 10:01:00", "RecordingURL": target,
                  "RecordingResourceURL": f"{base}/resource/{n}",
                  "RecordingStartTime": "2026-11-20 10:00:00", "RecordingEndTime": "2026-11-20 10:01:00"}
        headers = {NONCE_HEADER: "1", SIGNATURE_HEADER: compute_signature("POST", url, params, "1",
                                                                          SANDBOX_AUTH_TOKEN)}
        assert requests.post(url, data=params, headers=headers, timeout=10).json() == {"status": "recorded"}
    details = requests.get(f"{live.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
    assert [r["recording_url"] for r in sorted(details["recordings"], key=lambda r: r["recording_uuid"])] == [
        f"{base}/rec.mp3", "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd",
        f"{base}/../../admin?x=1"]
    reconcile(live.app.extensions["webhook_service"])  # the background job does not fetch them either
    assert hits == []


# PII, tokens and credentials in logs -----------------------------------------------------------


class LogCapture:
    """The lines the service's JsonFormatter writes while a test runs."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def entries(self) -> list[dict]:
        entries = [json.loads(line) for line in self.stream.getvalue().splitlines()]  # one JSON object a line
        # The in-process sandbox (a stand-in for Plivo, never deployed) logs on loggers of its own.
        return [e for e in entries if not e["logger"].startswith(("plivo_sandbox", "werkzeug"))]

    def text(self) -> str:
        return "\n".join(json.dumps(e, ensure_ascii=False) for e in self.entries())


@pytest.fixture
def json_logs() -> Iterator[LogCapture]:
    """Capture every log record (INFO and up once the app sets LOG_LEVEL=INFO) as JSON lines."""
    capture = LogCapture()
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    yield capture
    root.removeHandler(handler)
    root.setLevel(level)


SECRETS = [API_TOKEN, "second-token-2", SANDBOX_AUTH_TOKEN]


def test_logs_mask_phone_numbers_and_never_contain_tokens(database_url, sandbox, engine, json_logs):
    port = free_port()
    settings = make_settings(sandbox.url, f"http://127.0.0.1:{port}", LOG_LEVEL="INFO")
    server = LiveServer(create_app({"TESTING": True, "settings": settings, "database_url": database_url}), port)
    server.start()
    try:
        created = requests.post(server.url + "/v1/sessions", headers=AUTH, timeout=10,
                                json={"first_party": FIRST, "second_party": SECOND, "record": True})
        uuid = created.json()["session_uuid"]
        played = requests.post(f"{sandbox.url}/sandbox/sessions/{uuid}/calls", json={"duration": 30}, timeout=30)
        assert played.status_code == 200 and {c["status"] for c in played.json()["callbacks"]} == {200}
        url = server.url + "/webhooks/plivo/session"
        settle(server.app)
        # A projection that fails with a database error quoting phone numbers (read-your-writes
        # projects it in the request, so its error is logged before the request answers).
        failing = {"EventName": "SessionFirstPartyHangup", "SessionUUID": uuid, "From": FIRST, "To": SECOND,
                   "BilledDuration": "60", "EventTimestamp": "2026-11-20 10:00:00"}
        with writes_refused(engine, "call_legs", "'refused a leg from % to %', NEW.from_number, NEW.to_number"):
            for params, token in ((failing, SANDBOX_AUTH_TOKEN), ({"From": FIRST}, "forged")):
                signature = compute_signature("POST", url, params, "1", token)
                requests.post(url, data=params, headers={NONCE_HEADER: "1", SIGNATURE_HEADER: signature}, timeout=10)
            pending = requests.get(f"{server.url}/v1/sessions/{uuid}", headers=AUTH, timeout=10).json()
            assert pending["projection_pending"] is True
        requests.get(f"{server.url}/v1/sessions", headers=AUTH, params={"first_party": FIRST}, timeout=10)
        requests.get(f"{server.url}/v1/sessions/{FIRST}", headers=AUTH, timeout=10)
        requests.get(f"{server.url}/v1/sessions", headers={"Authorization": "Bearer wrong-token-zzz"}, timeout=10)
    finally:
        server.stop()
    entries, logged = json_logs.entries(), json_logs.text()
    assert any(e["logger"] == "webhook_service.access" for e in entries), "nothing was logged"
    for number in (FIRST, SECOND, FIRST[1:], SECOND[1:]):
        assert number not in logged, f"{number} appears in the logs"
    assert mask_phone(FIRST) in logged  # the masked form is what identifies a party in the logs
    assert any("exception" in e and "refused a leg" in e["exception"] for e in entries), (
        "the failing projection's exception was not logged")
    for secret in SECRETS + ["wrong-token-zzz"]:
        assert secret not in logged, "a token appears in the logs"


def test_database_credentials_never_appear_in_logs_or_answers(sandbox, json_logs):
    secret = "hunter2-db-secret"
    url = unavailable_database_url().replace("postgres@", f"service:{secret}@")
    app = create_app({"TESTING": True, "database_url": url,
                      "settings": make_settings(sandbox.url, LOG_LEVEL="INFO", DB_CONNECT_TIMEOUT=1)})
    client = app.test_client()
    answers = [client.get("/v1/sessions", headers=AUTH), client.get("/readyz"),
               client.post("/v1/sessions", headers=AUTH, json={"first_party": FIRST, "second_party": SECOND}),
               signed_post(client, "session", {"EventName": "SessionTimeout", "SessionUUID": "db-down"})]
    assert [a.status_code for a in answers] == [503, 503, 503, 503]
    for answer in answers:
        assert secret not in answer.get_data(as_text=True) and "service:" not in answer.get_data(as_text=True)
    logged = json_logs.stream.getvalue()
    assert "database unavailable" in logged
    assert secret not in logged


def test_log_lines_cannot_be_forged_through_request_values(database_url, sandbox, auth, json_logs):
    app = create_app({"TESTING": True, "database_url": database_url,
                      "settings": make_settings(sandbox.url, LOG_LEVEL="INFO")})  # the access log is at INFO
    client = app.test_client()
    forged = 'x"}\n{"level": "error", "message": "forged'
    try:
        client.get("/v1/sessions/" + requests.utils.quote(forged, safe=""), headers=auth)
        signed_post(client, "session", {"EventName": "SessionTimeout", "SessionUUID": forged, "From": forged,
                                        "EventTimestamp": "2026-11-20 10:00:00"})
    finally:
        app.extensions["webhook_service"].close()
    entries = json_logs.entries()  # every line parses: a newline in a value stays inside its JSON string
    seen = [e for e in entries if e["logger"] == "webhook_service.access"]
    assert [e["route"] for e in seen] == ["/v1/sessions/<session_uuid>",
                                          "/webhooks/plivo/<any(session, recording):kind>"]
    assert all(e["session_uuid"] == forged for e in seen)  # the forged text was logged, inside its field
    assert [e for e in entries if e.get("message") == "forged"] == []


# Error answers leak nothing ---------------------------------------------------------------------


def test_an_unexpected_error_answers_a_generic_500_without_a_stack_trace(client, auth, sandbox, monkeypatch):
    from webhook_service.services import inbox
    from webhook_service.services import sessions as service

    def boom(*args, **kwargs):
        raise RuntimeError("boom in /srv/app/secret_module.py password=hunter2 +14155550100")

    monkeypatch.setattr(service, "list_sessions", boom)
    monkeypatch.setattr(inbox, "receive", boom)
    answers = [client.get("/v1/sessions", headers=auth),
               signed_post(client, "session", {"EventName": "SessionTimeout", "SessionUUID": "boom"})]
    for answer in answers:
        assert answer.status_code == 500 and answer.get_json() == GENERIC_500
        body = answer.get_data(as_text=True)
        for leak in ("Traceback", "RuntimeError", "secret_module", "hunter2", "+14155550100", "File \""):
            assert leak not in body


@pytest.mark.parametrize("method,path", [("get", "/nope"), ("put", "/v1/sessions"), ("get", "/webhooks/plivo/x"),
                                         ("delete", "/webhooks/plivo/session")])
def test_unknown_routes_and_methods_answer_json_not_html(client, auth, method, path):
    response = getattr(client, method)(path, headers=auth)
    assert response.status_code in (404, 405) and response.mimetype == "application/json"
    assert "<html" not in response.get_data(as_text=True).lower()
