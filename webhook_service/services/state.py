"""A session's facts in memory: load them under the row lock, change them, save the difference.

Every change to a session's call activity (a callback, a replay, a reconciliation) goes through
one cycle, in one transaction that holds the session's row lock (a leg callback's is done by
Postgres, in `apply_leg_callback`, migration 0005, unless the session has interaction records):

    load  → the session row (locked), its leg events, Plivo interactions, legs and recordings;
    plan  → handlers add facts in memory; legs are re-derived (`legs.build_legs`); counters and
            the daily totals' delta are computed from the derived legs and recordings;
    save  → the new facts, the leg changes, the counters, the delta and the caller's own
            statements are written.

Loading and saving are each one round trip to Postgres (psycopg pipeline mode): the lock is
taken by the first statement of the pipeline, and the reads after it run after it in the same
transaction, so they see every fact committed before the lock was granted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..domain.activity import SHARDS, activity_delta, session_activity_of
from ..domain.legs import LEG_COLUMNS, build_legs

LEG_EVENT_FIELDS = ("call_uuid", "end_event", "duration", "billed_duration", "amount", "hangup_cause",
                    "hangup_cause_code", "from_number", "to_number")
RECORDING_FIELDS = ("recording_url", "resource_url", "duration", "format", "started_at", "ended_at")
INTERACTION_FIELDS = ("ended_at", "first_call_uuid", "second_call_uuid", "first_status", "second_status",
                      "call_count", "duration", "billed_duration", "amount", "recording_uuid")
_RECORDING_RANK = {"initiated": 1, "failed": 2, "completed": 3}

# -- Loading ------------------------------------------------------------------------------------

# A session this service did not create (or whose create answer was lost): record what the
# callback says, and that a callback is where we learnt of it.
DISCOVER_SESSION = """
    INSERT INTO masking_sessions (session_uuid, origin, status, first_party, second_party, virtual_number)
    VALUES (%(uuid)s, 'callback', 'active', %(first_party)s, %(second_party)s, %(virtual_number)s)
    ON CONFLICT (session_uuid) DO NOTHING
"""
COUNTERS = ("call_count", "answered_call_count", "billed_duration", "amount", "recording_count")
LOCK_SESSION = f"""
    SELECT id, session_uuid, status, first_party, second_party, virtual_number, virtual_number_changed_at,
           plivo_created_at, created_at, expired_at, expires_at, last_interaction_at, {", ".join(COUNTERS)}
      FROM masking_sessions WHERE session_uuid = %(uuid)s FOR UPDATE
