"""The callback inbox: store each verified callback once and apply it; replay what did not apply.

Each callback is stored and applied in one transaction, so it is stored if and only if its
effects are (one WAL flush per callback), and the 200 is sent after the commit:

* a callback about a leg (most of them) is one statement and one round trip:
  `SELECT apply_leg_callback(...)` (migration 0005) stores it in the inbox (a redelivery hits the
  unique dedupe key and stops there), locks the session, records the fact and re-derives the
  session's legs, counters and daily totals;
* any other callback, or one for a session with Plivo interaction records, goes through
  `state.py` in two round trips (psycopg pipelines): BEGIN; INSERT into the inbox, already marked
  `applied`; lock the session and read its facts | write what the event changes; COMMIT.

If applying raises, the transaction rolls back and the callback is stored again on its own,
marked `failed` with the error, for `replay` after a fix; if the database goes away first,
nothing is stored and the answer is a 503.
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
from ..domain.callbacks import NOT_INTERACTIONS, Event, Handler, LegFact, apply_event, handler_for
from ..persistence.db import Database, is_database_unavailable
from ..persistence.models import CallbackInbox
from .state import DISCOVER_SESSION, SessionState, loaded, plan, queue_load

log = logging.getLogger(__name__)
inbox = CallbackInbox.__table__

# A redelivery of a callback already applied (or ignored) returns no row: it is a duplicate. A
# redelivery of one stored but not applied (applying it failed, or it was stored `pending` by a
# replay cut short) returns the stored row (`inserted` false), to apply it now. A row pending for
# under 5 s is left alone: it is most likely being applied right now.
INSERT_INBOX = """
    INSERT INTO callback_inbox AS inbox (endpoint, method, content_type, params, nonce, dedupe_key,
                                         event_name, session_uuid, status, attempts, applied_at)
    VALUES (%(endpoint)s, %(method)s, %(content_type)s, %(params)s, %(nonce)s, %(dedupe_key)s, %(event_name)s,
            %(session_uuid)s, %(status)s, 1, now())
    ON CONFLICT (dedupe_key) DO UPDATE SET attempts = inbox.attempts
     WHERE inbox.status = 'failed' OR (inbox.status = 'pending' AND inbox.received_at < now() - interval '5 seconds')
    RETURNING id, xmax = 0 AS inserted
"""
# After a failed apply (rolled back with everything else): store the callback with its error.
STORE_FAILED = """
    INSERT INTO callback_inbox AS inbox (endpoint, method, content_type, params, nonce, dedupe_key,
                                         event_name, session_uuid, status, attempts, error)
    VALUES (%(endpoint)s, %(method)s, %(content_type)s, %(params)s, %(nonce)s, %(dedupe_key)s, %(event_name)s,
            %(session_uuid)s, 'failed', 1, %(error)s)
    ON CONFLICT (dedupe_key) DO UPDATE SET status = 'failed', error = excluded.error, attempts = inbox.attempts + 1
     WHERE inbox.status <> 'applied'  -- a concurrent redelivery may have applied it meanwhile
    RETURNING id
"""
MARK_APPLIED = """
    UPDATE callback_inbox SET status = 'applied', error = NULL, attempts = attempts + 1, applied_at = now()
     WHERE id = %(id)s
"""
# One round trip for a leg callback; 'deferred' (nothing changed) sends it through `state.py`.
APPLY_LEG_CALLBACK = """
    SELECT apply_leg_callback(
        p_endpoint => %(endpoint)s, p_method => %(method)s, p_content_type => %(content_type)s,
        p_params => %(params)s, p_nonce => %(nonce)s, p_dedupe_key => %(dedupe_key)s,
        p_event_name => %(event_name)s, p_inbox_session_uuid => %(session_uuid)s,
        p_session_uuid => %(uuid)s, p_at => %(at)s, p_party => %(party)s, p_kind => %(kind)s,
        p_caller => %(caller)s, p_first_party => %(first_party)s, p_second_party => %(second_party)s,
        p_virtual_number => %(virtual_number)s, p_call_uuid => %(call_uuid)s, p_end_event => %(end_event)s,
        p_duration => %(duration)s, p_billed_duration => %(billed_duration)s, p_amount => %(amount)s,
        p_hangup_cause => %(hangup_cause)s, p_hangup_cause_code => %(hangup_cause_code)s,
        p_from_number => %(from_number)s, p_to_number => %(to_number)s)
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


