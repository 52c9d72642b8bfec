"""Reconciliation: heal what callbacks missed by reading Plivo's own record of each session.

Every run (the `worker` process runs one a minute; `flask sessions reconcile` runs one from cron):

1. Sessions whose expiry time has passed are marked expired, even if SessionTimeout never came.
2. Creates whose outcome was unknown are resolved (`sessions.service.resolve_pending_attempts`),
   and callbacks stored but never applied (the database went away in between) are applied.
3. Sessions that are active, expired recently (until one run has read them settled), or have a
   leg without an end are fetched from Plivo (GET session), oldest reconciliation first, with
   bounded concurrency under Plivo's rate limit (300 requests per 5 s; 429s are retried by the
   client honouring Retry-After). Network calls happen outside any transaction.
4. Each answer is applied under the session's row lock (`webhooks.state`): Plivo's interactions
   are stored, legs are re-derived from callbacks and interactions together (`webhooks.legs`),
   recordings that no
   callback reported are added, status and expiry move forward only, and Plivo's totals are kept
   beside ours so drift is visible in `reporting.session_summary`.

Callbacks and reconciliation take the same lock and derive legs from the same facts, so running
both at once for one session gives the same result as either order, with nothing counted twice
(a leg callback read after the lock sees the interactions, and then takes the Python path:
tests/test_reconcile.py holds one waiting behind a reconciliation).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, text
from sqlalchemy.engine import Connection

from .. import metrics
from ..context import Context
from ..domain.values import parse_time, to_decimal, to_int
from ..persistence.db import Database
from ..persistence.models import MaskingSession
from ..plivo.client import PlivoError, PlivoNotFound, PlivoSession
from .inbox import replay_stale_pending
from .sessions import resolve_pending_attempts
from .state import COUNTERS, loaded, plan, queue_load

log = logging.getLogger(__name__)
sessions = MaskingSession.__table__

_CALL_UUID = re.compile(r"/Call/([^/?#]+)/?$")
_RECORDING_UUID = re.compile(r"/Recording/([^/?#.]+)(?:\.\w+)?/?$")


class RateLimiter:
    """At most `limit` acquisitions in any `period` seconds, shared by threads (a sliding window)."""

    def __init__(self, limit: int = 300, period: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.limit, self.period = limit, period
        self._clock, self._sleep = clock, sleep
        self._times: list[float] = []
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                self._times = [t for t in self._times if now - t < self.period]
                if len(self._times) < self.limit:
                    self._times.append(now)
                    return
                wait = self.period - (now - self._times[0])
            self._sleep(max(wait, 0.001))


@dataclass
class ReconcileReport:
    marked_expired: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    replayed: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    changed: int = 0
    drift: int = 0
    not_found: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def mark_overdue_expired(conn: Connection, now: datetime) -> int:
    """Sessions past their expiry are expired, whether or not SessionTimeout arrived."""
    return conn.execute(
        sessions.update()
        .where(sessions.c.status != "expired", sessions.c.expires_at < now)
        .values(status="expired", expired_at=func.coalesce(sessions.c.expired_at, sessions.c.expires_at),
                updated_at=func.now())
    ).rowcount


def sessions_due(conn: Connection, now: datetime, *, recent: timedelta, limit: int) -> list[str]:
    """Who to fetch: active, recently expired and not yet read settled, or with a leg still open."""
    rows = conn.execute(text("""
        SELECT s.session_uuid FROM masking_sessions s
         WHERE s.status <> 'expired'
            OR (s.expired_at > :recent
                AND (s.reconciled_at IS NULL OR s.reconciled_at < s.expired_at + interval '10 minutes'))
            OR EXISTS (SELECT 1 FROM call_legs l WHERE l.session_id = s.id AND l.ended_at IS NULL)
         ORDER BY s.reconciled_at NULLS FIRST, s.id
         LIMIT :limit
    """), {"recent": now - recent, "limit": limit})
    return [r[0] for r in rows]


def _uuid(pattern: re.Pattern[str], url: Any) -> str | None:
    match = pattern.search(url) if isinstance(url, str) else None
    return match.group(1) if match else None


def apply_plivo_session(db: Database, plivo: PlivoSession, now: datetime) -> tuple[bool, bool]:
    """Fold Plivo's view of one session into ours, under its row lock. Returns (changed, drift)."""
    with db.pg() as pg:
        with pg.pipeline():
            pg.execute("BEGIN")
            cursors = queue_load(pg, plivo.session_uuid)
        state = loaded(cursors)
        if state is None:  # only sessions we know are reconciled; callbacks discover the others
            pg.rollback()
            return False, False
        before = {k: state.session[k] for k in COUNTERS}
        for entry in plivo.interactions:
            started = parse_time(entry.get("start_time"))
            if started is None:
                continue
            values = {
                "ended_at": parse_time(entry.get("end_time")),
                "first_call_uuid": _uuid(_CALL_UUID, entry.get("first_party_resource_url")),
                "second_call_uuid": _uuid(_CALL_UUID, entry.get("second_party_resource_url")),
                "first_status": entry.get("first_party_status") or None,
                "second_status": entry.get("second_party_status") or None,
                "call_count": to_int(entry.get("total_call_count")),
                "duration": to_int(entry.get("duration")),
                "billed_duration": to_int(entry.get("call_billed_duration")),
                "amount": to_decimal(entry.get("total_call_amount")),
                "recording_uuid": _uuid(_RECORDING_UUID, entry.get("recording_resource_url")),
            }
            state.set_interaction(started, values)
            if values["recording_uuid"] and values["ended_at"]:
                # A recording whose callback never came: Plivo lists it once the call is over.
                state.add_recording(values["recording_uuid"], "completed", {
                    "resource_url": entry.get("recording_resource_url"),
                    "started_at": started, "ended_at": values["ended_at"],
                })
        expired = plivo.status == "expired" or (plivo.expiry_time is not None and plivo.expiry_time < now)
        session = state.session
        state.session_updates |= {
            "expires_at": plivo.expiry_time or session["expires_at"],
            "virtual_number": session["virtual_number"] or plivo.virtual_number,
            # A session discovered by callback learns when Plivo created it.
            "plivo_created_at": session["plivo_created_at"] or plivo.created_time,
            "plivo_call_count": plivo.total_call_count,
            "plivo_billed_duration": plivo.total_call_billed_duration,
            "plivo_amount": plivo.total_call_amount,
            "reconciled_at": now,
        }
        if expired and session["status"] != "expired":  # status only moves forward
            state.session_updates |= {"status": "expired", "expired_at": session["expired_at"] or plivo.expiry_time}
        writes = plan(state, interaction_at=plivo.last_interaction_time)
        with pg.pipeline():
            for sql, params in writes:
                pg.execute(sql, params)
            pg.execute("COMMIT")
    after = {k: state.session_updates.get(k, before[k]) for k in COUNTERS}
    drift = (after["call_count"], after["billed_duration"], after["amount"]) != (
        plivo.total_call_count, plivo.total_call_billed_duration, plivo.total_call_amount)
    return after != before or "status" in state.session_updates, drift


