"""The callback inbox: store each verified callback once, then apply it; replay what failed."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert

from .. import metrics
from ..db import Database, is_database_unavailable
from ..models import CallbackInbox
from .events import apply_callback

log = logging.getLogger(__name__)
inbox = CallbackInbox.__table__


def dedupe_key(endpoint: str, params: Mapping[str, Any]) -> str:
    """Same endpoint and same signed parameters → same key, whatever the nonce or the encoding."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(f"{endpoint}\n{canonical}".encode()).hexdigest()


def _text(params: Mapping[str, Any], name: str) -> str | None:
    value = params.get(name)
    return value[:200] if isinstance(value, str) else None


def receive(db: Database, endpoint: str, method: str, content_type: str | None, params: Mapping[str, Any],
            nonce: str | None) -> str:
    """Store the callback (committed on its own), then apply it. Returns the outcome.

    Outcomes: "duplicate" (already stored: nothing happens), "applied", "ignored" (unknown event),
    "failed" (stored with the error, for `flask callbacks replay`), "stored" (the database went
    away after the row was committed: it is safe, and replay will apply it).
    """
    now = datetime.now(UTC)
    with db.engine.connect() as conn:
        inbox_id = conn.execute(
            insert(inbox).values(
                endpoint=endpoint, method=method, content_type=content_type, params=dict(params), nonce=nonce,
                dedupe_key=dedupe_key(endpoint, params), event_name=_text(params, "EventName"),
                session_uuid=_text(params, "SessionUUID"),
            ).on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(inbox.c.id)
        ).scalar()
        conn.commit()
    if inbox_id is None:
        metrics.CALLBACKS.labels(endpoint, "duplicate").inc()
        return "duplicate"
    outcome = apply_stored(db, inbox_id, endpoint, params, now)
    metrics.CALLBACKS.labels(endpoint, outcome).inc()
    return outcome


def apply_stored(db: Database, inbox_id: int, endpoint: str, params: Mapping[str, Any],
                 received_at: datetime) -> str:
    """Apply a stored callback in one transaction; on failure keep the error on its inbox row."""
    try:
        with db.engine.begin() as conn:
            outcome = apply_callback(conn, endpoint, params, received_at)
            conn.execute(update(inbox).where(inbox.c.id == inbox_id).values(
                status=outcome, error=None, attempts=inbox.c.attempts + 1, applied_at=func.now()))
        return outcome
    except Exception as exc:
        if is_database_unavailable(exc):
            log.warning("callback %s stored but not applied: database unavailable", inbox_id)
            return "stored"
        log.exception("callback %s could not be applied", inbox_id)
        try:
            with db.engine.begin() as conn:
                conn.execute(update(inbox).where(inbox.c.id == inbox_id).values(
                    status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], attempts=inbox.c.attempts + 1))
        except Exception:  # noqa: BLE001 - the row stays pending; replay picks it up
            log.warning("callback %s: could not record the failure either", inbox_id)
        return "failed"


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
        stale = datetime.now(UTC) - pending_older_than
        conditions.append(or_(inbox.c.status == "failed",
                              (inbox.c.status == "pending") & (inbox.c.received_at < stale)))
    counts: dict[str, int] = {}
    last_id = 0
    while True:  # in batches, so a large replay never holds a big result in memory
        with db.engine.connect() as conn:
            batch = conn.execute(
                select(inbox.c.id, inbox.c.endpoint, inbox.c.params, inbox.c.received_at)
                .where(and_(*conditions), inbox.c.id > last_id)
                .order_by(inbox.c.id).limit(500)
            ).all()
        if not batch:
            return counts
        for row in batch:
            outcome = apply_stored(db, row.id, row.endpoint, row.params, row.received_at)
            counts[outcome] = counts.get(outcome, 0) + 1
            last_id = row.id


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
