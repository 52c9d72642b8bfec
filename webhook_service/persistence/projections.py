"""Load sessions for projection and save what their projection changed (the projector's statements).

A batch of sessions is projected in one transaction with two round trips (psycopg pipelines):

    load  → create the rows of sessions only callbacks know (autocommitted first), lock the sessions
            (`FOR UPDATE`, optionally `SKIP LOCKED`), then read their queue rows, facts, Plivo
            interactions and stored legs, recordings and numbers;
    save  → the legs, recordings and numbers that changed, the sessions' columns, the daily totals'
            change, the deletion of the queue rows read, COMMIT.

The queue rows are read after the lock and before the facts (statements of one READ COMMITTED
transaction see successively newer snapshots), so every fact whose queue row is deleted was read;
a fact committed after that leaves its queue row, and the session is projected again.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from operator import itemgetter
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import (
    BigInteger,
    Text,
    bindparam,
    delete,
    exists,
    extract,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..domain.activity import Activity, activity_delta, add_activity, session_activity_of
from ..domain.callbacks import FACT_FIELDS, CallbackFact
from ..domain.legs import LEG_COLUMNS
from ..domain.projection import RECORDING_FIELDS, SESSION_FIELDS, Projection, SessionRecord
from .models import CallbackFact as CallbackFactRow
from .models import (
    CallLeg,
    DailyCallTotals,
    MaskingSession,
    PlivoInteraction,
    ProjectionQueue,
    Recording,
    VirtualNumberAssignment,
)
from .sql import bulk_insert, bulk_update, columns_of, compiled

sessions = MaskingSession.__table__
facts = CallbackFactRow.__table__
queue = ProjectionQueue.__table__
interactions = PlivoInteraction.__table__
legs = CallLeg.__table__
recordings = Recording.__table__
numbers = VirtualNumberAssignment.__table__
totals = DailyCallTotals.__table__

# Each projection transaction adds its change to one shard of the day's rows, picked at random, so
# concurrent projectors rarely wait on one row; `reporting.call_activity_daily` sums the shards.
SHARDS = 16
RECORD_FIELDS = tuple(SessionRecord.__dataclass_fields__)
INTERACTION_FIELDS = ("started_at", "ended_at", "first_call_uuid", "second_call_uuid", "first_status",
                      "second_status", "call_count", "duration", "billed_duration", "amount", "recording_uuid",
                      "recording_resource_url")
RECORDING_COLUMNS = ("recording_uuid", "status", *RECORDING_FIELDS, "reported_at")
# A stored row's values and a projection's, side by side (a row changed if they differ).
_leg_values, _recording_values, _session_values = (itemgetter(*names) for names in (
    LEG_COLUMNS, RECORDING_COLUMNS, SESSION_FIELDS))
TOTALS = ("call_legs", "answered_legs", "billed_duration", "answered_billed_duration", "amount", "recordings",
          "sessions_with_calls")
# The activity's names for the totals' columns.
TOTALS_FROM = dict(zip(TOTALS, ("legs", "answered", "billed", "answered_billed", "amount", "recordings",
                                "sessions_with_calls"), strict=True))

_uuids = bindparam("uuids", type_=ARRAY(Text))
_ids = bindparam("ids", type_=ARRAY(BigInteger))
_claimed_ids = select(sessions.c.id).where(sessions.c.session_uuid == func.any(_uuids)).scalar_subquery()


def _params(table: Any, names: Iterable[str]) -> dict[str, Any]:
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


# -- Loading ---------------------------------------------------------------------------------------

_unnested = func.unnest(_uuids).column_valued("uuid")
# Sessions only callbacks know (this service never created them): their rows, before they are locked.
DISCOVER = compiled(
    pg_insert(sessions).from_select(["session_uuid", "origin"], select(_unnested, literal_column("'callback'"))
                                    .where(~exists().where(sessions.c.session_uuid == _unnested)))
    .on_conflict_do_nothing(index_elements=[sessions.c.session_uuid]))
_lock = (select(sessions.c.id, *(sessions.c[name] for name in dict.fromkeys(RECORD_FIELDS + SESSION_FIELDS)))
         .where(sessions.c.session_uuid == func.any(_uuids)).order_by(sessions.c.id))
LOCK = compiled(_lock.with_for_update())
LOCK_SKIP_LOCKED = compiled(_lock.with_for_update(skip_locked=True))
READ_QUEUE = compiled(select(queue.c.id, queue.c.session_uuid, queue.c.queued_at)
                      .where(queue.c.session_uuid == func.any(_uuids)))
READ_FACTS = compiled(select(*(facts.c[name] for name in FACT_FIELDS)).where(facts.c.session_uuid == func.any(_uuids)))
READ_INTERACTIONS = compiled(select(interactions.c.session_id, *(interactions.c[n] for n in INTERACTION_FIELDS))
                             .where(interactions.c.session_id.in_(_claimed_ids)))
READ_LEGS = compiled(select(legs.c.id, legs.c.session_id, *(legs.c[n] for n in LEG_COLUMNS))
                     .where(legs.c.session_id.in_(_claimed_ids)).order_by(legs.c.id))
READ_RECORDINGS = compiled(
    select(recordings.c.id, recordings.c.session_id, *(recordings.c[n] for n in RECORDING_COLUMNS))
    .where(recordings.c.session_id.in_(_claimed_ids)).order_by(recordings.c.id))
READ_NUMBERS = compiled(select(numbers.c.id, numbers.c.session_id, numbers.c.virtual_number, numbers.c.assigned_at)
                        .where(numbers.c.session_id.in_(_claimed_ids)).order_by(numbers.c.id))
# Candidates for a sweep: the sessions of the oldest queue rows.
OLDEST_DUE = compiled(select(queue.c.session_uuid).order_by(queue.c.id).limit(bindparam("limit", type_=BigInteger)))
IS_DUE = compiled(select(exists().where(queue.c.session_uuid == bindparam("session_uuid", type_=Text))))
# The age of the oldest queue row (ids follow commit order closely enough for a gauge).
OLDEST_AGE = compiled(select(extract("epoch", func.now() - queue.c.queued_at)).order_by(queue.c.id)
                      .limit(literal_column("1")))


@dataclass
class Loaded:
    """A locked batch of sessions with everything their projection reads and replaces."""

    sessions: list[dict[str, Any]]  # the locked rows: id, RECORD_FIELDS, SESSION_FIELDS
    queue: dict[str, list[dict[str, Any]]]  # by session uuid: id, queued_at
    facts: dict[str, list[CallbackFact]]
    interactions: dict[int, list[dict[str, Any]]]  # by session id
    legs: dict[int, list[dict[str, Any]]]
    recordings: dict[int, list[dict[str, Any]]]
    numbers: dict[int, list[dict[str, Any]]]

    def record(self, row: Mapping[str, Any]) -> SessionRecord:
        return SessionRecord(**{name: row[name] for name in RECORD_FIELDS})


def _grouped(rows: Iterable[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row.pop(key)].append(row)
    return grouped


def load(pg: psycopg.Connection, uuids: Sequence[str], *, skip_locked: bool) -> Loaded:
    """BEGIN, then lock and read the sessions named (creating rows for unknown ones first).

    With `skip_locked`, sessions another projector holds are left out; else this waits for them.
    The caller ends the transaction (`save`, or a rollback).
    """
    arguments = {"uuids": sorted(set(uuids))}
    with pg.pipeline():
        pg.execute(DISCOVER, arguments)  # autocommitted on its own: never held while projecting
        pg.execute("BEGIN")
        # Binary: times and decimals are read from their wire form, not parsed from text.
        cursors = [pg.cursor(row_factory=dict_row, binary=True).execute(query, arguments) for query in (
            LOCK_SKIP_LOCKED if skip_locked else LOCK, READ_QUEUE)]
        fact_cursor = pg.cursor(binary=True).execute(READ_FACTS, arguments)
        cursors += [pg.cursor(row_factory=dict_row, binary=True).execute(query, arguments) for query in (
            READ_INTERACTIONS, READ_LEGS, READ_RECORDINGS, READ_NUMBERS)]
    locked, queued, found_interactions, found_legs, found_recordings, found_numbers = (c.fetchall() for c in cursors)
    names = {row["session_uuid"] for row in locked}
    by_session: dict[str, list[CallbackFact]] = defaultdict(list)
    make = CallbackFact._make
    for values in fact_cursor.fetchall():
        if values[0] in names:
            by_session[values[0]].append(make(values))
    return Loaded(
        sessions=locked,
        queue=_grouped((row for row in queued if row["session_uuid"] in names), "session_uuid"),
        facts=by_session,
        interactions=_grouped(found_interactions, "session_id"),
        legs=_grouped(found_legs, "session_id"),
        recordings=_grouped(found_recordings, "session_id"),
        numbers=_grouped(found_numbers, "session_id"),
    )


# -- Saving ----------------------------------------------------------------------------------------

# One statement per kind of write for the whole batch: its rows travel as one array per column.
INSERT_LEGS = bulk_insert(legs, ("session_id", *LEG_COLUMNS))
UPDATE_LEGS = bulk_update(legs, "leg_id", LEG_COLUMNS, {"updated_at": func.now()})
DELETE_LEGS = compiled(delete(legs).where(legs.c.id == func.any(_ids)))
INSERT_RECORDINGS = bulk_insert(recordings, ("session_id", *RECORDING_COLUMNS))
UPDATE_RECORDINGS = bulk_update(recordings, "recording_id", RECORDING_COLUMNS, {"updated_at": func.now()})
DELETE_RECORDINGS = compiled(delete(recordings).where(recordings.c.id == func.any(_ids)))
INSERT_NUMBERS = bulk_insert(numbers, ("session_id", "virtual_number", "assigned_at"))
DELETE_NUMBERS = compiled(delete(numbers).where(numbers.c.id == func.any(_ids)))
UPDATE_SESSIONS = bulk_update(sessions, "session_id", SESSION_FIELDS, {"updated_at": func.now()})
_totals = pg_insert(totals).values(_params(totals, ("day", "shard", *TOTALS)))
ADD_TOTALS = compiled(_totals.on_conflict_do_update(
    index_elements=[totals.c.day, totals.c.shard],
    set_={name: totals.c[name] + _totals.excluded[name] for name in TOTALS}))
DEQUEUE = compiled(delete(queue).where(queue.c.id == func.any(_ids)))


@dataclass
class Changes:
    """Every write a batch's projections need, gathered for one pipeline."""

    insert_legs: list[dict[str, Any]] = field(default_factory=list)
    update_legs: list[dict[str, Any]] = field(default_factory=list)
    delete_legs: list[int] = field(default_factory=list)
    insert_recordings: list[dict[str, Any]] = field(default_factory=list)
    update_recordings: list[dict[str, Any]] = field(default_factory=list)
    delete_recordings: list[int] = field(default_factory=list)
    insert_numbers: list[dict[str, Any]] = field(default_factory=list)
    delete_numbers: list[int] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[date, dict[str, Any]] = field(default_factory=dict)
    dequeue: list[int] = field(default_factory=list)

    def add(self, session_row: Mapping[str, Any], stored: Loaded, projection: Projection) -> None:
        """The writes that make one session's stored rows what `projection` says."""
        sid = session_row["id"]
        stored_legs, stored_recordings = stored.legs.get(sid, []), stored.recordings.get(sid, [])
        before: Activity = session_activity_of(stored_legs, stored_recordings)
        add_activity(self.totals, activity_delta(before, projection.activity))

        pairs, leftover = pair_legs(stored_legs, projection.legs)
        for leg, row in pairs:
            if row is None:
                self.insert_legs.append({"session_id": sid, **leg})
            elif _leg_values(row) != _leg_values(leg):
                self.update_legs.append({"leg_id": row["id"], **leg})
        self.delete_legs += [row["id"] for row in leftover]

        kept = {r["recording_uuid"]: r for r in stored_recordings}
        for recording in projection.recordings:
            row = kept.pop(recording["recording_uuid"], None)
            if row is None:
                self.insert_recordings.append({"session_id": sid, **recording})
            elif _recording_values(row) != _recording_values(recording):
                self.update_recordings.append({"recording_id": row["id"], **recording})
        self.delete_recordings += [row["id"] for row in kept.values()]

        wanted = set(projection.numbers)
        have = {(r["virtual_number"], r["assigned_at"]): r["id"] for r in stored.numbers.get(sid, [])}
        self.insert_numbers += [{"session_id": sid, "virtual_number": number, "assigned_at": at}
                                for number, at in projection.numbers if (number, at) not in have]
        self.delete_numbers += [row_id for key, row_id in have.items() if key not in wanted]

        if _session_values(session_row) != _session_values(projection.session):
            self.sessions.append({"session_id": sid, **projection.session})
        self.dequeue += [row["id"] for row in stored.queue.get(session_row["session_uuid"], [])]


