"""Load sessions for projection and save what their projection changed (the projector's statements).

A batch of sessions is projected in one transaction with two round trips (psycopg pipelines),
three when some sessions are kept by the projector (`warm`, below):

    load  → create the rows of sessions only callbacks know (autocommitted first), lock the sessions
            (`FOR UPDATE`, optionally `SKIP LOCKED`), then read their queue rows, facts, Plivo
            interactions and stored legs, recordings and numbers;
    save  → the legs, recordings and numbers that changed, the sessions' columns (and their next
            `projection_version`), the daily totals' change, the deletion of the queue rows read,
            COMMIT.

The queue rows are read after the lock and before the facts (statements of one READ COMMITTED
transaction see successively newer snapshots), so every fact whose queue row is deleted was read;
a fact committed after that leaves its queue row, and the session is projected again.

For a session the projector keeps (its facts and last projection, of the `projection_version`
the lock reads), `load` reads only the facts its queue rows name, and no legs: once the new
projection says which legs it derived again, `load_legs` reads the stored rows of those alone.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from operator import itemgetter
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import (
    BigInteger,
    DateTime,
    Text,
    bindparam,
    column,
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
_leg_values, _recording_values = (itemgetter(*names) for names in (LEG_COLUMNS, RECORDING_COLUMNS))
TOTALS = ("call_legs", "answered_legs", "billed_duration", "answered_billed_duration", "amount", "recordings",
          "sessions_with_calls")
# The activity's names for the totals' columns.
TOTALS_FROM = dict(zip(TOTALS, ("legs", "answered", "billed", "answered_billed", "amount", "recordings",
                                "sessions_with_calls"), strict=True))

_uuids = bindparam("uuids", type_=ARRAY(Text))
_cold = bindparam("cold", type_=ARRAY(Text))  # the sessions read whole (the others: only what is new)
_warm = bindparam("warm", type_=ARRAY(Text))
_ids = bindparam("ids", type_=ARRAY(BigInteger))
_claimed_ids = select(sessions.c.id).where(sessions.c.session_uuid == func.any(_uuids)).scalar_subquery()
_cold_ids = select(sessions.c.id).where(sessions.c.session_uuid == func.any(_cold)).scalar_subquery()


def _params(table: Any, names: Iterable[str]) -> dict[str, Any]:
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


# -- Loading ---------------------------------------------------------------------------------------

_unnested = func.unnest(_uuids).column_valued("uuid")
# Sessions only callbacks know (this service never created them): their rows, before they are locked.
DISCOVER = compiled(
    pg_insert(sessions).from_select(["session_uuid", "origin"], select(_unnested, literal_column("'callback'"))
                                    .where(~exists().where(sessions.c.session_uuid == _unnested)))
    .on_conflict_do_nothing(index_elements=[sessions.c.session_uuid]))
_lock = (select(sessions.c.id, sessions.c.projection_version,
                *(sessions.c[name] for name in dict.fromkeys(RECORD_FIELDS + SESSION_FIELDS)))
         .where(sessions.c.session_uuid == func.any(_uuids)).order_by(sessions.c.id))
LOCK = compiled(_lock.with_for_update())
LOCK_SKIP_LOCKED = compiled(_lock.with_for_update(skip_locked=True))
READ_QUEUE = compiled(select(queue.c.id, queue.c.session_uuid, queue.c.queued_at)
                      .where(queue.c.session_uuid == func.any(_uuids)))
_fact_columns = (facts.c.inbox_id, *(facts.c[name] for name in FACT_FIELDS))
READ_FACTS = compiled(select(*_fact_columns).where(facts.c.session_uuid == func.any(_cold)))
# A kept session's new facts: those its queue rows name (a row read here and not by READ_QUEUE
# names a fact that is read again next time; the projector keeps each fact once, by inbox id).
READ_QUEUED_FACTS = compiled(
    select(*_fact_columns).join(queue, (queue.c.session_uuid == facts.c.session_uuid)
                                & (queue.c.inbox_id == facts.c.inbox_id))
    .where(queue.c.session_uuid == func.any(_warm)))
READ_INTERACTIONS = compiled(select(interactions.c.session_id, *(interactions.c[n] for n in INTERACTION_FIELDS))
                             .where(interactions.c.session_id.in_(_claimed_ids)))
READ_LEGS = compiled(select(legs.c.id, legs.c.session_id, *(legs.c[n] for n in LEG_COLUMNS))
                     .where(legs.c.session_id.in_(_cold_ids)).order_by(legs.c.id))
# The stored legs a projection derived again: by session and party, those not ended by a time.
_regions = func.unnest(bindparam("session_ids", type_=ARRAY(BigInteger)), bindparam("parties", type_=ARRAY(Text)),
                       bindparam("cuts", type_=ARRAY(DateTime(timezone=True)))
                       ).table_valued(column("session_id", BigInteger), column("party", Text),
                                      column("cut", DateTime(timezone=True))).render_derived(name="r")
READ_LEGS_AFTER = compiled(
    select(legs.c.id, legs.c.session_id, *(legs.c[n] for n in LEG_COLUMNS))
    .join(_regions, (legs.c.session_id == _regions.c.session_id) & (legs.c.party == _regions.c.party)
          & (legs.c.ended_at.is_(None) | (legs.c.ended_at > _regions.c.cut)))
    .order_by(legs.c.id))
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

    sessions: list[dict[str, Any]]  # the locked rows: id, projection_version, RECORD_FIELDS, SESSION_FIELDS
    queue: dict[str, list[dict[str, Any]]]  # by session uuid: id, queued_at
    facts: dict[str, list[tuple[int, CallbackFact]]]  # by session uuid: (inbox id, fact); a warm one's new only
    interactions: dict[int, list[dict[str, Any]]]  # by session id
    legs: dict[int, list[dict[str, Any]]]  # a cold session's all; a warm one's after `load_legs`
    recordings: dict[int, list[dict[str, Any]]]
    numbers: dict[int, list[dict[str, Any]]]

    def record(self, row: Mapping[str, Any]) -> SessionRecord:
        return SessionRecord(**{name: row[name] for name in RECORD_FIELDS})


def _grouped(rows: Iterable[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row.pop(key)].append(row)
    return grouped


def _facts_by_session(rows: Iterable[tuple], names: set[str], into: dict[str, list[tuple[int, CallbackFact]]]
                      ) -> None:
    make = CallbackFact._make
    for row in rows:
        if row[1] in names:
            into[row[1]].append((row[0], make(row[1:])))


def load(pg: psycopg.Connection, uuids: Sequence[str], *, skip_locked: bool, warm: Iterable[str] = ()) -> Loaded:
    """BEGIN, then lock and read the sessions named (creating rows for unknown ones first).

    With `skip_locked`, sessions another projector holds are left out; else this waits for them.
    Of the `warm` sessions (kept by the caller), only the facts their queue rows name are read, and
    no legs (see `load_legs`). The caller ends the transaction (`save`, or a rollback).
    """
    everything = sorted(set(uuids))
    warm = sorted(set(warm) & set(everything))
    arguments = {"uuids": everything, "cold": sorted(set(everything) - set(warm)), "warm": warm}
    with pg.pipeline():
        pg.execute(DISCOVER, arguments)  # autocommitted on its own: never held while projecting
        pg.execute("BEGIN")
        # Binary: times and decimals are read from their wire form, not parsed from text.
        cursors = [pg.cursor(row_factory=dict_row, binary=True).execute(query, arguments) for query in (
            LOCK_SKIP_LOCKED if skip_locked else LOCK, READ_QUEUE)]
        fact_cursors = [pg.cursor(binary=True).execute(query, arguments) for query in (READ_FACTS, READ_QUEUED_FACTS)]
        cursors += [pg.cursor(row_factory=dict_row, binary=True).execute(query, arguments) for query in (
            READ_INTERACTIONS, READ_LEGS, READ_RECORDINGS, READ_NUMBERS)]
    locked, queued, found_interactions, found_legs, found_recordings, found_numbers = (c.fetchall() for c in cursors)
    names = {row["session_uuid"] for row in locked}
    by_session: dict[str, list[tuple[int, CallbackFact]]] = defaultdict(list)
    for cursor in fact_cursors:
        _facts_by_session(cursor.fetchall(), names, by_session)
    return Loaded(
        sessions=locked,
        queue=_grouped((row for row in queued if row["session_uuid"] in names), "session_uuid"),
        facts=by_session,
        interactions=_grouped(found_interactions, "session_id"),
        legs=_grouped(found_legs, "session_id"),
        recordings=_grouped(found_recordings, "session_id"),
        numbers=_grouped(found_numbers, "session_id"),
    )


def load_facts(pg: psycopg.Connection, loaded: Loaded, uuids: Sequence[str]) -> None:
    """Read all the facts of sessions loaded warm whose kept copy turned out stale (in the transaction)."""
    loaded.facts.update({uuid: [] for uuid in uuids})
    rows = pg.cursor(binary=True).execute(READ_FACTS, {"cold": sorted(uuids)}).fetchall()
    _facts_by_session(rows, set(uuids), loaded.facts)


def load_legs(pg: psycopg.Connection, loaded: Loaded, whole: Sequence[int],
              regions: Mapping[int, Mapping[str, datetime]]) -> None:
    """Read the stored legs of sessions loaded warm (in the transaction): all of those in `whole`
    (by session id); of those in `regions`, each party's legs not ended by its time."""
    cursors = []
    with pg.pipeline():
        if whole:
            cursors.append(pg.cursor(row_factory=dict_row, binary=True).execute(
                READ_LEGS, {"cold": [row["session_uuid"] for row in loaded.sessions if row["id"] in set(whole)]}))
        if regions:
            cuts = [(sid, party, at) for sid, by_party in regions.items() for party, at in by_party.items()]
            cursors.append(pg.cursor(row_factory=dict_row, binary=True).execute(READ_LEGS_AFTER, {
                "session_ids": [c[0] for c in cuts], "parties": [c[1] for c in cuts], "cuts": [c[2] for c in cuts]}))
    for cursor in cursors:
        loaded.legs.update(_grouped(cursor.fetchall(), "session_id"))


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
SESSION_COLUMNS = (*SESSION_FIELDS, "projection_version")
UPDATE_SESSIONS = bulk_update(sessions, "session_id", SESSION_COLUMNS, {"updated_at": func.now()})
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

    def add(self, session_row: Mapping[str, Any], stored: Loaded, projection: Projection,
            before: Activity | None = None) -> None:
        """The writes that make one session's stored rows what `projection` says.

        `before`: the activity of the stored rows, when the caller knows it (its kept copy of the
        last projection); then the stored legs loaded may be only those the projection derived
        again (`Projection.kept_legs_until`).
        """
        sid = session_row["id"]
        stored_legs, stored_recordings = stored.legs.get(sid, []), stored.recordings.get(sid, [])
        if before is None:
            before = session_activity_of(stored_legs, stored_recordings)
        add_activity(self.totals, activity_delta(before, projection.activity))

        wanted = projection.legs
        kept = projection.kept_legs_until
        if kept is not None:  # the legs kept from the last projection are stored as they are
            wanted = [leg for leg in wanted if leg["ended_at"] is None or leg["ended_at"] > kept[leg["party"]]]
        pairs, leftover = pair_legs(stored_legs, wanted)
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

        numbers = set(projection.numbers)
        have = {(r["virtual_number"], r["assigned_at"]): r["id"] for r in stored.numbers.get(sid, [])}
        self.insert_numbers += [{"session_id": sid, "virtual_number": number, "assigned_at": at}
                                for number, at in projection.numbers if (number, at) not in have]
        self.delete_numbers += [row_id for key, row_id in have.items() if key not in numbers]

        # Always written: the next projection_version says which projection the stored rows are.
        self.sessions.append({"session_id": sid, **projection.session,
                              "projection_version": session_row["projection_version"] + 1})
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
                (UPDATE_SESSIONS, changes.sessions, ("session_id", *SESSION_COLUMNS))):
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
