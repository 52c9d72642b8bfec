"""What each Plivo callback means for a session: one handler per event, chosen from a table.

Dispatch is by `EventName` through two tables covering both of Plivo's documented vocabularies
(legacy `…Hangup`, latest `…Complete`; reference §8–§9). Handlers change a `SessionState` in
memory (`state.py` loads it under the session's row lock and saves the difference), and each is
idempotent and indifferent to order. Leg facts (`LegFact`, most callbacks) are plain values, so the
webhook path applies them in one statement instead (`apply_leg_callback`, migration 0005), the
same cycle done by Postgres:

* call legs are derived from all the session's leg facts (`legs.py`), never patched in place;
* counters and the daily totals are recomputed from the derived legs, never incremented;
* status only moves forward (an expired session stays expired), recordings only move from
  initiated to failed/completed, the virtual number only changes to a newer one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..services.state import LEG_EVENT_FIELDS, SessionState
from .values import normalise_number, parse_time, to_decimal, to_int


@dataclass(frozen=True)
class Event:
    """A callback's parameters with the fields every handler needs, parsed once."""

    name: str
    session_uuid: str
    at: datetime  # EventTimestamp (UTC), or the time we received it when Plivo sent none
    params: Mapping[str, Any]

    def get(self, name: str) -> str | None:
        value = self.params.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None or value == "" or isinstance(value, dict | list):
            return None
        return str(value)

    def number(self, name: str) -> str | None:
        return normalise_number(self.get(name))

    @classmethod
    def parse(cls, params: Mapping[str, Any], received_at: datetime) -> Event | None:
        name, session_uuid = params.get("EventName"), params.get("SessionUUID")
        if not isinstance(name, str) or not isinstance(session_uuid, str) or not session_uuid.strip():
            return None
        at = parse_time(params.get("EventTimestamp")) if isinstance(params.get("EventTimestamp"), str) else None
        return cls(name=name, session_uuid=session_uuid.strip()[:100], at=at or received_at, params=params)

    def discovered(self) -> dict[str, Any]:
        """What this event says about a session we may not know (to create its row)."""
        return {"first_party": self.number("FirstParty"), "second_party": self.number("SecondParty"),
                "virtual_number": self.number("VirtualNumber")}


Handler = Callable[[SessionState, Event], None]


# Call legs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegFact:
    """A handler for a callback that reports one fact about a party's leg.

    Its facts are plain values, so the webhook path can apply it in one statement
    (`apply_leg_callback`, migration 0005) as well as through `SessionState` (replays, and
    sessions with Plivo interaction records).
    """

    party: str | None  # None: the caller, whom the latest vocabulary names only by number
    kind: str  # initiated, ringing, answered or ended
    end_event: str | None = None  # for kind "ended": hangup, complete or failed

    def facts(self, event: Event) -> dict[str, Any]:
        facts: dict[str, Any] = dict.fromkeys(LEG_EVENT_FIELDS) | {
            "from_number": event.number("From"), "to_number": event.number("To"), "call_uuid": event.get("CallUUID"),
        }
        if self.kind == "ended":
            facts |= {
                "end_event": self.end_event,
                "duration": to_int(event.get("Duration")),
                "billed_duration": to_int(event.get("BilledDuration")),
                "amount": to_decimal(event.get("Amount")),
                "hangup_cause": event.get("PlivoHangupCause"),
                "hangup_cause_code": to_int(event.get("PlivoHangupCauseCode")),
            }
        return facts

    def party_of(self, event: Event, session: Mapping[str, Any]) -> str | None:
        if self.party is not None:
            return self.party
        caller = event.number("From")
        for party in ("first", "second"):
            if caller and caller in (event.number(f"{party.title()}Party"), session[f"{party}_party"]):
                return party
        return None

    def __call__(self, state: SessionState, event: Event) -> None:
        party = self.party_of(event, state.session)
        if party is not None:
            state.add_leg_event(party, self.kind, event.at, self.facts(event))


# Session-level events -------------------------------------------------------------------------


def session_timed_out(state: SessionState, event: Event) -> None:
    expired_at = state.session["expired_at"]
    state.session_updates |= {"status": "expired",
                              "expired_at": min(expired_at, event.at) if expired_at else event.at}


def virtual_number_replaced(state: SessionState, event: Event) -> None:
    new = event.number("VirtualNumber")
    if not new:
        return
    history = """INSERT INTO virtual_number_history (session_id, virtual_number, assigned_at)
                 VALUES (%(id)s, %(number)s, %(at)s) ON CONFLICT DO NOTHING"""
    session = state.session
    state.statements.append((history, {"id": state.id, "number": new, "at": event.at}))
    changed_at = session["virtual_number_changed_at"]
    if changed_at is not None and changed_at >= event.at:
        return  # a newer replacement has already been applied
    if session["virtual_number"]:  # keep the number being replaced in the history
        since = changed_at or session["plivo_created_at"] or session["created_at"]
        state.statements.append((history, {"id": state.id, "number": session["virtual_number"], "at": since}))
    state.session_updates |= {"virtual_number": new, "virtual_number_changed_at": event.at}