def pair_legs(stored: list[dict[str, Any]], wanted: list[dict[str, Any]]):
    """Pair wanted legs with stored rows: same party and end first, then the party's others by id."""
    remaining = list(stored)  # loaded in id order
    pairs: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    by_end = {(r["party"], r["ended_at"]): r for r in reversed(remaining)}  # the lowest id per (party, end)
    for leg in wanted:
        row = by_end.pop((leg["party"], leg["ended_at"]), None)
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


def save(pg: psycopg.Connection, changes: Changes) -> None:
    """Write the batch's changes and COMMIT, in one round trip."""
    shard = random.randrange(SHARDS)
    with pg.pipeline():
        for statement, rows, names in (
                (INSERT_LEGS, changes.insert_legs, ("session_id", *LEG_COLUMNS)),
                (UPDATE_LEGS, changes.update_legs, ("leg_id", *LEG_COLUMNS)),
                (INSERT_RECORDINGS, changes.insert_recordings, ("session_id", *RECORDING_COLUMNS)),
                (UPDATE_RECORDINGS, changes.update_recordings, ("recording_id", *RECORDING_COLUMNS)),
                (INSERT_NUMBERS, changes.insert_numbers, ("session_id", "virtual_number", "assigned_at")),
                (UPDATE_SESSIONS, changes.sessions, ("session_id", *SESSION_FIELDS))):
            if rows:
                pg.execute(statement, columns_of(rows, names))
        for statement, ids in ((DELETE_LEGS, changes.delete_legs), (DELETE_RECORDINGS, changes.delete_recordings),
                               (DELETE_NUMBERS, changes.delete_numbers), (DEQUEUE, changes.dequeue)):
            if ids:
                pg.execute(statement, {"ids": ids})
        rows = [{"day": day, "shard": shard, **{column: change[name] for column, name in TOTALS_FROM.items()}}
                for day, change in sorted(changes.totals.items()) if any(change.values())]
        if rows:  # in day order: one lock order for every transaction, so no deadlock between projectors
            pg.cursor().executemany(ADD_TOTALS, rows)
        pg.execute("COMMIT")
