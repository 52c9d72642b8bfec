"""Property-based tests of Plivo's callback routes: any parameters, types, encodings and sizes.

Through the real route (Flask test client, so the signed URL is `PUBLIC_BASE_URL` + path, i.e.
`http://127.0.0.1:9/webhooks/plivo/...`), against real Postgres. For every generated callback:

* never a 5xx;
* the status is exactly what the order of checks gives: 405 for a method the callbacks were not
  configured with, 413 over the size limit, 403 without the signature headers, 400 for a body that
  does not parse or a value that is not a string or a number (an object, an array, a boolean, null,
  a repeated form field), 403 for a signature that does not verify, and 200 only when the
  signature verified and the body parsed;
* a 200 leaves exactly one inbox row under the dedupe key that Plivo's own SDK gives (the SHA-256
  of the string its signature covers), `recorded`, `ignored` or `failed`, and says which (or
  `duplicate` if it was there);
* a 4xx stores nothing at all;
* after every example, once projected, nothing is partial anywhere: every session's counters equal
  a recount of its call legs and recordings, and the daily totals equal a recount.

Each example sends one to four callbacks, often to the same session, starting from empty tables
(the autouse fixture empties them per test only; `reset` does it per example, so that a failure
replays and shrinks deterministically).

Inputs the generators leave out, because the service refuses them with a 400 before any
signature check (dedicated tests in tests/test_security.py cover each): NUL characters and lone
surrogates (Postgres cannot store them), non-finite JSON numbers (`1e309`, `NaN`, `Infinity`:
jsonb refuses them), JSON nested more than 8 levels deep. A non-numeric `Amount` ("NaN") is
generated: `test_a_non_numeric_amount_never_reaches_the_stored_amounts` checks it is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from sqlalchemy import text

from webhook_service import create_app
from webhook_service.plivo.signature import NONCE_HEADER, SIGNATURE_HEADER, compute_signature
from webhook_service.services.reporting import kept_totals, recount
from webhook_service.settings import SANDBOX_AUTH_TOKEN
from webhook_service.web.openapi import build_document

from .helpers import API_TOKEN, make_settings, plivo_dedupe_key, settle

PUBLIC = "http://127.0.0.1:9"  # make_settings' default PUBLIC_BASE_URL: what the app signs over
LIMIT = 64 * 1024  # WEBHOOK_MAX_BODY_BYTES default
SETTINGS = settings(
    max_examples=100,  # each example sends 1 to 4 callbacks
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)

SESSION_EVENTS = [
    "SessionFirstPartyAnswer", "SessionFirstPartyRing", "SessionSecondPartyRing", "SessionSecondPartyAnswer",
    "SessionFirstPartyHangup", "SessionSecondPartyHangup", "SessionPinAuthenticationStatus", "SessionTimeout",
    "SessionVirtualNumberReplaced", "SessionPartiesHangup", "SessionFirstPartyInitiated", "SessionFirstPartyRinging",
    "SessionFirstPartyComplete", "SessionFirstPartyFailed", "SessionSecondPartyInitiated",
    "SessionSecondPartyRinging", "SessionSecondPartyComplete", "SessionSecondPartyFailed",
    "SessionVirtualNumberAnswer",
]
RECORDING_EVENTS = ["SessionRecordingInitiated", "SessionRecordingCompleted", "SessionRecordingFailed"]
FIELDS = [
    "EventTimestamp", "From", "To", "FirstParty", "SecondParty", "VirtualNumber", "Duration", "BilledDuration",
    "Amount", "PlivoHangupCause", "PlivoHangupCauseCode", "SequenceNumber", "CallUUID", "RecordingUUID",
    "RecordingURL", "RecordingResourceURL", "RecordingDuration", "RecordingFormat", "RecordingStartTime",
    "RecordingEndTime", "PinAuthenticationStatus", "PinRetryCounter", "CallStatus", "Direction",
]

# Text: any Unicode except NUL and surrogates (refused with a 400; see the module docstring).
chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
texts = st.text(chars, max_size=30)
garbage = st.sampled_from([
    "", " ", "yesterday", "NaN", "nan", "sNaN", "-NaN", "Infinity", "-Infinity", "inf", "-1", "0", "-0", "1e309",
    "1e-400", "1e30", "99999999999", "0x10", "1_000", "٣", "１２", "+", "++14155550100", "+14155550100",
    "14155550100", "4.5", "-4.5", "1,5", "true", "null", "[]", "{}", "%00", "%2B", "a+b", "2026-13-45 25:61:61",
    "2026-11-20 10:00:00", "2026-11-20T10:00:00Z", "0001-01-01 00:00:00", "9999-12-31 23:59:59",
    "2023-07-12 15:52:14.772699 +0000 UTC", "9" * 400, "-" + "9" * 40, "http://127.0.0.1:1/x.mp3",
    "file:///etc/passwd", "' OR 1=1 --", "\u202e\ufeff", "ñ" * 300,
])
values = st.one_of(texts, garbage, st.integers(-10**20, 10**20).map(str),
                   st.floats(allow_nan=False, allow_infinity=False).map(repr),
                   st.integers(0, 3000).map(lambda n: "é" * n))
keys = st.one_of(st.sampled_from(FIELDS), texts, st.just(""), st.just("+"), st.just("a b&c=d"))
event_names = st.one_of(st.sampled_from(SESSION_EVENTS + RECORDING_EVENTS), texts,
                        st.sampled_from(SESSION_EVENTS).map(str.lower), st.sampled_from(["", " SessionTimeout"]))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=False, allow_infinity=False), texts, garbage)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=12)


realistic = {
    "EventTimestamp": st.datetimes().map(lambda t: t.strftime("%Y-%m-%d %H:%M:%S")),
    "Duration": st.integers(0, 7200).map(str), "BilledDuration": st.integers(0, 7200).map(str),
    "Amount": st.decimals(0, 100, places=5).map(str), "PlivoHangupCauseCode": st.integers(0, 9999).map(str),
    "From": st.sampled_from(["+14155550100", "14155550123", "+16505550199"]),
    "To": st.sampled_from(["+14155550100", "14155550123", "+16505550199"]),
    "RecordingUUID": st.sampled_from(["rec-1", "rec-2", "rec-3"]),
    "RecordingURL": st.sampled_from(["https://media.plivo.com/x.mp3", "http://127.0.0.1:1/steal", "ftp://x"]),
}
# A few sessions that the callbacks of one example share (so they build up on one session), or a fresh one.
SHARED_SESSIONS = [f"5a1c0e6e-0000-4000-8000-00000000f00{n}" for n in range(4)]


@st.composite
def callbacks(draw, kind: str, encoding: str) -> dict[str, Any]:
    """A callback's parameters: real event names and fields with real or garbage values, or anything."""
    value = json_values if encoding == "json" else values
    params: dict[str, Any] = {}
    choice = draw(st.integers(0, 9))
    if choice < 7:  # mostly a real event of this endpoint (so the handlers run), sometimes of the other
        params["EventName"] = draw(st.sampled_from(RECORDING_EVENTS if kind == "recording" else SESSION_EVENTS))
    elif choice < 8:
        params["EventName"] = draw(st.sampled_from(SESSION_EVENTS + RECORDING_EVENTS))
    elif choice < 9:
        params["EventName"] = draw(event_names if encoding != "json" else event_names | json_scalars)
    choice = draw(st.integers(0, 9))
    if choice < 4:
        params["SessionUUID"] = draw(st.sampled_from(SHARED_SESSIONS))
    elif choice < 8:
        params["SessionUUID"] = str(draw(st.uuids()))
    elif choice < 9:
        params["SessionUUID"] = draw(value)
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=10)):
        strategy = realistic.get(name, texts) if draw(st.booleans()) else value
        params[name] = draw(strategy)
    params.update(draw(st.dictionaries(keys, value, max_size=4)))
    if encoding != "json" and draw(st.integers(0, 9)) == 0:  # a repeated key (multi-valued form field)
        params[draw(keys)] = draw(st.lists(values, min_size=2, max_size=3))
    return params


