"""Reconciliation: heal what callbacks missed by reading Plivo's own record of each session.

Every run (the `worker` process runs one a minute; `flask sessions reconcile` runs one from cron):

1. Sessions whose expiry time has passed are projected, which expires them, even if SessionTimeout
   never came.
2. Creates whose outcome was unknown are resolved (`services.sessions.resolve_pending_attempts`).
3. Sessions that are active, expired recently (until one run has read them settled), or have a
   leg without an end are fetched from Plivo (GET session), oldest reconciliation first, with
   bounded concurrency under Plivo's rate limit (300 requests per 5 s; 429s are retried by the
   client honouring Retry-After). Network calls happen outside any transaction.
4. Each answer is stored as facts (`apply_plivo_session`): Plivo's interactions, which give call
   UUIDs, the legs and recordings no callback reported and their billing; its totals, kept beside
   ours so drift is visible in `reporting.session_summary`; whether Plivo says it expired, and its
   last interaction, as Plivo reported them (the projection decides what they make of it). Then
   the session is projected by the same projector as callbacks (`services.projector`), from all
   its facts together, so callbacks and reconciliation in any order give one result, with nothing
   counted twice.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from .. import metrics
from ..context import Context
from ..domain.values import parse_time, to_decimal, to_int
from ..persistence.models import MaskingSession, PlivoInteraction, ProjectionQueue
from ..plivo.client import PlivoError, PlivoNotFound, PlivoSession
from .sessions import get_session, resolve_pending_attempts, session_details

log = logging.getLogger(__name__)
sessions = MaskingSession.__table__
interactions = PlivoInteraction.__table__
queue = ProjectionQueue.__table__
# What a reconciliation may change about a session (its report's "changed").
WATCHED = ("call_count", "answered_call_count", "billed_duration", "amount", "recording_count", "status")

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
    errors: int = 0  # sessions Plivo could not be asked about (unreachable, failing) or whose answer failed to apply
    fetched: int = 0  # sessions asked of Plivo this run (checked, changed, not found or errors)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def queue_overdue(conn: Connection, now: datetime) -> list[str]:
    """Queue for projection the sessions not yet expired whose expiry time is before `now` (the
    projection at `now` expires them: `domain.projection.ends_reported`); returns their UUIDs."""
    overdue = select(sessions.c.session_uuid).where(sessions.c.status != "expired", sessions.c.expires_at < now)
    return list(conn.execute(insert(queue).from_select(["session_uuid"], overdue)
                             .returning(queue.c.session_uuid)).scalars())


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


def _interaction(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """One of Plivo's `interaction[]` entries as `plivo_interactions` stores it (None: no start time)."""
    started = parse_time(entry.get("start_time"))
    if started is None:
        return None
    return {
        "started_at": started,
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
        "recording_resource_url": entry.get("recording_resource_url") or None,
    }