def pin_authentication(state: SessionState, event: Event) -> None:
    state.statements.append(("""
        INSERT INTO pin_authentications (session_id, event_at, status, retry_counter, from_number)
        VALUES (%(id)s, %(at)s, %(status)s, %(retry)s, %(from)s) ON CONFLICT DO NOTHING
    """, {"id": state.id, "at": event.at, "status": event.get("PinAuthenticationStatus") or "unknown",
          "retry": to_int(event.get("PinRetryCounter")), "from": event.number("From")}))


def nothing_to_record(state: SessionState, event: Event) -> None:
    """Stored and counted as an interaction; its legs' own events carry the facts."""


def _recording(status: str) -> Handler:
    def handler(state: SessionState, event: Event) -> None:
        recording_uuid = event.get("RecordingUUID")
        if not recording_uuid:
            return
        state.add_recording(recording_uuid[:100], status, {
            "recording_url": event.get("RecordingURL"),  # stored as data, never fetched by this service
            "resource_url": event.get("RecordingResourceURL"),
            "duration": to_int(event.get("RecordingDuration")),
            "format": event.get("RecordingFormat"),
            "started_at": parse_time(event.get("RecordingStartTime")),
            "ended_at": parse_time(event.get("RecordingEndTime")),
        })

    return handler


# Dispatch tables ------------------------------------------------------------------------------

SESSION_EVENTS: dict[str, Handler] = {
    # Legacy vocabulary (reference §8.1, D-CB-LEG)
    "SessionFirstPartyAnswer": LegFact("first", "answered"),  # first party's leg answered (or reached the number)
    "SessionFirstPartyRing": LegFact("first", "ringing"),  # first party's phone rings (second party called)
    "SessionSecondPartyRing": LegFact("second", "ringing"),  # second party's phone rings
    "SessionSecondPartyAnswer": LegFact("second", "answered"),  # second party answered
    "SessionFirstPartyHangup": LegFact("first", "ended", "hangup"),  # first party's leg ended; carries billing
    "SessionSecondPartyHangup": LegFact("second", "ended", "hangup"),  # second party's leg ended; carries billing
    "SessionPinAuthenticationStatus": pin_authentication,  # a caller entered (or failed) a PIN
    "SessionTimeout": session_timed_out,  # the session reached its expiry
    "SessionVirtualNumberReplaced": virtual_number_replaced,  # Plivo swapped in a working number
    "SessionPartiesHangup": nothing_to_record,  # the session's call is done (D-MD only)
    # Latest vocabulary (reference §8.1, D-CB-NEW)
    "SessionFirstPartyInitiated": LegFact("first", "initiated"),  # Plivo dialled the first party
    "SessionFirstPartyRinging": LegFact("first", "ringing"),  # first party's phone rings
    "SessionFirstPartyComplete": LegFact("first", "ended", "complete"),  # first party's leg ended normally
    "SessionFirstPartyFailed": LegFact("first", "ended", "failed"),  # first party's leg could not be connected
    "SessionSecondPartyInitiated": LegFact("second", "initiated"),  # Plivo dialled the second party
    "SessionSecondPartyRinging": LegFact("second", "ringing"),  # tolerated spelling of …Ring
    "SessionSecondPartyComplete": LegFact("second", "ended", "complete"),  # second party's leg ended normally
    "SessionSecondPartyFailed": LegFact("second", "ended", "failed"),  # second party's leg could not be connected
    "SessionVirtualNumberAnswer": LegFact(None, "answered"),  # a party called the number (auto-answer)
}

RECORDING_EVENTS: dict[str, Handler] = {
    "SessionRecordingInitiated": _recording("initiated"),  # both parties answered; recording started
    "SessionRecordingCompleted": _recording("completed"),  # a party hung up; the file is ready
    "SessionRecordingFailed": _recording("failed"),  # record=true but recording could not start
}

HANDLERS = {"session": SESSION_EVENTS, "recording": RECORDING_EVENTS}
# Events that count as an interaction with the session (its last_interaction_at).
NOT_INTERACTIONS = {"SessionTimeout", "SessionVirtualNumberReplaced"}


def handler_for(endpoint: str, event: Event | None) -> Handler | None:
    return HANDLERS[endpoint].get(event.name) if event is not None else None


def apply_event(state: SessionState, endpoint: str, event: Event) -> None:
    """Apply one callback's event to the session's state in memory."""
    handler = handler_for(endpoint, event)
    assert handler is not None
    handler(state, event)
    for party in ("first", "second"):  # a discovered session learns its parties from the latest vocabulary
        number = event.number(f"{party.title()}Party")
        if number and state.session[f"{party}_party"] is None:
            state.session_updates[f"{party}_party"] = number