kinds = st.sampled_from(["session", "recording"])
paddings = st.one_of(st.just(0), st.integers(0, 2000), st.sampled_from([LIMIT // 3 - 300, LIMIT - 2000, LIMIT,
                                                                         LIMIT + 1, 70_000, 200_000]))


def _flat(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters as the app sees a form or a query: one value per key, or the list of them."""
    return {k: (v if not isinstance(v, list) else v[0] if len(v) == 1 else v)
            for k, v in params.items() if not (isinstance(v, list) and not v)}


def reset(engine) -> None:
    """Empty every table, so each example starts from nothing and a failure replays exactly."""
    with engine.begin() as conn:  # DELETE: much faster than TRUNCATE on a handful of rows
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                   "AND tablename <> 'alembic_version'")).scalars().all()
        for table in sorted(tables, key=lambda t: t == "masking_sessions"):  # its children first
            conn.execute(text(f'DELETE FROM "{table}"'))


def _inbox(engine, key: str | None = None) -> list:
    with engine.connect() as conn:
        if key is None:
            return conn.execute(text("SELECT dedupe_key, status FROM callback_inbox")).all()
        return conn.execute(text("SELECT status, error FROM callback_inbox WHERE dedupe_key = :k"), {"k": key}).all()


def assert_nothing_partial(app, engine) -> None:
    """Once projected, every session's counters equal a recount of its legs and recordings; the daily totals too."""
    settle(app)
    with engine.begin() as conn:
        wrong = conn.execute(text("""
            SELECT s.session_uuid, s.call_count, l.n, s.answered_call_count, l.answered, s.billed_duration, l.billed,
                   s.amount, l.amount, s.recording_count, r.n
              FROM masking_sessions s,
                   LATERAL (SELECT count(*) AS n, count(answered_at) AS answered,
                                   coalesce(sum(billed_duration), 0) AS billed, coalesce(sum(amount), 0) AS amount
                              FROM call_legs WHERE session_id = s.id) l,
                   LATERAL (SELECT count(*) AS n FROM recordings WHERE session_id = s.id AND status <> 'failed') r
             WHERE (s.call_count, s.answered_call_count, s.billed_duration, s.amount, s.recording_count)
                   IS DISTINCT FROM (l.n, l.answered, l.billed, l.amount, r.n)
        """)).all()
        assert wrong == [], f"session counters differ from a recount of their legs: {wrong}"
        assert kept_totals(conn) == recount(conn), "daily totals differ from a recount"
        assert conn.execute(text("SELECT count(*) FROM projection_queue")).scalar() == 0


def _headers(draw, method: str, url: str, params: dict[str, Any] | None) -> tuple[dict[str, str], bool]:
    """The signature headers in one of several states; True if they should verify."""
    nonce = draw(st.one_of(st.from_regex(r"[0-9]{1,20}", fullmatch=True),
                           st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)))
    mode = draw(st.sampled_from(["correct", "correct", "correct", "wrong_token", "garbage", "no_signature",
                                 "no_nonce", "empty", "other_path"]))
    try:
        if mode == "correct":
            return {NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature(method, url, params, nonce,
                                                                             SANDBOX_AUTH_TOKEN)}, True
        if mode == "wrong_token":
            return {NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature(method, url, params, nonce,
                                                                             "a-rotated-out-token")}, False
        if mode == "other_path":
            other = url.replace("/session", "/x") if url.endswith("/session") else url.replace("/recording", "/x")
            return {NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature(method, other, params, nonce,
                                                                             SANDBOX_AUTH_TOKEN)}, False
    except TypeError:  # parameters that cannot be signed (a JSON list mixing types): they never verify
        return {NONCE_HEADER: nonce, SIGNATURE_HEADER: "bm90LWl0"}, False
    if mode == "garbage":
        return {NONCE_HEADER: nonce, SIGNATURE_HEADER: draw(st.text(
            st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=60).filter(str.strip))}, False
    if mode == "no_signature":
        return {NONCE_HEADER: nonce}, False
    if mode == "no_nonce":
        return {SIGNATURE_HEADER: "bm90LWl0"}, False
    return {NONCE_HEADER: "", SIGNATURE_HEADER: ""}, False