def reconcile(ctx: Context, *, now: datetime | None = None, limit: int = 3000, concurrency: int = 8,
              recent: timedelta = timedelta(hours=24), limiter: RateLimiter | None = None) -> ReconcileReport:
    """One reconciliation run (see the module docstring)."""
    now = now or datetime.now(UTC)
    limiter = limiter or RateLimiter()
    report = ReconcileReport()
    with ctx.db.engine.begin() as conn:
        report.marked_expired = mark_overdue_expired(conn, now)
    report.attempts = resolve_pending_attempts(ctx)
    report.replayed = replay_stale_pending(ctx.db)
    with ctx.db.engine.connect() as conn:
        due = sessions_due(conn, now, recent=recent, limit=limit)
    lock = threading.Lock()

    def one(session_uuid: str) -> None:
        limiter.acquire()
        try:
            plivo = ctx.plivo.get_session(session_uuid)
        except PlivoNotFound:
            outcome = "not_found"  # older than Plivo's 90-day window, or never Plivo's
        except PlivoError as exc:
            log.warning("reconcile: Plivo error for %s: %s", session_uuid, exc.message)
            outcome = "errors"
        else:
            try:
                changed, drift = apply_plivo_session(ctx.db, plivo, now)
            except Exception:
                log.exception("reconcile: could not apply Plivo's record of %s", session_uuid)
                changed, drift, outcome = False, False, "errors"
            else:
                outcome = "changed" if changed else "checked"
            if drift:
                with lock:
                    report.drift += 1
        with lock:
            report.checked += outcome in ("checked", "changed")
            report.changed += outcome == "changed"
            report.not_found += outcome == "not_found"
            report.errors += outcome == "errors"

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(one, due))
    metrics.RECONCILE_DRIFT.set(report.drift)
    log.info("reconciliation done", extra=report.as_dict())
    return report
