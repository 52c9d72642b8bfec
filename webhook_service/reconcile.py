"""Reconciliation: heal what callbacks missed by reading Plivo's own record of each session.

Every run (the `worker` process runs one a minute; `flask sessions reconcile` runs one from cron):

1. Sessions whose expiry time has passed are marked expired, even if SessionTimeout never came.
2. Creates whose outcome was unknown are resolved (`sessions.service.resolve_pending_attempts`).
3. Sessions that are active, expired recently (until one run has read them settled), or have a
   leg without an end are fetched from Plivo (GET session), oldest reconciliation first, with
   bounded concurrency under Plivo's rate limit (300 requests per 5 s; 429s are retried by the
   client honouring Retry-After). Network calls happen outside any transaction.
4. Each answer is applied under the session's row lock: Plivo's interactions are stored, legs are
   re-derived from callbacks and interactions together (`webhooks.legs`), recordings that no
   callback reported are added, status and expiry move forward only, and Plivo's totals are kept
   beside ours so drift is visible in `reporting.session_summary`.

Callbacks and reconciliation take the same lock and derive legs from the same facts, so running
both at once for one session gives the same result as either order, with nothing counted twice.
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

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from . import metrics
from .models import MaskingSession, PlivoInteraction
from .plivo.client import PlivoError, PlivoNotFound, PlivoSession, parse_time, to_decimal, to_int
from .reporting.daily_totals import daily_totals_tracked
from .sessions.service import Context, resolve_pending_attempts
from .webhooks.events import refresh_counters, upsert_recording
from .webhooks.legs import sync_session_legs

log = logging.getLogger(__name__)
sessions = MaskingSession.__table__
interactions = PlivoInteraction.__table__

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


def apply_plivo_session(conn: Connection, plivo: PlivoSession, now: datetime) -> bool:
    """Fold Plivo's view of one session into ours (inside a transaction). True if anything changed."""
    row = conn.execute(
        select(sessions.c.id, sessions.c.call_count, sessions.c.billed_duration, sessions.c.amount,
               sessions.c.recording_count, sessions.c.status)
        .where(sessions.c.session_uuid == plivo.session_uuid).with_for_update()
    ).mappings().first()
    if row is None:
        return False  # only sessions we know are reconciled; callbacks discover the others
    session_id = row["id"]
    with daily_totals_tracked(conn, session_id):
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
            stmt = insert(interactions).values(session_id=session_id, started_at=started, **values)
            # Plivo's latest answer replaces the previous one (an in-progress call gains its end).
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["session_id", "started_at"],
                set_={k: stmt.excluded[k] for k in values} | {"fetched_at": func.now()},
            ))
            if values["recording_uuid"] and values["ended_at"]:
                # A recording whose callback never came: Plivo lists it once the call is over.
                upsert_recording(conn, session_id, values["recording_uuid"], "completed", {
                    "resource_url": entry.get("recording_resource_url"),
                    "started_at": started, "ended_at": values["ended_at"],
                })
        sync_session_legs(conn, session_id)
    expired = plivo.status == "expired" or (plivo.expiry_time is not None and plivo.expiry_time < now)
    conn.execute(sessions.update().where(sessions.c.id == session_id).values(
        status="expired" if expired or row["status"] == "expired" else sessions.c.status,
        expired_at=func.coalesce(sessions.c.expired_at, plivo.expiry_time if expired else None),
        expires_at=func.coalesce(plivo.expiry_time, sessions.c.expires_at),
        virtual_number=func.coalesce(sessions.c.virtual_number, plivo.virtual_number),
        plivo_call_count=plivo.total_call_count,
        plivo_billed_duration=plivo.total_call_billed_duration,
        plivo_amount=plivo.total_call_amount,
        reconciled_at=now,
    ))
    refresh_counters(conn, session_id, None, plivo.last_interaction_time)
    after = conn.execute(
        select(sessions.c.call_count, sessions.c.billed_duration, sessions.c.amount, sessions.c.recording_count,
               sessions.c.status).where(sessions.c.id == session_id)
    ).mappings().one()
    return dict(after) != {k: row[k] for k in after}


def has_drift(conn: Connection, session_uuid: str) -> bool:
    return bool(conn.execute(text("""
        SELECT call_count IS DISTINCT FROM plivo_call_count
            OR billed_duration IS DISTINCT FROM plivo_billed_duration
            OR amount IS DISTINCT FROM plivo_amount
          FROM masking_sessions WHERE session_uuid = :u AND reconciled_at IS NOT NULL
    """), {"u": session_uuid}).scalar())


def reconcile(ctx: Context, *, now: datetime | None = None, limit: int = 3000, concurrency: int = 8,
              recent: timedelta = timedelta(hours=24), limiter: RateLimiter | None = None) -> ReconcileReport:
    """One reconciliation run (see the module docstring)."""
    now = now or datetime.now(UTC)
    limiter = limiter or RateLimiter()
    report = ReconcileReport()
    with ctx.db.engine.begin() as conn:
        report.marked_expired = mark_overdue_expired(conn, now)
    report.attempts = resolve_pending_attempts(ctx)
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
                with ctx.db.engine.begin() as conn:
                    changed = apply_plivo_session(conn, plivo, now)
                    drift = has_drift(conn, session_uuid)
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