def _label(status: int, payload: dict) -> None:
    if currently_in_test_context():  # for --hypothesis-show-statistics
        event(f"{status} {payload.get('status') or payload.get('error')}")


def _plain(params: dict[str, Any]) -> bool:
    """Every value a string or a number, as Plivo sends them (anything else is a 400)."""
    return all(isinstance(v, str) or (isinstance(v, int | float) and not isinstance(v, bool)) for v in params.values())


def check(client, engine, kind: str, method: str, sent: dict[str, Any] | None, headers: dict[str, str],
          verifies: bool, *, body: bytes | None = None, content_type: str | None = None,
          query: str | None = None) -> None:
    """Send one callback and check the property (see the module docstring)."""
    path = f"/webhooks/plivo/{kind}"
    readable = sent is not None and _plain(sent)
    key = plivo_dedupe_key(method, f"{PUBLIC}{path}", sent) if readable else None
    before_all = len(_inbox(engine))
    before = _inbox(engine, key) if key else []
    if method == "GET":
        response = client.get(path, query_string=query, headers=headers)
    else:
        response = client.post(path, data=body, headers=headers | ({"Content-Type": content_type}
                                                                   if content_type else {}))
    status = response.status_code
    assert status < 500, (status, response.get_data(as_text=True)[:500])
    payload = response.get_json(silent=True)
    assert isinstance(payload, dict), response.get_data()[:200]

    too_large = method == "POST" and len(body or b"") > LIMIT
    has_headers = bool(headers.get(SIGNATURE_HEADER)) and bool(headers.get(NONCE_HEADER))
    if too_large:
        expected = 413
    elif not has_headers:
        expected = 403
    elif not readable:  # the body does not parse, or holds a value Plivo never sends
        expected = 400
    else:
        expected = 200 if verifies else 403
    assert status == expected, (status, payload)
    _label(status, payload)

    if status != 200:
        assert set(payload) == {"error", "message", "details"}
        assert len(_inbox(engine)) == before_all, "a refused callback stored something"
        return
    rows = _inbox(engine, key)
    assert len(rows) == 1, f"{len(rows)} inbox rows for one dedupe key"
    [(row_status, error)] = rows
    assert row_status in ("recorded", "ignored", "failed"), f"inbox row left {row_status}"
    assert (row_status == "failed") == (error is not None)
    if before:
        assert payload == {"status": "duplicate"} and len(_inbox(engine)) == before_all
    else:
        assert payload == {"status": row_status} and len(_inbox(engine)) == before_all + 1
    assert_nothing_partial(client.application, engine)


