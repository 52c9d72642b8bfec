"""The callback inbox: store each verified callback once, then apply it; replay what did not apply.

The hot path, in two round trips to Postgres for a new callback (psycopg pipelines):

1. INSERT the callback into the inbox (its own autocommitted statement: the callback is safe
   from here on, and a redelivery hits the unique dedupe key and stops), then BEGIN, lock the
   session and read its facts (`state.queue_load`);
2. write what the event changes (`state.plan`), mark the inbox row applied, COMMIT.

If applying fails, the transaction rolls back and the inbox row keeps the error (`failed`); if the
database goes away in between, the row stays `pending`. Both are re-applied by `replay`, which
the worker runs every minute for pending rows and operators run for failed ones after a fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import and_, func, or_, select, text

from .. import metrics
from ..db import Database, is_database_unavailable
from ..models import CallbackInbox
from .events import NOT_INTERACTIONS, Event, apply_event, handler_for
from .state import SessionState, loaded, plan, queue_load

log = logging.getLogger(__name__)
inbox = CallbackInbox.__table__

# A redelivery of a callback already applied (or ignored) returns no row: it is a duplicate. A
# redelivery of one stored but not applied (its first delivery was cut off by a worker's death
# or the database going away, or applying it failed) returns the stored row, to apply it now:
# Plivo's retry then completes the record instead of waiting for the worker's replay. A row
# pending for under 5 s is left alone: its first delivery is most likely being applied right now.
INSERT_INBOX = """
    INSERT INTO callback_inbox AS inbox (endpoint, method, content_type, params, nonce, dedupe_key,
                                         event_name, session_uuid, status)
    VALUES (%(endpoint)s, %(method)s, %(content_type)s, %(params)s, %(nonce)s, %(dedupe_key)s, %(event_name)s,
            %(session_uuid)s, %(status)s)
    ON CONFLICT (dedupe_key) DO UPDATE SET attempts = inbox.attempts
     WHERE inbox.status = 'failed' OR (inbox.status = 'pending' AND inbox.received_at < now() - interval '5 seconds')
    RETURNING id
"""
MARK_APPLIED = """
    UPDATE callback_inbox SET status = 'applied', error = NULL, attempts = attempts + 1, applied_at = now()
     WHERE id = %(id)s
"""
MARK_IGNORED = "UPDATE callback_inbox SET status = 'ignored', applied_at = now() WHERE id = %(id)s"
MARK_FAILED = """
    UPDATE callback_inbox SET status = 'failed', error = %(error)s, attempts = attempts + 1 WHERE id = %(id)s
"""


def dedupe_key(endpoint: str, params: Mapping[str, Any]) -> str:
    """Same endpoint and same signed parameters → same key, whatever the nonce or the encoding."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(f"{endpoint}\n{canonical}".encode()).hexdigest()


def _text(params: Mapping[str, Any], name: str) -> str | None:
    value = params.get(name)
    return value[:200] if isinstance(value, str) else None


