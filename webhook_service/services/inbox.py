"""The callback inbox: store each verified callback once with its fact; replay; prune.

Receiving a callback does what Plivo waits for and nothing more: read its parameters into its fact
(`domain.callbacks.read_callback`), then one statement stores the inbox row, the fact and a
projection-queue row (`persistence.inbox.STORE_RECORDED`), committed with those of the callbacks
arriving meanwhile (`persistence.group_commit`); the 200 goes after the commit. Nothing is derived
in the request: the projector does that after the answer (`services.projector`), nudged here.

The dedupe key is a hash of the exact string the callback's signature covers, without the nonce:
Plivo's redelivery (a new nonce) and any reshaping of a captured callback that still verifies
(docs/security.md) are the same callback, a quiet `duplicate`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg.errors import LockNotAvailable
from psycopg.types.json import Jsonb
from sqlalchemy.exc import OperationalError

from .. import metrics
from ..context import Context
from ..domain.callbacks import Reading, inbox_month, plain_params, read_callback
from ..errors import NotFound
from ..persistence import partitions
from ..persistence.db import Database, is_database_unavailable
from ..persistence.inbox import (
    MARK_READ,
    QUEUE_FACT,
    RECORD_FACT,
    STORE_OTHER,
    STORE_RECORDED,
    fact_arguments,
    failed_count,
    known_ids,
    listing,
    prune_batch,
    prune_count,
    replay_batch,
    replay_selection,
    selection_count,
)

# Told how far long work has got: (done, total). The CLI draws a progress bar with it on a terminal.
Progress = Callable[[int, int], None]

log = logging.getLogger(__name__)



def dedupe_key(signed: str) -> str:
    """A callback's identity: the SHA-256 of the string its signature covers (URL and parameters)."""
    return hashlib.sha256(signed.encode("utf-8", "surrogatepass")).hexdigest()


def _inbox_row(endpoint: str, method: str, content_type: str | None, params: Mapping[str, str], nonce: str | None,
               key: str) -> dict[str, Any]:
    """The callback's inbox columns, but its status (what reading it gave)."""
    session_uuid = params.get("SessionUUID")
    event_name = params.get("EventName")
    return {
        "endpoint": endpoint, "method": method, "content_type": content_type, "params": Jsonb(params),
        "nonce": nonce, "dedupe_key": key, "event_name": event_name[:200] if event_name else None,
        "session_uuid": session_uuid[:200] if session_uuid else None,
    }


def _status(reading: Reading) -> dict[str, Any]:
    return {"status": reading.outcome, "error": reading.reason if reading.outcome == "failed" else None}


def receive(ctx: Context, endpoint: str, method: str, content_type: str | None, params: Mapping[str, str],
            nonce: str | None, signed: str) -> str:
    """Store one verified callback and its fact in one statement. Returns the outcome.

    Outcomes: "recorded" (its fact is stored and its session due for projection), "duplicate"
    (already stored: nothing happens), "ignored" (an event this service does not act on: stored
    only), "failed" (stored with the reason it could not be read, for replay). If the database is
    unavailable the error propagates (503) and nothing is stored.
    """
    row = _inbox_row(endpoint, method, content_type, params, nonce, dedupe_key(signed))
    row["event_month"] = inbox_month(signed)
    reading = read_callback(endpoint, params)
    row |= _status(reading)
    # Committed with the statements of the callbacks arriving meanwhile (persistence.group_commit).
    try:
        if reading.fact is not None:
            stored = ctx.group_commit.execute(STORE_RECORDED, row | fact_arguments(reading.fact))
        else:
            stored = ctx.group_commit.execute(STORE_OTHER, row)
    except Exception as exc:
        if is_database_unavailable(exc) or reading.fact is None:
            raise  # nothing was stored: the view answers 503 (or 500, for a bug)
        # The fact could not be stored (a value Postgres refuses): keep the callback, with why.
        log.exception("callback's fact could not be stored", extra={"endpoint": endpoint})
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        stored = ctx.group_commit.execute(STORE_OTHER, row | {"status": "failed", "error": reason})
        reading = Reading("failed", reason=reason)
    outcome = reading.outcome if stored else "duplicate"
    if outcome == "recorded" and ctx.background is not None:
        ctx.background.nudge()
    metrics.CALLBACKS.labels(endpoint, outcome).inc()
    return outcome