# Form-encoded POST (what Plivo sends by default) ------------------------------------------------


def _form(data, kind: str, method: str) -> None:
    params = data.draw(callbacks(kind, "form"))
    padding = data.draw(paddings) if method == "POST" else data.draw(st.sampled_from([0, 0, 100, 5000]))
    if padding:
        params = params | {"Padding": "+" * (padding // 3)}  # '+' becomes %2B: three bytes each
    sent = _flat(params)
    return params, sent, _headers(data.draw, method, f"{PUBLIC}/webhooks/plivo/{kind}", sent)


@SETTINGS
@given(data=st.data(), kinds_=st.lists(kinds, min_size=1, max_size=4))
def test_form_callbacks(client, engine, data, kinds_):
    reset(engine)
    for kind in kinds_:
        params, sent, (headers, verifies) = _form(data, kind, "POST")
        content_type = data.draw(st.sampled_from(["application/x-www-form-urlencoded",
                                                  "application/x-www-form-urlencoded; charset=utf-8"]))
        check(client, engine, kind, "POST", sent, headers, verifies, body=urlencode(params, doseq=True).encode(),
              content_type=content_type)


# JSON POST: nested objects, arrays, numbers, booleans, null ----------------------------------


@SETTINGS
@given(data=st.data(), kinds_=st.lists(kinds, min_size=1, max_size=4))
def test_json_callbacks(client, engine, data, kinds_):
    reset(engine)
    for kind in kinds_:
        params = data.draw(callbacks(kind, "json"))
        padding = data.draw(paddings)
        if padding:
            params = params | {"Padding": "x" * padding}
        headers, verifies = _headers(data.draw, "POST", f"{PUBLIC}/webhooks/plivo/{kind}", params)
        body = json.dumps(params, ensure_ascii=data.draw(st.booleans())).encode()
        content_type = data.draw(st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                  "application/vnd.plivo+json"]))
        check(client, engine, kind, "POST", params, headers, verifies, body=body, content_type=content_type)


