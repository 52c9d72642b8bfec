"""Applying one stored Plivo callback to sessions, call legs, recordings and counters.

Dispatch is by `EventName` through two tables covering both of Plivo's documented vocabularies
(legacy `…Hangup`, latest `…Complete`; reference §8–§9). Every handler is idempotent, and the
result does not depend on arrival order:

* the session row is locked first (`SELECT … FOR UPDATE`), so callbacks for one session apply one
  at a time whatever the number of workers, and callbacks for different sessions never wait;
* counters are recomputed from the leg and recording rows in one UPDATE, never incremented;
* status only moves forward (an expired session stays expired), recordings only move from
  initiated to failed/completed, the virtual number only changes to a newer one.

Call legs are derived from the party's leg events (`legs.py`), which is what makes them
independent of arrival order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, RowMapping

from ..models import MaskingSession, PinAuthentication, Recording, VirtualNumberAssignment
from ..plivo.client import normalise_number, parse_time, to_decimal, to_int
from ..reporting.daily_totals import daily_totals_tracked
from .legs import record_leg_event

sessions = MaskingSession.__table__


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
        if value is None or value == "":
            return None
        return str(value)

    def number(self, name: str) -> str | None:
        return normalise_number(self.get(name))


Handler = Callable[[Connection, RowMapping, Event], None]


# Call legs ------------------------------------------------------------------------------------


def _party_of_caller(session: RowMapping, event: Event) -> str | None:
    caller = event.number("From")
    if caller and caller in (event.number("FirstParty"), session["first_party"]):
        return "first"
    if caller and caller in (event.number("SecondParty"), session["second_party"]):
        return "second"
    return None


def _leg_facts(event: Event) -> dict[str, Any]:
    return {"from_number": event.number("From"), "to_number": event.number("To"), "call_uuid": event.get("CallUUID")}


def record_leg_phase(conn: Connection, session: RowMapping, event: Event, party: str, kind: str) -> None:
    """The party's leg was initiated, rang or was answered at `event.at`."""
    record_leg_event(conn, session["id"], party, kind, event.at, _leg_facts(event))


def record_leg_end(conn: Connection, session: RowMapping, event: Event, party: str, end_event: str) -> None:
    """The party's leg ended at `event.at`; the event carries its duration, billing and cause."""
    record_leg_event(conn, session["id"], party, "ended", event.at, _leg_facts(event) | {
        "end_event": end_event,
        "duration": to_int(event.get("Duration")),
        "billed_duration": to_int(event.get("BilledDuration")),
        "amount": to_decimal(event.get("Amount")),
        "hangup_cause": event.get("PlivoHangupCause"),
        "hangup_cause_code": to_int(event.get("PlivoHangupCauseCode")),
    })


def _leg(party: str, phase: str) -> Handler:
    return lambda conn, session, event: record_leg_phase(conn, session, event, party, phase)


def _end(party: str, end_event: str) -> Handler:
    return lambda conn, session, event: record_leg_end(conn, session, event, party, end_event)


def caller_reached_virtual_number(conn: Connection, session: RowMapping, event: Event) -> None:
    party = _party_of_caller(session, event)
    if party is not None:
        record_leg_phase(conn, session, event, party, "answered")


# Session-level events -------------------------------------------------------------------------


def session_timed_out(conn: Connection, session: RowMapping, event: Event) -> None:
    conn.execute(sessions.update().where(sessions.c.id == session["id"]).values(
        status="expired",
        expired_at=func.least(func.coalesce(sessions.c.expired_at, event.at), event.at),
    ))


def virtual_number_replaced(conn: Connection, session: RowMapping, event: Event) -> None:
    new = event.number("VirtualNumber")
    if not new:
        return
    history = VirtualNumberAssignment.__table__
    conn.execute(insert(history).values(session_id=session["id"], virtual_number=new, assigned_at=event.at)
                 .on_conflict_do_nothing())
    changed_at = session["virtual_number_changed_at"]
    if changed_at is not None and changed_at >= event.at:
        return  # a newer replacement has already been applied
    if session["virtual_number"]:  # keep the number being replaced in the history
        since = changed_at or session["plivo_created_at"] or session["created_at"]
        conn.execute(insert(history).values(session_id=session["id"], virtual_number=session["virtual_number"],
                                            assigned_at=since).on_conflict_do_nothing())
    conn.execute(sessions.update().where(sessions.c.id == session["id"])
                 .values(virtual_number=new, virtual_number_changed_at=event.at))


