"""What a Plivo callback says: its parameters read strictly into the one fact it reports, or none.

Dispatch is by `EventName` through two tables covering both of Plivo's documented vocabularies
(legacy `…Hangup`, latest `…Complete`; reference §8–§9), one line per event with a comment on
when Plivo sends it. Reading a callback decides nothing about the session: the fact is stored as
reported, and `domain.projection` derives the session from all its facts, in any order.

Reading is strict: a callback this service acts on needs its `SessionUUID` and an
`EventTimestamp` that parses (a fact is never dated by its arrival); without them it is stored
as `failed`, with the reason. A callback with an event this service does not act on is stored as
`ignored`. Numbers are normalised to E.164, counts and money parsed by `domain.values` (a negative
or fractional duration, or a non-finite amount, is dropped, never counted).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from .jsonbody import text_problem
from .values import normalise_number, parse_time, text_or_none, to_decimal, to_int

MAX_SESSION_UUID = 100  # Plivo's are 36 characters; anything much longer is not Plivo's
# The key of a failed recording whose callback has no RecordingUUID: this prefix + its EventTimestamp (ISO 8601).
FAILED_RECORDING_KEY = "failed:"


@dataclass(frozen=True)
class Meaning:
    """What an event name means: the kind of fact, and for a leg its party, phase and ending."""

    kind: str  # one of vocabulary.FACT_KINDS
    party: str | None = None  # a leg's party; None for SessionVirtualNumberAnswer: the caller, known by number
    phase: str | None = None  # a leg's phase: initiated, ringing, answered or ended
    end_event: str | None = None  # an ended leg's ending: hangup, complete or failed
    recording_status: str | None = None  # a recording's news: initiated, completed or failed


def _leg(party: str | None, phase: str, end_event: str | None = None) -> Meaning:
    return Meaning("leg", party, phase, end_event)


SESSION_EVENTS: dict[str, Meaning] = {
    # Legacy vocabulary (reference §8.1, D-CB-LEG)
    "SessionFirstPartyAnswer": _leg("first", "answered"),  # first party's leg answered (or reached the number)
    "SessionFirstPartyRing": _leg("first", "ringing"),  # first party's phone rings (second party called)
    "SessionSecondPartyRing": _leg("second", "ringing"),  # second party's phone rings
    "SessionSecondPartyAnswer": _leg("second", "answered"),  # second party answered
    "SessionFirstPartyHangup": _leg("first", "ended", "hangup"),  # first party's leg ended; carries billing
    "SessionSecondPartyHangup": _leg("second", "ended", "hangup"),  # second party's leg ended; carries billing
    "SessionPinAuthenticationStatus": Meaning("pin"),  # a caller entered (or failed) a PIN
    "SessionTimeout": Meaning("timeout"),  # the session reached its expiry
    "SessionVirtualNumberReplaced": Meaning("number"),  # Plivo swapped in a working number (VirtualNumber: the new one)
    # The session's call is done (D-MD only). Which events carry billing is not documented (reference
    # §8.2, §14.2): when this one does, its Amount/BilledDuration/Duration are kept on its fact, but the
    # projection counts only the legs' (`domain.projection`): if it sums the legs, counting it too would
    # count the call twice; if it does not, the legs' events carry their own.
    "SessionPartiesHangup": Meaning("call_done"),
    # Latest vocabulary (reference §8.1, D-CB-NEW)
    "SessionFirstPartyInitiated": _leg("first", "initiated"),  # Plivo dialled the first party
    "SessionFirstPartyRinging": _leg("first", "ringing"),  # first party's phone rings
    "SessionFirstPartyComplete": _leg("first", "ended", "complete"),  # first party's leg ended normally
    "SessionFirstPartyFailed": _leg("first", "ended", "failed"),  # first party's leg could not be connected
    "SessionSecondPartyInitiated": _leg("second", "initiated"),  # Plivo dialled the second party
    "SessionSecondPartyRinging": _leg("second", "ringing"),  # tolerated spelling of …Ring
    "SessionSecondPartyComplete": _leg("second", "ended", "complete"),  # second party's leg ended normally
    "SessionSecondPartyFailed": _leg("second", "ended", "failed"),  # second party's leg could not be connected
    "SessionVirtualNumberAnswer": _leg(None, "answered"),  # a party called the number (auto-answer)
}

RECORDING_EVENTS: dict[str, Meaning] = {
    "SessionRecordingInitiated": Meaning("recording", recording_status="initiated"),  # both answered; recording
    "SessionRecordingCompleted": Meaning("recording", recording_status="completed"),  # a party hung up; file ready
    "SessionRecordingFailed": Meaning("recording", recording_status="failed"),  # record=true, but it could not start
}

EVENTS = {"session": SESSION_EVENTS, "recording": RECORDING_EVENTS}


class CallbackFact(NamedTuple):
    """One callback's fact, as reported (the columns of `callback_facts` but its key's inbox id).

    A named tuple: a projection reads a busy session's thousands of them, and a tuple is the
    cheapest value to build from a row and to read by name.
    """

    session_uuid: str
    kind: str
    event_name: str | None
    at: datetime
    sequence_number: int | None = None
    party: str | None = None
    phase: str | None = None
    end_event: str | None = None
    first_party: str | None = None
    second_party: str | None = None
    virtual_number: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    call_uuid: str | None = None
    duration: int | None = None
    billed_duration: int | None = None
    amount: Decimal | None = None
    hangup_cause: str | None = None
    hangup_cause_code: int | None = None
    pin_status: str | None = None
    pin_retry_counter: int | None = None
    recording_uuid: str | None = None
    recording_status: str | None = None
    recording_url: str | None = None  # stored as data, never fetched by this service
    recording_resource_url: str | None = None
    recording_duration: int | None = None
    recording_format: str | None = None
    recording_started_at: datetime | None = None
    recording_ended_at: datetime | None = None


FACT_FIELDS = CallbackFact._fields


# Each fact field read from a parameter: its name, and how its text is read (reference §8.2, §9).
READ: dict[str, tuple[str, Callable[[str | None], Any]]] = {
    "sequence_number": ("SequenceNumber", to_int),
    "first_party": ("FirstParty", normalise_number),
    "second_party": ("SecondParty", normalise_number),
    "virtual_number": ("VirtualNumber", normalise_number),
    "from_number": ("From", normalise_number),
    "to_number": ("To", normalise_number),
    "call_uuid": ("CallUUID", text_or_none),  # not documented for masking; kept when sent
    "duration": ("Duration", to_int),
    "billed_duration": ("BilledDuration", to_int),
    "amount": ("Amount", to_decimal),
    "hangup_cause": ("PlivoHangupCause", text_or_none),
    "hangup_cause_code": ("PlivoHangupCauseCode", to_int),
    "pin_status": ("PinAuthenticationStatus", text_or_none),
    "pin_retry_counter": ("PinRetryCounter", to_int),
    "recording_uuid": ("RecordingUUID", text_or_none),
    "recording_url": ("RecordingURL", text_or_none),
    "recording_resource_url": ("RecordingResourceURL", text_or_none),
    "recording_duration": ("RecordingDuration", to_int),
    "recording_format": ("RecordingFormat", text_or_none),
    "recording_started_at": ("RecordingStartTime", parse_time),
    "recording_ended_at": ("RecordingEndTime", parse_time),
}


@dataclass(frozen=True)
class Reading:
    """What reading a callback gave: a fact to record, nothing to act on, or a reason it failed."""

    outcome: str  # "recorded" (with `fact`), "ignored" or "failed" (with `reason`)
    fact: CallbackFact | None = None
    reason: str | None = None


def plain_params(params: Mapping[str, object]) -> dict[str, str]:
    """The parameters as Plivo sends them: every value a string, a JSON number as its text.

    Raises ValueError naming the first parameter whose value is anything else (an object, an
    array, a boolean or null): Plivo never sends one, and its signature's string cannot tell
    `{"EventTimestamp": ["2026-…"]}` from `{"EventTimestamp": "2026-…"}` (docs/security.md).
    """
    plain = {}
    for key, value in params.items():
        if isinstance(value, str):
            plain[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            plain[key] = str(value)  # as the signature's string has it (plivo.signature._fmt)
        else:
            kind = "null" if value is None else "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"
            raise ValueError(f"parameter {key!r} is {kind}; every value must be a string or a number")
    found = text_problem("".join((*plain, *plain.values())))
    if found:
        raise ValueError(f"parameters: a value {found}")
    return plain


def read_callback(endpoint: str, params: Mapping[str, str]) -> Reading:
    """Read one verified callback's parameters (every value a string) into its fact."""
    name = params.get("EventName")
    meaning = EVENTS[endpoint].get(name or "")
    if meaning is None:
        return Reading("ignored", reason=f"no handler for EventName {name!r}" if name else "no EventName")
    session_uuid = (params.get("SessionUUID") or "").strip()
    if not session_uuid:
        return Reading("ignored", reason="no SessionUUID")
    if len(session_uuid) > MAX_SESSION_UUID:
        return Reading("failed", reason=f"SessionUUID is longer than {MAX_SESSION_UUID} characters")
    stamp = params.get("EventTimestamp")
    at = parse_time(stamp)
    if at is None:
        return Reading("failed", reason=f"EventTimestamp {stamp!r} is not a time" if stamp else "no EventTimestamp")

    values = {field: read(params.get(name)) for field, (name, read) in READ.items()}
    if meaning.recording_status == "failed" and not values["recording_uuid"]:
        # "record=true but the recording could not start" (reference §9): no recording exists, so Plivo
        # may send no RecordingUUID (its docs list the field for every event but never say so). The failed
        # recording is then keyed by what the callback does carry, its EventTimestamp (one call's
        # failure), so that it shows in the API and in reporting.recordings, and a redelivery is the same.
        values["recording_uuid"] = FAILED_RECORDING_KEY + at.isoformat()
    return Reading("recorded", CallbackFact(
        session_uuid=session_uuid, kind=meaning.kind, event_name=name, at=at, party=meaning.party,
        phase=meaning.phase, end_event=meaning.end_event, recording_status=meaning.recording_status, **values))



# The month in a signed string: Plivo's EventTimestamp (`2026-11-20 10:01:37`, UTC) as the string
# carries it, `EventTimestamp2026-11-20…` in a POST's sorted parameters, `EventTimestamp=2026-11-20…`
# in a GET's query.
_SIGNED_MONTH = re.compile(r"EventTimestamp=?(\d{4})-(0[1-9]|1[0-2])-\d{2}")
# Filed under this month: a callback whose signed string carries no EventTimestamp (it is stored
# failed or ignored; the default partition keeps it).
NO_MONTH = date(1970, 2, 1)


def inbox_month(signed: str) -> date:
    """The month a callback is filed under in the inbox (its partition, migration 0011): the month of
    the EventTimestamp in the string its signature covers, which Plivo signs. A function of that
    string alone, like the dedupe key: every redelivery, and every reshaping of the parameters that
    still verifies (docs/security.md), is filed in the same month, where the unique key
    `(dedupe_key, event_month)` meets it."""
    found = _SIGNED_MONTH.search(signed)
    if found is None or int(found.group(1)) < 1:  # no timestamp, or the year 0000 (no such date)
        return NO_MONTH
    return date(int(found.group(1)), int(found.group(2)), 1)