# GET with the parameters in the query ---------------------------------------------------------


@pytest.fixture
def get_client(database_url, sandbox):
    """The app configured for GET callbacks (CALLBACK_METHOD=GET)."""
    app = create_app({"TESTING": True, "database_url": database_url,
                      "settings": make_settings(sandbox.url, CALLBACK_METHOD="GET", PROJECT_IN_WEB="false")})
    yield app.test_client()
    app.extensions["webhook_service"].close()


@SETTINGS
@given(data=st.data(), kinds_=st.lists(kinds, min_size=1, max_size=4))
def test_get_callbacks(get_client, engine, data, kinds_):
    reset(engine)
    for kind in kinds_:
        params, sent, (headers, verifies) = _form(data, kind, "GET")
        check(get_client, engine, kind, "GET", sent, headers, verifies, query=urlencode(params, doseq=True))


# Bodies that are not what they claim ---------------------------------------------------------


@SETTINGS
@given(data=st.data(), kind=kinds,
       body=st.one_of(st.binary(max_size=2000),
                      st.sampled_from([b"{not json", b"[1, 2]", b'"text"', b"null", b"1e309", b"\xff\xfe{\x00}\x00",
                                       b"\xef\xbb\xbf{}", b"[" * 3000 + b"]" * 3000, b'{"a":' * 3000 + b"1"
                                       + b"}" * 3000, b"--x\r\nContent-Disposition: form-data\r\n\r\n"])),
       content_type=st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain",
                                     "multipart/form-data", "multipart/form-data; boundary=x", None]))
def test_arbitrary_bodies_never_5xx_and_store_nothing_unless_verified(client, engine, data, kind, body,
                                                                      content_type):
    # Signed as if the body carried no parameters at all: only a body the app reads as empty can verify.
    headers, _ = _headers(data.draw, "POST", f"{PUBLIC}/webhooks/plivo/{kind}", {})
    path = f"/webhooks/plivo/{kind}"
    before = len(_inbox(engine))
    response = client.post(path, data=body, headers=headers | ({"Content-Type": content_type} if content_type else {}))
    assert response.status_code < 500, (response.status_code, response.get_data()[:300])
    rows = _inbox(engine)
    if response.status_code == 200:
        assert response.get_json()["status"] in ("ignored", "duplicate")
        assert plivo_dedupe_key("POST", f"{PUBLIC}{path}", {}) in {r.dedupe_key for r in rows}
        assert len(rows) - before <= 1
    else:
        assert len(rows) == before
        assert set(response.get_json()) == {"error", "message", "details"}