def pin_authentication(conn: Connection, session: RowMapping, event: Event) -> None:
    conn.execute(insert(PinAuthentication.__table__).values(
        session_id=session["id"], event_at=event.at, status=event.get("PinAuthenticationStatus") or "unknown",
        retry_counter=to_int(event.get("PinRetryCounter")), from_number=event.number("From"),
    ).on_conflict_do_nothing())


def nothing_to_record(conn: Connection, session: RowMapping, event: Event) -> None:
    """Stored and counted as an interaction; its legs' own events carry the facts."""


# Recordings -----------------------------------------------------------------------------------

def _recording_rank(status):
    return case((status == "completed", 3), (status == "failed", 2), else_=1)


def _recording(status: str) -> Handler:
    def handler(conn: Connection, session: RowMapping, event: Event) -> None:
        record_recording(conn, session, event, status)

    return handler


def record_recording(conn: Connection, session: RowMapping, event: Event, status: str) -> None:
    """A recording callback: upsert the recording by its RecordingUUID."""
    recording_uuid = event.get("RecordingUUID")
    if not recording_uuid:
        return
    upsert_recording(conn, session["id"], recording_uuid, status, {
        "recording_url": event.get("RecordingURL"),
        "resource_url": event.get("RecordingResourceURL"),
        "duration": to_int(event.get("RecordingDuration")),
        "format": event.get("RecordingFormat"),
        "started_at": parse_time(event.get("RecordingStartTime")),
        "ended_at": parse_time(event.get("RecordingEndTime")),
    })


def upsert_recording(conn: Connection, session_id: int, recording_uuid: str, status: str,
                     values: Mapping[str, Any]) -> None:
    """Insert or complete a recording; completed > failed > initiated whatever the order."""
    table = Recording.__table__
    stmt = insert(table).values(session_id=session_id, recording_uuid=recording_uuid, status=status, **values)
    newer = _recording_rank(stmt.excluded.status) > _recording_rank(table.c.status)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["recording_uuid"],
        set_={"status": case((newer, stmt.excluded.status), else_=table.c.status)}
        | {k: func.coalesce(stmt.excluded[k], table.c[k]) for k in values}
        | {"updated_at": func.now()},
    ))


# Dispatch tables ------------------------------------------------------------------------------

SESSION_EVENTS: dict[str, Handler] = {
    # Legacy vocabulary (reference §8.1, D-CB-LEG)
    "SessionFirstPartyAnswer": _leg("first", "answered"),  # first party's leg answered (or reached the number)
    "SessionFirstPartyRing": _leg("first", "ringing"),  # first party's phone rings (second party called)
    "SessionSecondPartyRing": _leg("second", "ringing"),  # second party's phone rings
    "SessionSecondPartyAnswer": _leg("second", "answered"),  # second party answered
    "SessionFirstPartyHangup": _end("first", "hangup"),  # first party's leg ended; carries billing
    "SessionSecondPartyHangup": _end("second", "hangup"),  # second party's leg ended; carries billing
    "SessionPinAuthenticationStatus": pin_authentication,  # a caller entered (or failed) a PIN
    "SessionTimeout": session_timed_out,  # the session reached its expiry
    "SessionVirtualNumberReplaced": virtual_number_replaced,  # Plivo swapped in a working number
    "SessionPartiesHangup": nothing_to_record,  # the session's call is done (D-MD only)
    # Latest vocabulary (reference §8.1, D-CB-NEW)
    "SessionFirstPartyInitiated": _leg("first", "initiated"),  # Plivo dialled the first party
    "SessionFirstPartyRinging": _leg("first", "ringing"),  # first party's phone rings
    "SessionFirstPartyComplete": _end("first", "complete"),  # first party's leg ended normally
    "SessionFirstPartyFailed": _end("first", "failed"),  # first party's leg could not be connected
    "SessionSecondPartyInitiated": _leg("second", "initiated"),  # Plivo dialled the second party
    "SessionSecondPartyRinging": _leg("second", "ringing"),  # tolerated spelling of …Ring
    "SessionSecondPartyComplete": _end("second", "complete"),  # second party's leg ended normally
    "SessionSecondPartyFailed": _end("second", "failed"),  # second party's leg could not be connected
    "SessionVirtualNumberAnswer": caller_reached_virtual_number,  # a party called the number (auto-answer)
}