def _apply(pg: psycopg.Connection, state: SessionState | None, endpoint: str, event: Event,
           mark_applied: int | None) -> None:
    """Apply `event` to the loaded, locked `state` and COMMIT (marking inbox row `mark_applied`)."""
    if state is None:
        raise LookupError(f"session {event.session_uuid} could not be loaded")
    apply_event(state, endpoint, event)
    writes = plan(state, interaction_at=event.at if endpoint == "session" and event.name not in NOT_INTERACTIONS
                  else None)
    with pg.pipeline():
        for sql, params in writes:
            pg.execute(sql, params)
        if mark_applied is not None:
            pg.execute(MARK_APPLIED, {"id": mark_applied})
        pg.execute("COMMIT")


def _load(pg: psycopg.Connection, event: Event) -> SessionState | None:
    """Lock and read the session, creating its row first if only this callback knows it."""
    with pg.pipeline():
        pg.execute(DISCOVER_SESSION, {"uuid": event.session_uuid} | event.discovered())
        cursors = queue_load(pg, event.session_uuid)
    return loaded(cursors)


def receive(db: Database, endpoint: str, method: str, content_type: str | None, params: Mapping[str, Any],
            nonce: str | None) -> str:
    """Store the callback and apply it, in one transaction. Returns the outcome.

    Outcomes: "duplicate" (already stored: nothing happens), "applied", "ignored" (an event we
    do not act on, or no session named: stored only), "failed" (stored with the error, for
    replay). If the database is unavailable the error propagates (503) and nothing is stored.
    """
    event = Event.parse(params, datetime.now(UTC))
    handler = handler_for(endpoint, event)
    row = inbox_row(endpoint, method, content_type, params, nonce, handled=handler is not None)
    with db.pg() as pg:
        if handler is None:  # stored for the record, nothing to apply: one autocommitted statement
            outcome = "ignored" if pg.execute(INSERT_INBOX, row).fetchone() else "duplicate"
            metrics.CALLBACKS.labels(endpoint, outcome).inc()
            return outcome
        assert event is not None
        try:
            outcome = _receive(pg, row, endpoint, event, handler)
        except Exception as exc:
            if is_database_unavailable(exc) or pg.broken or pg.closed:
                raise  # nothing was stored: the view answers 503
            log.exception("callback could not be applied", extra={"endpoint": endpoint})
            pg.rollback()
            pg.execute(STORE_FAILED, row | {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            outcome = "failed"
    metrics.CALLBACKS.labels(endpoint, outcome).inc()
    return outcome


def inbox_row(endpoint: str, method: str, content_type: str | None, params: Mapping[str, Any],
              nonce: str | None, *, handled: bool) -> dict[str, Any]:
    """The callback's inbox columns (the parameters of INSERT_INBOX and STORE_FAILED)."""
    return {
        "endpoint": endpoint, "method": method, "content_type": content_type, "params": Jsonb(dict(params)),
        "nonce": nonce, "dedupe_key": dedupe_key(endpoint, params), "event_name": _text(params, "EventName"),
        "session_uuid": _text(params, "SessionUUID"), "status": "applied" if handled else "ignored",
    }


def leg_callback_arguments(row: Mapping[str, Any], handler: LegFact, event: Event) -> dict[str, Any]:
    """The parameters of APPLY_LEG_CALLBACK: the inbox row, the event's leg fact and its numbers."""
    facts = handler.facts(event)
    return {**row, **facts, **event.discovered(), "uuid": event.session_uuid, "at": event.at,
            "party": handler.party, "kind": handler.kind, "caller": facts["from_number"]}


def _receive(pg: psycopg.Connection, row: dict[str, Any], endpoint: str, event: Event, handler: Handler) -> str:
    """Store and apply one callback that has a handler: "applied" or "duplicate"; raises on failure."""
    if isinstance(handler, LegFact):
        arguments = leg_callback_arguments(row, handler, event)
        [outcome] = pg.execute(APPLY_LEG_CALLBACK, arguments).fetchone()  # type: ignore[misc]
        if outcome != "deferred":
            return outcome
    with pg.pipeline():
        pg.execute("BEGIN")
        stored = pg.execute(INSERT_INBOX, row)
        cursors = queue_load(pg, event.session_uuid)
    inserted = stored.fetchone()
    if inserted is None:
        pg.rollback()
        return "duplicate"
    state = loaded(cursors)
    if state is None:  # a session this service never heard of
        state = _load(pg, event)
    _apply(pg, state, endpoint, event, mark_applied=None if inserted[1] else inserted[0])
    return "applied"


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
            pg.execute("BEGIN")
            try:
                _apply(pg, _load(pg, event), endpoint, event, mark_applied=inbox_id)
                return "applied"
            except Exception as exc:
                if is_database_unavailable(exc) or pg.broken or pg.closed:
                    raise
                log.exception("callback %s could not be applied", inbox_id)
                pg.rollback()
                pg.execute(MARK_FAILED, {"id": inbox_id, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                return "failed"
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
