"""A captured callback replayed in other shapes is refused or a duplicate, and changes no total.

Plivo's V3 signature is an HMAC over the URL and the parameters sorted and concatenated as
`key + value`, with no separators and no types (reference §10.2). So many parameter sets sign the
same: a value's tail moved into the next key, a value wrapped in a JSON array or split into a JSON
object, the form re-sent as JSON, a string re-sent as a JSON number. An attacker holding one signed
callback (from a log, say) can send every such reshaping with its signature and nonce.

Each example here takes a real signed callback (a leg's hangup, with billing), delivers it once,
then delivers a reshaping of it with the same headers; the reshaping must be refused (4xx) or be
answered `duplicate`, and must leave the inbox, the facts and the session's counters as they were.
The service closes the class, not instances: the dedupe key is the hash of the signed string itself
(so any reshaping that verifies is the same callback), values must be strings or numbers, and the
method is part of the identity.

`HYPOTHESIS_PROFILE=thorough` runs 5 000 examples (the default is 1 000, about 10 s).
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from urllib.parse import urlencode

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from webhook_service.plivo.signature import string_to_sign

from .helpers import signed_headers

PUBLIC = "http://127.0.0.1:9"  # make_settings' default PUBLIC_BASE_URL
PATH = "/webhooks/plivo/session"
settings.register_profile("thorough", max_examples=5000)
EXAMPLES = settings(max_examples=1000, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def hangup(session_uuid: str) -> dict[str, str]:
    return {"EventName": "SessionFirstPartyHangup", "EventTimestamp": "2026-11-20 10:01:37",
            "SessionUUID": session_uuid, "From": "+14155550100", "To": "+14155550123",
            "VirtualNumber": "+16505550100", "Duration": "97", "BilledDuration": "120", "Amount": "0.01700",
            "PlivoHangupCause": "NORMAL_CLEARING", "PlivoHangupCauseCode": "4000", "SequenceNumber": "6"}


@st.composite
def splits(draw, params: dict[str, str]) -> dict[str, str]:
    """The same concatenation cut into other keys and values (keys still sorted, so it signs the same)."""
    joined = "".join(k + params[k] for k in sorted(params))
    cuts = sorted(draw(st.sets(st.integers(1, len(joined) - 1), min_size=1, max_size=2 * len(params) + 3)))
    pieces = [joined[a:b] for a, b in zip([0, *cuts], [*cuts, len(joined)], strict=True)]
    if len(pieces) % 2:
        pieces.append("")
    keys, values = pieces[0::2], pieces[1::2]
    assume(keys == sorted(keys) and len(set(keys)) == len(keys))
    return dict(zip(keys, values, strict=True))


@st.composite
def containers(draw, params: dict[str, str]) -> dict[str, object]:
    """One or more values wrapped in a JSON array, or split into a one-key JSON object."""
    reshaped: dict[str, object] = dict(params)
    for key in draw(st.lists(st.sampled_from(sorted(params)), min_size=1, max_size=3, unique=True)):
        value = params[key]
        if draw(st.booleans()) or len(value) < 2:
            reshaped[key] = [value]
        else:
            cut = draw(st.integers(1, len(value) - 1))
            reshaped[key] = {value[:cut]: value[cut:]}
    return reshaped


@st.composite
def numbers(draw, params: dict[str, str]) -> dict[str, object]:
    """Numeric strings re-sent as JSON numbers (`"120"` → `120`, `"0.01700"` → `0.017`)."""
    reshaped: dict[str, object] = dict(params)
    for key, value in params.items():
        if draw(st.booleans()):
            try:
                reshaped[key] = int(value)
            except ValueError:
                try:
                    reshaped[key] = float(value)
                except ValueError:
                    pass
    return reshaped


def deliver(client, params: dict[str, object], headers: dict[str, str], shape: str):
    if shape == "form":
        return client.post(PATH, data=urlencode(params), headers=headers,
                           content_type="application/x-www-form-urlencoded")
    if shape == "json":
        return client.post(PATH, data=json.dumps(params), headers=headers, content_type="application/json")
    if shape == "get":
        return client.get(PATH, query_string=urlencode(params), headers=headers)
    return client.open(PATH, method="HEAD", query_string=urlencode(params), headers=headers)


def counts(engine, session_uuid: str) -> tuple:
    with engine.connect() as conn:
        return (conn.execute(text("SELECT count(*) FROM callback_inbox")).scalar(),
                conn.execute(text("SELECT count(*) FROM callback_facts WHERE session_uuid = :u"),
                             {"u": session_uuid}).scalar(),
                conn.execute(text("SELECT call_count, billed_duration, amount FROM masking_sessions"
                                  " WHERE session_uuid = :u"), {"u": session_uuid}).one())


def test_every_reshaping_of_a_signed_callback_is_refused_or_a_duplicate(app, client, engine):
    session_uuid = str(uuid.uuid4())
    original = hangup(session_uuid)
    headers = signed_headers("POST", PUBLIC + PATH, original)
    assert deliver(client, original, headers, "form").get_json() == {"status": "recorded"}
    projector = app.extensions["webhook_service"].projector
    projector.project([session_uuid], wait=True)
    before = counts(engine, session_uuid)
    assert before[1:] == (1, (1, 120, Decimal("0.01700")))
    seen: dict[str, int] = {}

    @EXAMPLES
    @given(data=st.data())
    def reshaped_and_replayed(data):
        reshaped = data.draw(st.one_of(splits(original), containers(original), numbers(original),
                                       st.just(original)))
        shape = data.draw(st.sampled_from(["form", "json", "get", "head"]))
        if shape in ("form", "get", "head"):
            assume(all(isinstance(v, str) for v in reshaped.values()))
        answer = deliver(client, reshaped, headers, shape)
        assert answer.status_code in (200, 400, 403, 405, 415), (answer.status_code, answer.get_data()[:200])
        if answer.status_code == 200:
            assert answer.get_json() == {"status": "duplicate"}, (shape, reshaped)
        outcome = f"{answer.status_code} {shape}"
        seen[outcome] = seen.get(outcome, 0) + 1
        assert counts(engine, session_uuid)[:2] == before[:2], (shape, reshaped)  # no row stored, no fact

    reshaped_and_replayed()
    projector.project([session_uuid], wait=True)
    assert counts(engine, session_uuid) == before  # the counters never changed
    # Every kind of answer was met, so the property was not passed vacuously.
    assert {"200 form", "200 json", "400 json", "403 json", "405 get", "405 head"} <= set(seen), seen


def test_the_reshapings_the_probe_found_sign_the_same_and_are_now_duplicates_or_refused(app, client, engine):
    """The review's reproductions, by name: each signs exactly as the original (so the signature
    verifies), and each is now refused (containers: 400) or a duplicate (everything else)."""
    session_uuid = str(uuid.uuid4())
    original = hangup(session_uuid)
    headers = signed_headers("POST", PUBLIC + PATH, original)
    assert deliver(client, original, headers, "form").get_json() == {"status": "recorded"}
    stamp = original["EventTimestamp"]
    reshapings = {
        "timestamp as an object": (original | {"EventTimestamp": {stamp[:1]: stamp[1:]}}, "json", 400),
        "timestamp as an array": (original | {"EventTimestamp": [stamp]}, "json", 400),
        "the form re-sent as JSON": (original, "json", 200),
        "a key's tail moved into its value": (
            {k: v for k, v in original.items() if k != "SessionUUID"} | {"SessionU": "UID" + session_uuid},
            "form", 200),
        "numbers as JSON numbers": (original | {"Duration": 97, "PlivoHangupCauseCode": 4000}, "json", 200),
    }
    signed = string_to_sign("POST", PUBLIC + PATH, original)
    for name, (params, shape, status) in reshapings.items():
        assert string_to_sign("POST", PUBLIC + PATH, params) == signed, name  # the signature verifies
        answer = deliver(client, params, headers, shape)
        assert answer.status_code == status, (name, answer.get_json())
        if status == 200:
            assert answer.get_json() == {"status": "duplicate"}, name
    app.extensions["webhook_service"].projector.project([session_uuid], wait=True)
    assert counts(engine, session_uuid)[1:] == (1, (1, 120, Decimal("0.01700")))


def test_an_old_number_replacement_reshaped_cannot_bring_back_an_old_number(app, client, engine):
    """The probe's second finding: an earlier SessionVirtualNumberReplaced replayed as JSON with its
    timestamp reshaped switched the session back to the older number."""
    session_uuid = str(uuid.uuid4())
    older = {"EventName": "SessionVirtualNumberReplaced", "EventTimestamp": "2026-11-20 10:00:00",
             "SessionUUID": session_uuid, "VirtualNumber": "+16505550111", "SequenceNumber": "1"}
    newer = older | {"EventTimestamp": "2026-11-20 11:00:00", "VirtualNumber": "+16505550122", "SequenceNumber": "2"}
    old_headers = signed_headers("POST", PUBLIC + PATH, older)
    for params in (older, newer):
        assert deliver(client, params, signed_headers("POST", PUBLIC + PATH, params), "form").status_code == 200
    stamp = older["EventTimestamp"]
    for reshaped in (older | {"EventTimestamp": [stamp]}, older | {"EventTimestamp": {stamp[:4]: stamp[4:]}}):
        assert deliver(client, reshaped, old_headers, "json").status_code == 400
    app.extensions["webhook_service"].projector.project([session_uuid], wait=True)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT virtual_number FROM masking_sessions WHERE session_uuid = :u"),
                            {"u": session_uuid}).scalar() == "+16505550122"