RECORDING_EVENTS: dict[str, Handler] = {
    "SessionRecordingInitiated": _recording("initiated"),  # both parties answered; recording started
    "SessionRecordingCompleted": _recording("completed"),  # a party hung up; the file is ready
    "SessionRecordingFailed": _recording("failed"),  # record=true but recording could not start
}

HANDLERS = {"session": SESSION_EVENTS, "recording": RECORDING_EVENTS}
# Events that count as an interaction with the session (its last_interaction_at).
INTERACTION_EVENTS = {name for name in SESSION_EVENTS
                      if name not in ("SessionTimeout", "SessionVirtualNumberReplaced")}
# Events that cannot change call legs or recordings (so the daily totals need no update).
NO_ACTIVITY_EVENTS = {"SessionTimeout", "SessionVirtualNumberReplaced", "SessionPinAuthenticationStatus",
                      "SessionPartiesHangup"}


# Applying one callback ------------------------------------------------------------------------

_SESSION_COLUMNS = (sessions.c.id, sessions.c.first_party, sessions.c.second_party, sessions.c.virtual_number,
                    sessions.c.virtual_number_changed_at, sessions.c.plivo_created_at, sessions.c.created_at)


def lock_session(conn: Connection, event: Event) -> RowMapping:
    """Lock the session's row for this transaction, creating it if Plivo knows a session we don't."""
    query = select(*_SESSION_COLUMNS).where(sessions.c.session_uuid == event.session_uuid).with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None:
        # A session this service did not create (or whose create response was lost): record
        # what the callback says, and mark where we learnt of it.
        conn.execute(insert(sessions).values(
            session_uuid=event.session_uuid, origin="callback", status="active",
            first_party=event.number("FirstParty"), second_party=event.number("SecondParty"),
            virtual_number=event.number("VirtualNumber"),
        ).on_conflict_do_nothing(index_elements=["session_uuid"]))
        row = conn.execute(query).mappings().one()
    return row


def refresh_counters(conn: Connection, session_id: int, event: Event | None = None,
                     interaction_at: datetime | None = None) -> None:
    """Recompute the session's totals from its legs and recordings (never incremented).

    Also records the last interaction, and fills parties a discovered session did not know yet
    (the latest vocabulary names both parties in every event).
    """
    conn.execute(text("""
        UPDATE masking_sessions s
           SET call_count = l.n, answered_call_count = l.answered, billed_duration = l.billed, amount = l.amount,
               recording_count = r.n,
               last_interaction_at = GREATEST(s.last_interaction_at, CAST(:at AS timestamptz)),
               first_party = coalesce(s.first_party, :first_party),
               second_party = coalesce(s.second_party, :second_party),
               updated_at = now()
          FROM (SELECT count(*) AS n, count(answered_at) AS answered, coalesce(sum(billed_duration), 0) AS billed,
                       coalesce(sum(amount), 0) AS amount
                  FROM call_legs WHERE session_id = :id) l,
               (SELECT count(*) AS n FROM recordings WHERE session_id = :id AND status <> 'failed') r
         WHERE s.id = :id
    """), {"id": session_id, "at": interaction_at,
           "first_party": event.number("FirstParty") if event else None,
           "second_party": event.number("SecondParty") if event else None})


def apply_callback(conn: Connection, endpoint: str, params: Mapping[str, Any], received_at: datetime) -> str:
    """Apply one callback inside the caller's transaction; return "applied" or "ignored"."""
    name = params.get("EventName")
    session_uuid = params.get("SessionUUID")
    handler = HANDLERS[endpoint].get(name) if isinstance(name, str) else None
    if handler is None or not isinstance(session_uuid, str) or not session_uuid.strip():
        return "ignored"
    event = Event(name=name, session_uuid=session_uuid.strip(), params=params,
                  at=parse_time(params.get("EventTimestamp")) or received_at)
    session = lock_session(conn, event)
    if name in NO_ACTIVITY_EVENTS:
        handler(conn, session, event)
    else:
        with daily_totals_tracked(conn, session["id"]):
            handler(conn, session, event)
    interaction = event.at if endpoint == "session" and name in INTERACTION_EVENTS else None
    refresh_counters(conn, session["id"], event, interaction)
    return "applied"