# Known shapes, every boundary ----------------------------------------------------------------


@pytest.mark.parametrize("size", [LIMIT - 200, LIMIT, LIMIT + 1, 3 * LIMIT])
def test_sizes_around_the_limit(client, engine, size):
    params = {"EventName": "SessionTimeout", "SessionUUID": f"size-{size}", "Padding": ""}
    overhead = len(urlencode(params))
    params["Padding"] = "x" * max(size - overhead, 0)
    body = urlencode(params).encode()
    headers = {NONCE_HEADER: "1", SIGNATURE_HEADER: compute_signature(
        "POST", f"{PUBLIC}/webhooks/plivo/session", params, "1", SANDBOX_AUTH_TOKEN)}
    check(client, engine, "session", "POST", params, headers, True, body=body,
          content_type="application/x-www-form-urlencoded")
    assert (size <= LIMIT) == bool(_inbox(engine))


def test_real_events_with_garbage_values_are_stored_once_and_nothing_is_partial(client, engine):
    garbage_fields = {"EventTimestamp": "yesterday", "Amount": "NaN", "Duration": "-1", "BilledDuration": "1e309",
                      "SequenceNumber": "9" * 400, "PlivoHangupCauseCode": "Infinity", "From": "+",
                      "RecordingDuration": "-5", "RecordingStartTime": "2026-13-45 25:61:61"}
    for n, name in enumerate(SESSION_EVENTS + RECORDING_EVENTS):
        kind = "recording" if name in RECORDING_EVENTS else "session"
        for field, value in garbage_fields.items():
            params = {"EventName": name, "SessionUUID": f"garbage-{n}", "RecordingUUID": f"rec-{n}",
                      "EventTimestamp": "2026-11-20 10:00:00", field: value}
            headers = {NONCE_HEADER: "7", SIGNATURE_HEADER: compute_signature(
                "POST", f"{PUBLIC}/webhooks/plivo/{kind}", params, "7", SANDBOX_AUTH_TOKEN)}
            check(client, engine, kind, "POST", params, headers, True, body=urlencode(params).encode(),
                  content_type="application/x-www-form-urlencoded")


@pytest.mark.parametrize("amount", ["NaN", "sNaN", "-NaN"])
def test_a_non_numeric_amount_never_reaches_the_stored_amounts(client, engine, amount):
    params = {"EventName": "SessionFirstPartyHangup", "SessionUUID": f"nan-{amount}", "Amount": amount,
              "BilledDuration": "60", "EventTimestamp": "2026-11-20 10:00:00"}
    headers = {NONCE_HEADER: "7", SIGNATURE_HEADER: compute_signature(
        "POST", f"{PUBLIC}/webhooks/plivo/session", params, "7", SANDBOX_AUTH_TOKEN)}
    check(client, engine, "session", "POST", params, headers, True, body=urlencode(params).encode(),
          content_type="application/x-www-form-urlencoded")
    with engine.connect() as conn:
        amounts = conn.execute(text("SELECT amount FROM masking_sessions UNION ALL SELECT amount FROM call_legs "
                                    "UNION ALL SELECT amount FROM daily_call_totals")).scalars().all()
    assert amounts and all(a is None or a.is_finite() for a in amounts), amounts
    with engine.connect() as conn:  # the amount is unknown; the rest of the callback counts
        assert conn.execute(text("SELECT amount, billed_duration FROM call_legs")).all() == [(None, 60)]
        assert conn.execute(text("SELECT amount, billed_duration FROM masking_sessions")).all() == [(0, 60)]
    session = client.get(f"/v1/sessions/nan-{amount}", headers={"Authorization": f"Bearer {API_TOKEN}"}).get_json()
    decimal = build_document()["components"]["schemas"]["Session"]["properties"]["amount"]["pattern"]
    assert re.fullmatch(decimal, session["amount"]), session["amount"]
