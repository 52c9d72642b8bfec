"""Plays calls through a session and builds Plivo's signed callbacks (reference §8–§10).

Every callback is signed the way Plivo signs voice callbacks: a 20-digit nonce, then
`compute_signature` over the exact URL requested and the exact parameters sent, twice with the same
nonce: `X-Plivo-Signature-V3` with the token of the account that owns the session (the subaccount's
for a session created with `subaccount`), `X-Plivo-Signature-Ma-V3` with the main account's token.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit
from uuid import uuid4

import requests

from plivo_sandbox.models import Session, event_time, go_time
from plivo_sandbox.validation import PHONE_RE, ApiError
from webhook_service.plivo.signature import MA_SIGNATURE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, compute_signature

log = logging.getLogger(__name__)

API_ACCOUNT_URL = "https://api.plivo.com/v1/Account"
MEDIA_ACCOUNT_URL = "https://media.plivo.com/v1/Account"
RATE_PER_MINUTE = Decimal("0.00850")  # one flat rate per started minute per leg
RING_SECONDS = 6  # how long the dialled phone rings before it is picked up
DELIVERY_TIMEOUT = 10.0
NORMAL_CLEARING = ("NORMAL_CLEARING", 4000)
NO_ANSWER = ("NO_ANSWER", 3000)

Callback = dict[str, Any]


@dataclass(frozen=True)
class Tokens:
    """The auth tokens a session's callbacks are signed with."""

    owner: str  # X-Plivo-Signature-V3: the token of the account owning the session (main or subaccount)
    main: str  # X-Plivo-Signature-Ma-V3: always the main account's


@dataclass(frozen=True)
class Delivery:
    """How callbacks go out: POST body encoding, and whether to send them at all."""

    encoding: str = "form"  # "form" or "json"; GET callbacks always use the query string
    deliver: bool = True


@dataclass(frozen=True)
class CallOptions:
    """What happens in a played call (see `parse_call_options`)."""

    vocabulary: str  # "legacy" or "latest" event names
    caller: str  # "first" or "second": who dials the virtual number
    answered: bool  # whether the dialled party answers
    duration: int  # seconds of talk when answered
    delivery: Delivery
    recording_fails: bool = False  # a recording session's recording cannot start: SessionRecordingFailed
    initiated: bool = False  # Plivo dials the first party, then the second (initiate_call_to_first_party)
    from_number: str | None = None  # digits of who dials the number, when not the `caller` party's (a stranger)
    pins: tuple[str, ...] = ()  # what the caller enters at each PIN prompt, in order (none left: no input)


def _body_options(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"unknown option {name!r}; allowed: {', '.join(sorted(allowed))}")