def _apply(pg: psycopg.Connection, state: SessionState | None, endpoint: str, event: Event, inbox_id: int) -> str:
    """Apply `event` to the loaded, locked `state` and commit; on error keep the error on the row."""
    try:
        if state is None:
            raise LookupError(f"session {event.session_uuid} could not be loaded")
        apply_event(state, endpoint, event)
        writes = plan(state, interaction_at=event.at if endpoint == "session" and event.name not in NOT_INTERACTIONS
                      else None)
        with pg.pipeline():
            for sql, params in writes:
                pg.execute(sql, params)
            pg.execute(MARK_APPLIED, {"id": inbox_id})
            pg.execute("COMMIT")
        return "applied"
    except Exception as exc:
        if is_database_unavailable(exc) or pg.broken or pg.closed:
            raise  # the row stays pending: stored, and replayed once the database is back
        log.exception("callback %s could not be applied", inbox_id)
        pg.rollback()
        pg.execute(MARK_FAILED, {"id": inbox_id, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        return "failed"


def receive(db: Database, endpoint: str, method: str, content_type: str | None, params: Mapping[str, Any],
            nonce: str | None) -> str:
    """Store the callback (committed on its own), then apply it. Returns the outcome.

    Outcomes: "duplicate" (already stored: nothing happens), "applied", "ignored" (an event we
    do not act on, or no session named), "failed" (stored with the error, for replay), "stored"
    (the database went away after the row was committed: it is safe, and replay applies it).
    """
    now = datetime.now(UTC)
    event = Event.parse(params, now)
    handled = handler_for(endpoint, event) is not None
    row = {
        "endpoint": endpoint, "method": method, "content_type": content_type, "params": Jsonb(dict(params)),
        "nonce": nonce, "dedupe_key": dedupe_key(endpoint, params), "event_name": _text(params, "EventName"),
        "session_uuid": _text(params, "SessionUUID"), "status": "pending" if handled else "ignored",
    }
    with db.pg() as pg:
        with pg.pipeline():
            # Explicit BEGIN/COMMIT: in a pipeline, statements up to the next sync share one implicit
            # transaction, which the apply step's BEGIN would otherwise extend over the inbox row.
            pg.execute("BEGIN")
            stored = pg.execute(INSERT_INBOX, row)
            pg.execute("COMMIT")
            if handled:
                assert event is not None
                pg.execute("BEGIN")
                cursors = queue_load(pg, event.session_uuid, event.discovered())
        inbox_id = stored.fetchone()
        if inbox_id is None:
            if handled:
                pg.rollback()
            outcome = "duplicate"
        elif not handled:
            outcome = "ignored"
        else:
            assert event is not None
            try:
                outcome = _apply(pg, loaded(cursors), endpoint, event, inbox_id[0])
            except Exception as exc:
                if not is_database_unavailable(exc):
                    raise
                log.warning("callback %s stored but not applied: database unavailable", inbox_id[0])
                outcome = "stored"
    metrics.CALLBACKS.labels(endpoint, outcome).inc()
    return outcome


def apply_stored(db: Database, inbox_id: int, endpoint: str, params: Mapping[str, Any],
                 received_at: datetime) -> str:
    """Apply (again) a stored callback from its stored parameters. Idempotent."""
    event = Event.parse(params, received_at)
    try:
        with db.pg() as pg:
            if handler_for(endpoint, event) is None:
                pg.execute(MARK_IGNORED, {"id": inbox_id})
                return "ignored"
            assert event is not None
            with pg.pipeline():
                pg.execute("BEGIN")
                cursors = queue_load(pg, event.session_uuid, event.discovered())
            return _apply(pg, loaded(cursors), endpoint, event, inbox_id)
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        log.warning("callback %s not replayed: database unavailable", inbox_id)
        return "stored"


def replay(db: Database, *, ids: Iterable[int] = (), failed: bool = False, since: datetime | None = None,
           pending_older_than: timedelta = timedelta(seconds=60)) -> dict[str, int]:
    """Re-apply stored callbacks from their stored parameters. Safe to repeat: handlers are idempotent.

    Selectors combine (`failed=True, since=…`: failed callbacks received since then). With none,
    replays failed callbacks and pending ones older than `pending_older_than` (whose application
    was cut short, e.g. by a database restart).
    """
    conditions = []
    ids = list(ids)
    if ids:
        conditions.append(inbox.c.id.in_(ids))
    if since is not None:
        conditions.append(inbox.c.received_at >= since)
    if failed:
        conditions.append(inbox.c.status == "failed")
    if not conditions:
        conditions.append(pending_or_failed(pending_older_than))
    return _replay_where(db, and_(*conditions))


def pending_or_failed(pending_older_than: timedelta, *, include_failed: bool = True):
    stale = (inbox.c.status == "pending") & (inbox.c.received_at < datetime.now(UTC) - pending_older_than)
    return or_(inbox.c.status == "failed", stale) if include_failed else stale


def _replay_where(db: Database, condition) -> dict[str, int]:
    counts: dict[str, int] = {}
    last_id = 0
    while True:  # in batches, so a large replay never holds a big result in memory
        with db.engine.connect() as conn:
            batch = conn.execute(
                select(inbox.c.id, inbox.c.endpoint, inbox.c.params, inbox.c.received_at)
                .where(condition, inbox.c.id > last_id).order_by(inbox.c.id).limit(500)
            ).all()
        if not batch:
            return counts
        for row in batch:
            outcome = apply_stored(db, row.id, row.endpoint, row.params, row.received_at)
            counts[outcome] = counts.get(outcome, 0) + 1
            last_id = row.id


def replay_stale_pending(db: Database, older_than: timedelta = timedelta(seconds=60)) -> dict[str, int]:
    """Apply callbacks stored but never applied (the database went away in between); for the worker."""
    return _replay_where(db, pending_or_failed(older_than, include_failed=False))


def failed_count(db: Database) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(inbox).where(inbox.c.status == "failed")).scalar_one()


def prune(db: Database, *, older_than: timedelta, batch_size: int = 1000, pause: float = 0.0) -> int:
    """Delete applied and ignored inbox rows received before `older_than` ago, in small batches.

    Failed and pending rows are never deleted (they still have work to do). Each batch is its own
    short transaction and skips rows another transaction holds (`SKIP LOCKED`), so live callbacks
    and replays never wait on the prune.
    """
    cutoff = datetime.now(UTC) - older_than
    deleted = 0
    while True:
        with db.engine.begin() as conn:
            batch = conn.execute(text("""
                DELETE FROM callback_inbox WHERE id IN (
                    SELECT id FROM callback_inbox
                     WHERE received_at < :cutoff AND status IN ('applied', 'ignored')
                     ORDER BY received_at
                     LIMIT :batch FOR UPDATE SKIP LOCKED)
            """), {"cutoff": cutoff, "batch": batch_size}).rowcount
        deleted += batch
        if batch < batch_size:
            return deleted
        if pause:
            time.sleep(pause)