"""
SESSION_ID = "(SELECT id FROM masking_sessions WHERE session_uuid = %(uuid)s)"
LOAD_EVENTS = f"SELECT * FROM leg_events WHERE session_id = {SESSION_ID}"
LOAD_INTERACTIONS = f"SELECT * FROM plivo_interactions WHERE session_id = {SESSION_ID}"
LOAD_LEGS = f"SELECT id, {', '.join(LEG_COLUMNS)} FROM call_legs WHERE session_id = {SESSION_ID}"
LOAD_RECORDINGS = f"SELECT * FROM recordings WHERE session_id = {SESSION_ID}"


@dataclass
class SessionState:
    """One session's facts as loaded (and, during planning, as changed in memory)."""

    session: dict[str, Any]
    events: list[dict[str, Any]]
    interactions: list[dict[str, Any]]
    legs: list[dict[str, Any]]
    recordings: list[dict[str, Any]]
    # Changes made in memory, written by `save`:
    new_events: list[dict[str, Any]] = field(default_factory=list)
    new_interactions: list[dict[str, Any]] = field(default_factory=list)
    new_recordings: list[dict[str, Any]] = field(default_factory=list)
    session_updates: dict[str, Any] = field(default_factory=dict)
    statements: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # handler-specific writes
    # The session's activity per day as loaded, before any change (for the daily totals' delta).
    activity_before: dict[Any, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.activity_before = session_activity_of(self.legs, self.recordings)

    @property
    def id(self) -> int:
        return self.session["id"]

    def add_leg_event(self, party: str, kind: str, at: datetime, facts: Mapping[str, Any]) -> None:
        """A callback fact about a leg; a fact already known only gains the values it lacked."""
        key = (party, kind, at)
        values = {k: facts.get(k) for k in LEG_EVENT_FIELDS}
        for event in self.events:
            if (event["party"], event["kind"], event["at"]) == key:
                event.update({k: v for k, v in values.items() if event.get(k) is None and v is not None})
                break
        else:
            self.events.append({"party": party, "kind": kind, "at": at, **values})
        self.new_events.append({"party": party, "kind": kind, "at": at, **values})

    def add_recording(self, recording_uuid: str, status: str, values: Mapping[str, Any]) -> None:
        """A recording's news; its status only moves up: completed > failed > initiated."""
        values = {k: values.get(k) for k in RECORDING_FIELDS}
        for recording in self.recordings:
            if recording["recording_uuid"] == recording_uuid:
                if _RECORDING_RANK[status] > _RECORDING_RANK[recording["status"]]:
                    recording["status"] = status
                recording.update({k: v for k, v in values.items() if v is not None})
                break
        else:
            self.recordings.append({"recording_uuid": recording_uuid, "status": status,
                                    "created_at": datetime.now(UTC), **values})
        self.new_recordings.append(next(r for r in self.recordings if r["recording_uuid"] == recording_uuid))

    def set_interaction(self, started_at: datetime, values: Mapping[str, Any]) -> None:
        """Plivo's latest record of one call replaces the previous one."""
        values = {k: values.get(k) for k in INTERACTION_FIELDS}
        self.interactions = [i for i in self.interactions if i["started_at"] != started_at]
        self.interactions.append({"started_at": started_at, **values})
        self.new_interactions.append({"started_at": started_at, **values})


def queue_load(pg: psycopg.Connection, session_uuid: str) -> list[psycopg.Cursor]:
    """Queue (in the caller's pipeline) the statements that lock and read one session.

    Read the result with `loaded(cursors)` once the pipeline has synced (None: no such session;
    a callback then creates it with DISCOVER_SESSION and loads again).
    """
    params = {"uuid": session_uuid}
    return [pg.cursor(row_factory=dict_row).execute(query, params)
            for query in (LOCK_SESSION, LOAD_EVENTS, LOAD_INTERACTIONS, LOAD_LEGS, LOAD_RECORDINGS)]


def loaded(cursors: list[psycopg.Cursor]) -> SessionState | None:
    """The state read by `queue_load`'s cursors (None if the session does not exist)."""
    session, events, interactions, legs, recordings = (c.fetchall() for c in cursors)
    if not session:
        return None
    return SessionState(session=dict(session[0]), events=[dict(r) for r in events],
                        interactions=[dict(r) for r in interactions], legs=[dict(r) for r in legs],
                        recordings=[dict(r) for r in recordings])


# -- Saving -------------------------------------------------------------------------------------

UPSERT_EVENT = """
    INSERT INTO leg_events (session_id, party, kind, at, {columns})
    VALUES (%(session_id)s, %(party)s, %(kind)s, %(at)s, {values})
    ON CONFLICT (session_id, party, kind, at) DO UPDATE SET {fill}
""".format(
    columns=", ".join(LEG_EVENT_FIELDS),
    values=", ".join(f"%({c})s" for c in LEG_EVENT_FIELDS),
    fill=", ".join(f"{c} = coalesce(leg_events.{c}, excluded.{c})" for c in LEG_EVENT_FIELDS),
)
UPSERT_INTERACTION = """
    INSERT INTO plivo_interactions (session_id, started_at, {columns})
    VALUES (%(session_id)s, %(started_at)s, {values})
    ON CONFLICT (session_id, started_at) DO UPDATE SET {replace}, fetched_at = now()
""".format(
    columns=", ".join(INTERACTION_FIELDS),
    values=", ".join(f"%({c})s" for c in INTERACTION_FIELDS),
    replace=", ".join(f"{c} = excluded.{c}" for c in INTERACTION_FIELDS),
)
UPSERT_RECORDING = """
    INSERT INTO recordings (session_id, recording_uuid, status, created_at, {columns})
    VALUES (%(session_id)s, %(recording_uuid)s, %(status)s, %(created_at)s, {values})
    ON CONFLICT (recording_uuid) DO UPDATE SET status = excluded.status, {replace}, updated_at = now()
""".format(
    columns=", ".join(RECORDING_FIELDS),
    values=", ".join(f"%({c})s" for c in RECORDING_FIELDS),
    replace=", ".join(f"{c} = excluded.{c}" for c in RECORDING_FIELDS),
)
INSERT_LEG = """
    INSERT INTO call_legs (session_id, {columns}) VALUES (%(session_id)s, {values})
""".format(columns=", ".join(LEG_COLUMNS), values=", ".join(f"%({c})s" for c in LEG_COLUMNS))
UPDATE_LEG = """
    UPDATE call_legs SET {assign}, updated_at = now() WHERE id = %(id)s
""".format(assign=", ".join(f"{c} = %({c})s" for c in LEG_COLUMNS))
DELETE_LEGS = "DELETE FROM call_legs WHERE id = ANY(%(ids)s)"
ADD_DAILY_DELTA = """
    INSERT INTO daily_call_totals AS t (day, shard, call_legs, answered_legs, billed_duration,
                                        answered_billed_duration, amount, recordings, sessions_with_calls)
    SELECT day, %(shard)s, legs, answered, billed, answered_billed, amount, recordings, sessions_with_calls
      FROM jsonb_to_recordset(%(delta)s) AS d(day date, legs bigint, answered bigint, billed bigint,
                                               answered_billed bigint, amount numeric, recordings bigint,
                                               sessions_with_calls bigint)
     ORDER BY day  -- one lock order for every transaction: no deadlocks between days of a shard
    ON CONFLICT (day, shard) DO UPDATE SET
        call_legs = t.call_legs + excluded.call_legs,
        answered_legs = t.answered_legs + excluded.answered_legs,
        billed_duration = t.billed_duration + excluded.billed_duration,
        answered_billed_duration = t.answered_billed_duration + excluded.answered_billed_duration,
        amount = t.amount + excluded.amount,
        recordings = t.recordings + excluded.recordings,
        sessions_with_calls = t.sessions_with_calls + excluded.sessions_with_calls
"""


def _counters(activity: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
    """The session's counters: its activity summed over the days (every derived leg has a day)."""
    days = activity.values()
    return {
        "call_count": sum(day["legs"] for day in days),
        "answered_call_count": sum(day["answered"] for day in days),
        "billed_duration": sum(day["billed"] for day in days),
        "amount": sum((day["amount"] for day in days), Decimal(0)),
        "recording_count": sum(day["recordings"] for day in days),
    }


def _leg_changes(existing: list[dict[str, Any]], wanted: list[dict[str, Any]]):
    """Pair wanted legs with rows: same party and end first, then the party's others in order."""
    remaining = list(existing)
    pairs: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    for leg in wanted:
        row = next((r for r in remaining if (r["party"], r["ended_at"]) == (leg["party"], leg["ended_at"])), None)
        if row is not None:
            remaining.remove(row)
        pairs.append((leg, row))
    for i, (leg, row) in enumerate(pairs):
        if row is None:
            row = next((r for r in remaining if r["party"] == leg["party"]), None)
            if row is not None:
                remaining.remove(row)
                pairs[i] = (leg, row)
    return pairs, remaining


def plan(state: SessionState, *, interaction_at: datetime | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Every write that makes the database match the state in memory (legs, counters, totals)."""
    sid = state.id
    writes: list[tuple[str, dict[str, Any]]] = []
    writes += [(UPSERT_EVENT, {"session_id": sid} | e) for e in state.new_events]
    writes += [(UPSERT_INTERACTION, {"session_id": sid} | i) for i in state.new_interactions]
    writes += [(UPSERT_RECORDING, {"session_id": sid} | {k: r.get(k) for k in
               ("recording_uuid", "status", "created_at", *RECORDING_FIELDS)}) for r in state.new_recordings]

    changed_activity = bool(state.new_events or state.new_interactions or state.new_recordings)
    if state.new_events or state.new_interactions:
        wanted = build_legs(state.events, state.interactions)
        pairs, leftover = _leg_changes(state.legs, wanted)
        for leg, row in pairs:
            if row is None:
                writes.append((INSERT_LEG, {"session_id": sid} | leg))
            elif any(row[c] != leg[c] for c in LEG_COLUMNS):
                writes.append((UPDATE_LEG, {"id": row["id"]} | leg))
        if leftover:
            writes.append((DELETE_LEGS, {"ids": [r["id"] for r in leftover]}))
        state.legs = [dict(leg, id=row["id"] if row else None) for leg, row in pairs]
    if changed_activity:
        activity = session_activity_of(state.legs, state.recordings)
        delta = activity_delta(state.activity_before, activity)
        if delta:
            writes.append((ADD_DAILY_DELTA, {"shard": sid % SHARDS, "delta": Jsonb(delta)}))
        state.session_updates |= _counters(activity)
    if interaction_at is not None:
        last = state.session.get("last_interaction_at")
        state.session_updates["last_interaction_at"] = max(t for t in (last, interaction_at) if t is not None)
    if state.session_updates:
        assign = ", ".join(f"{c} = %({c})s" for c in state.session_updates)
        writes.append((f"UPDATE masking_sessions SET {assign}, updated_at = now() WHERE id = %(id)s",
                       {"id": sid} | state.session_updates))
    return writes + state.statements