def _choice(body: dict[str, Any], name: str, choices: tuple[Any, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value not in choices or isinstance(value, bool) != isinstance(default, bool):
        raise ApiError(400, f"{name} must be one of {', '.join(map(json.dumps, choices))}")
    return value


def parse_delivery(body: dict[str, Any], extra: frozenset[str] = frozenset()) -> Delivery:
    """Delivery options of a control request body: `encoding` ("form"|"json"), `deliver` (bool)."""
    _body_options(body, frozenset({"encoding", "deliver"}) | extra)
    return Delivery(_choice(body, "encoding", ("form", "json"), "form"), _choice(body, "deliver", (True, False), True))


def parse_call_options(body: dict[str, Any], session: Session) -> CallOptions:
    """Options of `POST /sandbox/sessions/<uuid>/calls`; raises ApiError(400) when invalid."""
    delivery = parse_delivery(body, frozenset({"vocabulary", "caller", "answered", "duration", "recording_fails",
                                               "initiated", "from_number", "pins"}))
    from_number = body.get("from_number")
    if from_number is not None:
        match = PHONE_RE.fullmatch(from_number) if isinstance(from_number, str) else None
        if not match:
            raise ApiError(400, "from_number must be a phone number of 8 to 15 digits")
        from_number = match.group(1)
        registered = {"first": session.first_party, "second": session.second_party}
        if from_number in registered.values() and "caller" in body and registered[body["caller"]] != from_number:
            raise ApiError(400, "from_number is the other party's number: give one of caller and from_number")
    pins = body.get("pins", [])
    if not isinstance(pins, list) or len(pins) > 6 or not all(isinstance(p, str) and p.isascii() and p.isdigit()
                                                              for p in pins):
        raise ApiError(400, "pins must be a list of at most 6 strings of digits (one per PIN prompt)")
    initiated = _choice(body, "initiated", (True, False), False)
    if initiated and not session.config["initiate_call_to_first_party"]:
        raise ApiError(409, "Plivo starts calls itself only in sessions created with initiate_call_to_first_party")
    if initiated and ("caller" in body or from_number or pins):
        raise ApiError(400, "an initiated call has no caller: Plivo dials the first party, then the second")
    duration = body.get("duration", 30)
    limit = session.config["call_time_limit"]
    if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= limit:
        raise ApiError(400, f"duration must be an integer from 1 to the session's call_time_limit ({limit})")
    return CallOptions(
        vocabulary=_choice(body, "vocabulary", ("legacy", "latest"), "legacy"),
        caller=_choice(body, "caller", ("first", "second"), "first"),
        answered=_choice(body, "answered", (True, False), True),
        duration=duration,
        delivery=delivery,
        recording_fails=_choice(body, "recording_fails", (True, False), False),
        initiated=initiated,
        from_number=from_number,
        pins=tuple(pins),
    )


def _leg(seconds: int, cause: tuple[str, int]) -> tuple[dict[str, str], int, Decimal]:
    """Billing attributes of one call leg: Plivo bills answered legs per started minute."""
    minutes = -(-seconds // 60)
    amount = RATE_PER_MINUTE * minutes
    params = {
        "Duration": str(seconds),
        "BilledDuration": str(minutes * 60),
        "Amount": f"{amount:.5f}",
        "PlivoHangupCause": cause[0],
        "PlivoHangupCauseCode": str(cause[1]),
    }
    return params, minutes * 60, amount


def _pin_checks(session: Session, options: CallOptions, start: datetime
                ) -> tuple[str | None, str, list[tuple[datetime, str, int]], bool]:
    """Who calls and what PIN authentication makes of it: (the party whose part the caller plays, None
    for a stranger never let in; the caller's digits; the PIN checks as (time, status, retry counter);
    whether the call goes on).

    Plivo documents the settings, not the call (reference §3, D-FAQ): with PIN authentication a caller
    whose number is not in the session (or anyone, with force_pin_authentication) is prompted, has
    1 + pin_retry tries of pin_retry_wait seconds, and each try is a SessionPinAuthenticationStatus
    (`success` or `failed`, PinRetryCounter the retries used before it). The sandbox's readings of what is
    not documented: a stranger plays the part of the party whose PIN they enter; a registered caller
    must enter their own; a try without input fails; a stranger never let in has no leg in the session
    (Plivo's leg events name a party) and costs the session nothing.
    """
    numbers = {"first": session.first_party, "second": session.second_party}
    caller_number = options.from_number or numbers[options.caller]
    if not caller_number:
        raise ApiError(409, f"the session has no {options.caller}_party yet (single-party session)")
    own = next((party for party, number in numbers.items() if number and number == caller_number), None)
    config = session.config
    if not config["is_pin_authentication_required"]:
        if own is None:
            raise ApiError(409, "without PIN authentication Plivo lets no caller outside the session in "
                                "(it plays unknown_caller_play, if any, and hangs up)")
        return own, caller_number, [], True
    if own is not None and not config["force_pin_authentication"]:
        return own, caller_number, [], True  # PinAuthenticationStatus AuthorizedCaller
    accepted = {config[f"{party}_party_pin"]: party for party in numbers
                if config[f"{party}_party_pin"] and (own is None or party == own)}
    checks, at = [], start
    for retry in range(1 + config["pin_retry"]):
        at += timedelta(seconds=config["pin_retry_wait"])
        entered = options.pins[retry] if retry < len(options.pins) else None
        role = accepted.get(entered) if entered else None
        checks.append((at, "success" if role else "failed", retry))
        if role:
            return role, caller_number, checks, True
    return own, caller_number, checks, False


def play_call(session: Session, options: CallOptions, now: datetime, auth_id: str, tokens: Tokens) -> list[Callback]:
    """Play one call through `session` starting at `now`: record it and return its signed callbacks.

    The caller dials the virtual number (which answers at once), Plivo dials the other party, who
    rings for RING_SECONDS and answers (or rings out after ring_timeout), they talk, the dialled party
    hangs up first. The caller's leg is billed for the whole call, ring time included.

    With PIN authentication, a caller who must enter a PIN does so first (`_pin_checks`); a wrong PIN
    on the last try ends the call there.

    With `initiated` (a session created with `initiate_call_to_first_party`), nobody calls the number:
    Plivo dials the first party, who rings and answers (or rings out, and nothing else happens), then
    the second party, as above. Both legs are Plivo's outbound calls, each billed from its answer.
    """
    start = now
    if options.initiated:
        role, caller, checks, let_in = "first", session.first_party, [], True
    else:
        role, caller, checks, let_in = _pin_checks(session, options, start)
    first_calls = role != "second"  # whose part the caller plays (a stranger never let in: neither's)
    callee = session.second_party if first_calls else session.first_party
    a, b = ("First", "Second") if first_calls else ("Second", "First")  # caller's and callee's names
    if let_in and (not caller or not callee):
        missing = "first_party" if not session.first_party else "second_party"
        raise ApiError(409, f"the session has no {missing} yet (single-party session)")
    legacy = options.vocabulary == "legacy"
    vn = "+" + session.virtual_number
    # From and To of an initiated call, which no one dialled: not documented (From is "the real number
    # calling the virtual number"); the sandbox names the first party, on whose behalf Plivo calls.
    if legacy:
        parties = {"From": "+" + caller, "To": "+" + callee}
        recording_parties = parties
        pin_parties = {"From": "+" + caller}
    else:
        recording_parties = {"FirstParty": "+" + session.first_party, "SecondParty": "+" + session.second_party}
        parties = {**recording_parties, "From": "+" + caller, "To": "+" + callee}
        pin_parties = {**recording_parties, "From": "+" + caller}
    base = {"SessionUUID": session.session_uuid, "VirtualNumber": vn}
    events: list[tuple[str, dict[str, str]]] = []  # (which URL: "callback" or "recording", params)
    recording: dict[str, str] = {}  # attributes of every recording callback; empty when not recording
    hangup = "Hangup" if legacy else "Complete"

    def event(name: str, at: datetime, **extra: str) -> None:
        events.append(("callback", {"EventName": name, "EventTimestamp": event_time(at), **base, **parties, **extra}))

    def recording_event(name: str, at: datetime, **extra: str) -> None:
        events.append(("recording", {"EventName": name, "EventTimestamp": event_time(at), **recording, **extra}))

    def ringing(party: str) -> str:
        # Plivo's latest vocabulary is inconsistent: "SessionFirstPartyRinging" but "SessionSecondPartyRing".
        return f"Session{party}PartyRing" + ("ing" if not legacy and party == "First" else "")

    if options.initiated:
        if not legacy:
            event("SessionFirstPartyInitiated", start)
        first_ring = start + timedelta(seconds=1)
        event(ringing("First"), first_ring)
        if not options.answered:  # the first party does not answer: the second is never dialled
            end = first_ring + timedelta(seconds=session.config["ring_timeout"])
            params, _, _ = _leg(0, NO_ANSWER)
            event("SessionFirstPartyHangup" if legacy else "SessionFirstPartyFailed", end, **params)
            _interaction(session, start, end, first=(_call_url(auth_id), "no-answer"), second=(None, None),
                         count=1, billed=0, amount=Decimal(0), recording_url=None)
            return sign_events(session, events, options.delivery, tokens)
        dialled_at = billed_from = first_ring + timedelta(seconds=RING_SECONDS)
        event("SessionFirstPartyAnswer", dialled_at)
    else:
        billed_from = start
        if legacy:
            # Legacy names the caller's leg "Answer" when the virtual number picks up (a stranger's
            # too, by the part their PIN gives them; one never let in has no leg).
            if role is not None:
                checked = {} if checks else {"PinAuthenticationStatus": "AuthorizedCaller"}
                event(f"Session{a}PartyAnswer", start, **checked)
        else:
            # Whom the call is for is known once a PIN says so: until then, only who calls.
            events.append(("callback", {"EventName": "SessionVirtualNumberAnswer", "EventTimestamp": event_time(start),
                                        **base, **(pin_parties if checks else parties)}))
        for at, status, retry in checks:
            events.append(("callback", {"EventName": "SessionPinAuthenticationStatus", "EventTimestamp": event_time(at),
                                        **base, **pin_parties, "PinAuthenticationStatus": status,
                                        "PinRetryCounter": str(retry)}))
        dialled_at = checks[-1][0] if checks else start
        if not let_in:
            if role is not None:  # a registered caller's leg ends after the last try
                params, billed, amount = _leg(int((dialled_at - start).total_seconds()), NORMAL_CLEARING)
                event(f"Session{a}Party{hangup}", dialled_at, **params)
                leg = (_call_url(auth_id), "completed")
                first, second = (leg, (None, None))[:: 1 if first_calls else -1]
                _interaction(session, start, dialled_at, first=first, second=second, count=1, billed=billed,
                             amount=amount, recording_url=None)
            return sign_events(session, events, options.delivery, tokens)
    if legacy:
        ring_at = dialled_at + timedelta(seconds=1)
    else:
        event(f"Session{b}PartyInitiated", dialled_at + timedelta(seconds=1))
        ring_at = dialled_at + timedelta(seconds=2)
    event(ringing(b), ring_at)

    answered = options.answered or options.initiated  # an initiated call's `answered` is the first party's
    if answered:
        answer_at = ring_at + timedelta(seconds=RING_SECONDS)
        end = answer_at + timedelta(seconds=options.duration)
        event(f"Session{b}PartyAnswer", answer_at)
        callee_params, callee_billed, callee_amount = _leg(options.duration, NORMAL_CLEARING)
    else:
        end = ring_at + timedelta(seconds=session.config["ring_timeout"])
        callee_params, callee_billed, callee_amount = _leg(0, NO_ANSWER)
    caller_params, caller_billed, caller_amount = _leg(int((end - billed_from).total_seconds()), NORMAL_CLEARING)

    recording_url = None
    if session.config["record"] and answered and options.recording_fails:
        # "record=true but the recording could not start": no recording, so no RecordingUUID or URLs.
        recording = {**base, **recording_parties}
        recording_event("SessionRecordingFailed", answer_at)
        recording = {}
    elif session.config["record"] and answered:  # recording starts once both parties answered
        recording_uuid = str(uuid4())
        fmt = session.config["record_file_format"]
        recording_url = f"{API_ACCOUNT_URL}/{auth_id}/Recording/{recording_uuid}/"
        recording = {
            **base,
            **recording_parties,
            "RecordingUUID": recording_uuid,
            "RecordingResourceURL": recording_url,
            "RecordingStartTime": event_time(answer_at),
            "RecordingFormat": "." + fmt,
        }
        if legacy:  # the latest docs no longer list the media URL
            recording["RecordingURL"] = f"{MEDIA_ACCOUNT_URL}/{auth_id}/Recording/{recording_uuid}.{fmt}"
        recording_event("SessionRecordingInitiated", answer_at)

    event(f"Session{b}Party{hangup if legacy or answered else 'Failed'}", end, **callee_params)
    event(f"Session{a}Party{hangup}", end, **caller_params)
    if recording:
        recording_event(
            "SessionRecordingCompleted", end, RecordingDuration=str(options.duration), RecordingEndTime=event_time(end)
        )

    caller_leg = (_call_url(auth_id), "completed")
    callee_leg = (_call_url(auth_id), "completed" if answered else "no-answer")
    # The *_party_* fields follow the parties, not the call direction.
    first, second = (caller_leg, callee_leg)[:: 1 if first_calls else -1]
    _interaction(session, start, end, first=first, second=second, count=2, billed=caller_billed + callee_billed,
                 amount=caller_amount + callee_amount, recording_url=recording_url)
    return sign_events(session, events, options.delivery, tokens)


def _call_url(auth_id: str) -> str:
    """The resource URL of a new call leg, as Plivo's interactions name them."""
    return f"{API_ACCOUNT_URL}/{auth_id}/Call/{uuid4()}/"


def _interaction(session: Session, start: datetime, end: datetime, *, first: tuple[str | None, str | None],
                 second: tuple[str | None, str | None], count: int, billed: int, amount: Decimal,
                 recording_url: str | None) -> None:
    """Record one call in Plivo's `interaction` list and totals; each party's (leg URL, status)."""
    session.interaction.append(
        {
            "start_time": go_time(start),
            "end_time": go_time(end),
            "first_party_resource_url": first[0],
            "second_party_resource_url": second[0],  # null when that leg was never dialled (reference §6.3)
            "first_party_status": first[1],
            "second_party_status": second[1],
            "type": "call",
            "total_call_amount": float(amount),
            "call_billed_duration": billed,
            "total_call_count": count,
            "duration": int((end - start).total_seconds()),
            "recording_resource_url": recording_url,
        }
    )
    session.total_call_count += count
    session.total_call_billed_duration += billed
    session.total_call_amount += amount
    session.last_interaction_time = end


def session_event(session: Session, name: str, now: datetime, delivery: Delivery, tokens: Tokens) -> list[Callback]:
    """The signed callback of a call-less session event (SessionTimeout, SessionVirtualNumberReplaced)."""
    params = {
        "EventName": name,
        "EventTimestamp": event_time(now),
        "SessionUUID": session.session_uuid,
        "VirtualNumber": "+" + session.virtual_number,
    }
    return sign_events(session, [("callback", params)], delivery, tokens)


def sign_events(
    session: Session, events: list[tuple[str, dict[str, str]]], delivery: Delivery, tokens: Tokens
) -> list[Callback]:
    """Number and sign events for the session's callback or recording URL; events without a URL are dropped."""
    callbacks = []
    for target, params in events:
        url = session.config[f"{target}_url" if target == "callback" else "recording_callback_url"]
        method = session.config[f"{target}_method" if target == "callback" else "recording_callback_method"]
        if url:
            params["SequenceNumber"] = session.next_sequence()
            callbacks.append(sign(url, method, params, delivery.encoding, tokens))
    return callbacks


def sign(url: str, method: str, params: dict[str, str], encoding: str, tokens: Tokens) -> Callback:
    """One signed request, as Plivo would send it, with `status` None (not delivered yet)."""
    nonce = "".join(secrets.choice(string.digits) for _ in range(20))
    headers = {
        SIGNATURE_HEADER: compute_signature(method, url, params, nonce, tokens.owner),
        MA_SIGNATURE_HEADER: compute_signature(method, url, params, nonce, tokens.main),
        NONCE_HEADER: nonce,
    }
    parts = urlsplit(url)  # a fragment (Plivo's "#ct=..." tuning) is never sent over HTTP
    content_type = None
    if method == "GET":
        query = "&".join(q for q in (parts.query, urlencode(params)) if q)
        target, body = urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")), ""
    else:
        target = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
        if encoding == "json":
            body, content_type = json.dumps(params), "application/json"
        else:
            body, content_type = urlencode(params), "application/x-www-form-urlencoded"
        headers["Content-Type"] = content_type
    return {
        "url": target,
        "method": method,
        "headers": headers,
        "body": body,
        "content_type": content_type,
        "params": params,
        "status": None,
    }


def deliver(callbacks: list[Callback]) -> None:
    """Send the callbacks one by one, in order; set each one's `status` (None when unreachable)."""
    for callback in callbacks:
        where = urlsplit(callback["url"])._replace(query="").geturl()
        try:
            response = requests.request(
                callback["method"],
                callback["url"],
                data=callback["body"].encode() or None,
                headers=callback["headers"],
                timeout=DELIVERY_TIMEOUT,
                allow_redirects=False,  # a redirect would change the signed URL; let the test see it
            )
        except requests.RequestException as exc:
            log.warning("sandbox: %s to %s failed: %s", callback["params"]["EventName"], where, type(exc).__name__)
            continue
        callback["status"] = response.status_code
        log.info("sandbox: %s to %s -> %s", callback["params"]["EventName"], where, response.status_code)