def replay(ctx: Context, *, ids: Iterable[int] = (), failed: bool = False, since: datetime | None = None,
           progress: Progress | None = None) -> dict[str, int]:
    """Read stored callbacks again from their stored parameters, record their facts, project.

    Selectors combine (`failed=True, since=…`: failed callbacks received since then); with none, the
    failed ones. Safe to repeat: a callback's fact replaces the one it recorded before, and facts
    are a set. For callbacks a bug mis-read (then fixed), or events this service learnt to handle.
    An id that names no stored callback is NotFound, and then nothing is replayed.
    """
    ids = list(ids)
    if ids:
        with ctx.db.engine.connect() as conn:
            missing = sorted(set(ids) - set(conn.execute(known_ids(ids)).scalars()))
        if missing:
            raise NotFound(f"No stored callback with id {', '.join(map(str, missing))}: nothing was replayed",
                           details={"missing": missing})
    condition = replay_selection(ids=ids, failed=failed, since=since)
    total = done = 0
    if progress is not None:
        with ctx.db.engine.connect() as conn:
            total = conn.execute(selection_count(condition)).scalar_one()
    counts: dict[str, int] = {}
    due: set[str] = set()
    last_id = 0
    while True:  # in batches, so a large replay never holds a big result in memory
        with ctx.db.engine.connect() as conn:
            batch = conn.execute(replay_batch(condition, last_id, 500)).all()
        if not batch:
            break
        for inbox_id, endpoint, params in batch:
            outcome, session_uuid = _replay_one(ctx.db, inbox_id, endpoint, params)
            counts[outcome] = counts.get(outcome, 0) + 1
            if session_uuid:
                due.add(session_uuid)
            last_id = inbox_id
            done += 1
            if progress is not None:
                progress(done, max(total, done))
    ctx.projector.project(due, wait=True)
    return counts


def _replay_one(db: Database, inbox_id: int, endpoint: str, params: Mapping[str, Any]) -> tuple[str, str | None]:
    try:
        reading = read_callback(endpoint, plain_params(params))
    except ValueError as exc:  # stored before parameters were read strictly (revision 0006)
        reading = Reading("failed", reason=f"the callback's {exc}")
    with db.pg() as pg, pg.transaction():
        if reading.fact is not None:
            pg.execute(RECORD_FACT, {"inbox_id": inbox_id} | fact_arguments(reading.fact))
            pg.execute(QUEUE_FACT, {"session_uuid": reading.fact.session_uuid, "inbox_id": inbox_id})
        pg.execute(MARK_READ, {"inbox_id": inbox_id} | _status(reading))
    return reading.outcome, reading.fact.session_uuid if reading.fact else None


def failed_callbacks(db: Database) -> int:
    with db.engine.connect() as conn:
        return conn.execute(failed_count()).scalar_one()