def apply_plivo_session(ctx: Context, plivo: PlivoSession, now: datetime, *, keep_api_id: bool = False
                        ) -> tuple[bool, bool]:
    """Store Plivo's record of one session as facts, then project it. Returns (changed, drift).

    Plivo's interactions replace the ones read before (its latest record of a call wins); its
    totals are kept beside ours; its expiry time, whether it says the session expired, and its last
    interaction are stored as Plivo's report, for the projection to merge with the rest. The
    parties' PINs are kept where the session has none yet (generated ones the create could not
    fetch). With `keep_api_id` (a refresh someone asked for), the GET's `api_id` becomes the
    session's `plivo_api_id`, the one to quote to Plivo's support about what was read.
    """
    with ctx.db.engine.begin() as conn:
        row = conn.execute(select(sessions.c.id, *(sessions.c[k] for k in WATCHED))
                           .where(sessions.c.session_uuid == plivo.session_uuid)).first()
        if row is None:  # only sessions we know are reconciled; callbacks discover the others
            return False, False
        before = dict(row._mapping)
        for entry in plivo.interactions:
            values = _interaction(entry)
            if values is None:
                continue
            stmt = pg_insert(interactions).values(session_id=row.id, **values)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[interactions.c.session_id, interactions.c.started_at],
                set_={name: stmt.excluded[name] for name in values} | {"fetched_at": func.now()}))
        conn.execute(update(sessions).where(sessions.c.id == row.id).values(
            expires_at=func.coalesce(plivo.expiry_time, sessions.c.expires_at),
            # A session discovered by callback learns its original number and when Plivo created it.
            original_virtual_number=func.coalesce(sessions.c.original_virtual_number, plivo.virtual_number),
            plivo_created_at=func.coalesce(sessions.c.plivo_created_at, plivo.created_time),
            plivo_last_interaction_at=plivo.last_interaction_time,
            plivo_call_count=plivo.total_call_count, plivo_billed_duration=plivo.total_call_billed_duration,
            plivo_amount=plivo.total_call_amount, reconciled_at=now, updated_at=func.now(),
            subaccount=func.coalesce(sessions.c.subaccount, plivo.subaccount),
            first_party_pin=func.coalesce(sessions.c.first_party_pin, plivo.pins[0]),
            second_party_pin=func.coalesce(sessions.c.second_party_pin, plivo.pins[1]),
            **({"plivo_api_id": plivo.api_id} if keep_api_id and plivo.api_id else {}),
            **({"plivo_expired_at": expired} if (expired := plivo.expired_by(now)) else {}),
        ))
        conn.execute(insert(queue).values(session_uuid=plivo.session_uuid))
    projected = ctx.projector.project([plivo.session_uuid], wait=True, now=now).projected
    if projected:
        after = {"id": row.id} | {k: projected[0].after[k] for k in WATCHED}
    else:  # its projection failed (and stays due): what is stored
        with ctx.db.engine.connect() as conn:
            after = dict(conn.execute(select(sessions.c.id, *(sessions.c[k] for k in WATCHED))
                                      .where(sessions.c.id == row.id)).one()._mapping)
    drift = (after["call_count"], after["billed_duration"], after["amount"]) != (
        plivo.total_call_count, plivo.total_call_billed_duration, plivo.total_call_amount)
    return after != before, drift


def refresh_session(ctx: Context, session_uuid: str) -> dict[str, Any]:
    """Fetch one stored session from Plivo now and reconcile it as the worker does (`apply_plivo_session`,
    then the same projector): for support staff who cannot wait for the next run. Answers the session's
    details, with whether the refresh changed its counters or status and whether ours and Plivo's
    totals still differ. A session this service does not know is a 404 without calling Plivo; Plivo's
    errors are raised (its 404: the session is older than Plivo's 90 days, or not Plivo's)."""
    get_session(ctx, session_uuid)
    plivo = ctx.plivo.get_session(session_uuid)
    changed, drift = apply_plivo_session(ctx, plivo, datetime.now(UTC), keep_api_id=True)
    return session_details(ctx, session_uuid) | {"refresh": {"changed": changed, "drift": drift}}


def reconcile(ctx: Context, *, now: datetime | None = None, limit: int = 3000, concurrency: int = 8,
              recent: timedelta = timedelta(hours=24), limiter: RateLimiter | None = None,
              progress: Callable[[int, int], None] | None = None) -> ReconcileReport:
    """One reconciliation run (see the module docstring); `progress` is told (sessions done, sessions due)."""
    now = now or datetime.now(UTC)
    limiter = limiter or RateLimiter()
    report = ReconcileReport()
    with ctx.db.engine.begin() as conn:
        overdue = queue_overdue(conn, now)
    report.marked_expired = sum(p.after["status"] == "expired"
                                for p in ctx.projector.project(overdue, wait=True, now=now).projected)
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
                changed, drift = apply_plivo_session(ctx, plivo, now)
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
            report.fetched += 1
            if progress is not None:
                progress(report.fetched, len(due))

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(one, due))
    metrics.RECONCILE_DRIFT.set(report.drift)
    log.info("reconciliation done", extra=report.as_dict())
    return report


def reconcile_every(ctx: Context, every: float, stop: threading.Event, *,
                    report: Callable[[ReconcileReport], None] | None = None, **options: Any) -> None:
    """Reconcile every `every` seconds until `stop` is set; a failed run is logged and the next retries."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = reconcile(ctx, **options)
            if report is not None:
                report(result)
        except Exception:  # noqa: BLE001 - a worker keeps going; the next run retries
            log.exception("reconciliation run failed")
        stop.wait(max(every - (time.monotonic() - started), 1.0))