def list_callbacks(db: Database, *, failed: bool = False, session_uuid: str | None = None,
                   since: datetime | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest stored callbacks first (what `flask callbacks list` shows), filtered as asked."""
    with db.engine.connect() as conn:
        rows = conn.execute(listing(failed=failed, session_uuid=session_uuid, since=since, limit=limit)).mappings()
        return [dict(row) for row in rows]


def prune(db: Database, *, older_than: timedelta, batch_size: int = 1000, pause: float = 0.0,
          progress: Progress | None = None) -> int:
    """Delete recorded and ignored inbox rows received before `older_than` ago; returns how many.

    Their facts stay (`callback_facts` is the record); failed rows are kept for replay. On either
    layout of the inbox:

    * plain (before migration 0011), and the partitions that are not a month (the legacy one of the
      rows stored before 0011, the default one): in small batches, each its own short transaction
      that skips rows another transaction holds, so nothing waits on it; the legacy partition is
      dropped once nothing but failed rows is left in it;
    * partitioned by month: every month that ended before the cutoff is dropped whole (its failed
      rows kept, in the default partition). A month is kept until all of it is older than the
      cutoff, so rows live between `older_than` and `older_than` plus a month.
    """
    cutoff = datetime.now(UTC) - older_than
    done = [0, 0]  # rows deleted so far, and how many there are to delete (for `progress`)
    with db.engine.connect() as conn:
        partitioned = partitions.is_partitioned(conn)
        existing = partitions.partitions(conn) if partitioned else []
        if progress is not None:
            done[1] = conn.execute(prune_count(cutoff)).scalar_one()
    # Row by row: the plain inbox; or the legacy and default partitions of the partitioned one.
    row_by_row = [None] if not partitioned else [p for p in existing if p in partitions.ROW_BY_ROW]
    deleted = sum(_prune_rows(db, cutoff, batch_size, pause, partition, progress, done)
                  for partition in row_by_row)
    if partitions.LEGACY_PARTITION in existing:
        with db.engine.connect() as conn:
            empty = partitions.legacy_is_empty(conn)
        if empty:
            deleted += _dropped(_drop(db, partitions.LEGACY_PARTITION), progress, done)
    for name in existing:
        month = partitions.month_of(name)
        if month is None:
            continue
        month_end = datetime.combine(partitions.add_months(month, 1), datetime.min.time(), UTC)
        if month_end <= cutoff:
            deleted += _dropped(_drop(db, name), progress, done)
    return deleted


def _dropped(rows: int, progress: Progress | None, done: list[int]) -> int:
    """Count a dropped partition's rows as done (a month holds rows by event time, so the count
    made by receipt time may differ: the bar never runs past its end)."""
    done[0] += rows
    if progress is not None and rows:
        progress(done[0], max(done))
    return rows


def _drop(db: Database, partition: str) -> int:
    """Drop one partition of the inbox; the rows dropped (0 if it was busy: dropped on the next run)."""
    try:
        with db.engine.begin() as conn:
            dropped = partitions.drop_partition(conn, partition)
    except OperationalError as exc:
        if not isinstance(exc.orig, LockNotAvailable):
            raise
        # Live work held the inbox longer than the lock timeout: never queue callbacks behind us.
        log.warning("prune: %s is busy; it is dropped on the next run", partition)
        return 0
    log.info("prune: dropped the inbox's partition %s", partition)
    return dropped


def _prune_rows(db: Database, cutoff: datetime, batch_size: int, pause: float, partition: str | None,
                progress: Progress | None, done: list[int]) -> int:
    deleted = 0
    while True:
        with db.engine.begin() as conn:
            batch = conn.execute(prune_batch(cutoff, batch_size, partition=partition)).rowcount
        deleted += batch
        done[0] += batch
        if progress is not None:
            progress(done[0], max(done))
        if batch < batch_size:
            return deleted
        if pause:
            time.sleep(pause)


def ensure_partitions(db: Database, *, months_ahead: int = partitions.MONTHS_AHEAD,
                      today: date | None = None) -> list[str]:
    """Make the inbox's partitions from this month to `months_ahead` months on, where missing (the
    worker calls this every hour); returns those made. Nothing to do on a plain inbox."""
    made = []
    this_month = (today or datetime.now(UTC).date()).replace(day=1)
    with db.engine.connect() as conn:
        if not partitions.is_partitioned(conn):
            return made
        existing = set(partitions.partitions(conn))
    for offset in range(months_ahead + 1):
        month = partitions.add_months(this_month, offset)
        if partitions.month_name(month) not in existing:
            with db.engine.begin() as conn:
                made.append(partitions.create_month(conn, month))
            log.info("made the inbox's partition %s", made[-1])
    return made


def keep_partitions_ahead(db: Database, stop: threading.Event, *, every: float = 3600.0) -> None:
    """The worker's thread: `ensure_partitions` now, then every `every` seconds, until `stop`."""
    while True:
        try:
            ensure_partitions(db)
        except Exception as exc:  # noqa: BLE001 - tried again next time; three months are made ahead
            log.warning("could not make the inbox's next partitions: %s", type(exc).__name__, exc_info=True)
        if stop.wait(every):
            return
