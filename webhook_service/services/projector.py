"""The projector: derives due sessions from their facts, in batches, wherever it runs.

A session is due while `projection_queue` holds a row for it (each callback's statement adds one;
so do reconciliation and replays). Projecting a batch of due sessions is one transaction
(`persistence.projections`): lock them, read their queue rows and facts, derive each with
`domain.projection.project`, write what changed, delete the queue rows read, commit. It is
idempotent (a re-projection of unchanged facts writes nothing), so a projector killed mid-way
loses nothing: its transaction rolls back, its locks go, and the sessions are claimed again.

It runs

* continuously (`ProjectorLoop`), in the `worker` process and in a thread of each web process,
  one of them at a time (a leader lock): the oldest due sessions first, in batches, polling the
  queue when it is empty; so a deployment that runs only `web` stays current;
* on demand: `GET /v1/sessions/<uuid>` projects a due session before answering (read-your-writes),
  and reconciliation and `flask callbacks replay` project what they changed.

Projectors coordinate through the sessions' row locks: the continuous projector skips a session
another one holds (`SKIP LOCKED`) and comes back to it; an on-demand projection waits.

A busy session (thousands of facts, projected every few tenths of a second while its calls go on)
is kept by the projector that projects it: its facts and last projection, with the
`projection_version` that projection wrote. While the session's row still has that version, no
other projector has touched it, so the next projection reads only the facts queued since and
derives again only the legs they can change (`domain.projection.Since`); a different version (or
none kept) means reading it whole, as always. The result is the same either way.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import metrics
from ..domain.callbacks import CallbackFact
from ..domain.projection import FactLog, Projection, Since, project
from ..persistence.db import Database, is_database_unavailable
from ..persistence.projections import (
    IS_DUE,
    OLDEST_AGE,
    OLDEST_DUE,
    Changes,
    load,
    load_facts,
    load_legs,
    save,
)

log = logging.getLogger(__name__)

BATCH = 100  # sessions per transaction
RETRY_FAILED_AFTER = 60.0  # seconds before a session whose projection raised is tried again
KEEP_FROM = 200  # facts: a session with fewer is read whole each time (cheap), not kept
KEEP_AT_MOST = 50_000  # facts kept in all (about 70 MB with their projections; least recently projected let go)


@dataclass
class Kept:
    """A session as the projector last projected it: what the next projection starts from."""

    version: int  # the session's projection_version after that projection
    facts: dict[int, CallbackFact]  # by inbox id
    log: FactLog
    projection: Projection
    interactions: tuple[Any, ...]


@dataclass(frozen=True)
class Projected:
    """One session's projection: its columns as projected (SESSION_FIELDS)."""

    session_uuid: str
    after: dict[str, Any]
    # By party, how many legs were kept from the last projection rather than derived again (None:
    # all were derived; the projector kept no current copy, or the new facts reach back too far).
    legs_kept: dict[str, int] | None = None


@dataclass
class Outcome:
    """What a call to `Projector.project` did."""

    projected: list[Projected] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)  # held by another projector (only when not waiting)
    failed: set[str] = field(default_factory=set)  # raised while deriving or saving: still due

    def merge(self, other: Outcome) -> Outcome:
        self.projected += other.projected
        self.busy |= other.busy
        self.failed |= other.failed
        return self


class Projector:
    """Projects due sessions on the database (one per process; thread-safe)."""

    def __init__(self, db: Database, *, batch: int = BATCH, keep_from: int = KEEP_FROM):
        self.db = db
        self.batch = batch
        self.keep_from = keep_from
        self._failed_until: dict[str, float] = {}  # a session whose projection raised: not before then
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, Kept] = OrderedDict()  # least recently projected first
        self._kept_facts = 0

    def project(self, uuids: Iterable[str], *, wait: bool = False, now: datetime | None = None) -> Outcome:
        """Project those of `uuids` that are due, in batches, as at `now` (default: the time each
        batch is projected; a session whose expiry time it has passed is expired).

        `wait`: wait for sessions another projector holds (on-demand reads); otherwise skip them and
        report them as `busy`.
        """
        outcome = Outcome()
        moment = time.monotonic()
        with self._lock:
            held_back = {u for u, until in self._failed_until.items() if until > moment}
        todo = sorted(set(uuids) - held_back) if not wait else sorted(set(uuids))
        for start in range(0, len(todo), self.batch):
            outcome.merge(self._project_batch(todo[start:start + self.batch], wait, now))
        return outcome

    def project_due(self, limit: int | None = None) -> Outcome:
        """Project the sessions of the oldest queue rows (skipping those another projector holds)."""
        with self.db.pg() as pg:
            candidates = [row[0] for row in pg.execute(OLDEST_DUE, {"limit": 4 * (limit or self.batch)})]
        return self.project(list(dict.fromkeys(candidates))[: limit or self.batch])

    def project_all_due(self, *, rounds: int = 1000) -> int:
        """Project every due session now, waiting for any another projector holds; returns how many.

        For operators (`flask sessions project`) and tests: afterwards nothing committed before the
        call is left unprojected.
        """
        done, failed = 0, set()
        for _ in range(rounds):
            with self.db.pg() as pg:
                due = list(dict.fromkeys(row[0] for row in pg.execute(OLDEST_DUE, {"limit": 10 * self.batch})))
            if not due:
                return done
            if set(due) <= failed:
                raise RuntimeError(f"could not project sessions {sorted(failed)} (see the log)")
            outcome = self.project(set(due) - failed, wait=True)
            done += len(outcome.projected)
            failed |= outcome.failed
        raise RuntimeError(f"sessions still due after {rounds} rounds of projection")

    def is_due(self, session_uuid: str) -> bool:
        with self.db.pg() as pg:
            return bool(pg.execute(IS_DUE, {"session_uuid": session_uuid}).fetchone()[0])  # type: ignore[index]

    def oldest_due_seconds(self) -> float:
        """The age of the oldest fact not yet projected; 0 when nothing is due."""
        with self.db.pg() as pg:
            row = pg.execute(OLDEST_AGE).fetchone()
        return max(float(row[0]), 0.0) if row else 0.0

    def _project_batch(self, uuids: Sequence[str], wait: bool, now: datetime | None) -> Outcome:
        try:
            with _no_cyclic_gc():
                return self._transaction(uuids, wait, now or datetime.now(UTC))
        except Exception as exc:
            if is_database_unavailable(exc) or len(uuids) == 1:
                if not is_database_unavailable(exc):
                    self._hold_back(uuids, exc)
                    return Outcome(failed=set(uuids))
                raise
            # One bad session must not hold up the others: project them one by one.
            log.warning("projection of a batch of %d failed; projecting its sessions one by one", len(uuids))
            outcome = Outcome()
            for uuid in uuids:
                outcome.merge(self._project_batch([uuid], wait, now))
            return outcome

    def _hold_back(self, uuids: Sequence[str], exc: Exception) -> None:
        log.error("could not project session %s: %s: %s", ", ".join(uuids), type(exc).__name__, exc,
                  exc_info=exc)
        metrics.PROJECTIONS.labels("failed").inc(len(uuids))
        with self._lock:
            until = time.monotonic() + RETRY_FAILED_AFTER
            self._failed_until.update(dict.fromkeys(uuids, until))

    def _transaction(self, uuids: Sequence[str], wait: bool, now: datetime) -> Outcome:
        outcome = Outcome()
        with self._lock:
            warm = [uuid for uuid in uuids if uuid in self._kept]
        with self.db.pg() as pg:
            loaded = load(pg, uuids, skip_locked=not wait, warm=warm)
            outcome.busy = set(uuids) - {row["session_uuid"] for row in loaded.sessions}
            due = [row for row in loaded.sessions if loaded.queue.get(row["session_uuid"])]  # others: nothing new
            taken = self._take(due)  # kept copies still current; kept again only once this commits
            stale = [row["session_uuid"] for row in due if row["session_uuid"] in warm
                     and row["session_uuid"] not in taken]
            if stale:  # another projector projected them since (or they were let go): read them whole
                load_facts(pg, loaded, stale)
            projected = {}
            for row in due:
                uuid, version = row["session_uuid"], row["projection_version"] + 1
                interactions = tuple(loaded.interactions.get(row["id"], ()))
                kept, before = taken.get(uuid), None
                if kept is None:
                    facts = dict(loaded.facts.get(uuid, ()))
                    log = FactLog(facts.values())
                    projection = project(loaded.record(row), log, interactions, now=now)
                    kept = Kept(version, facts, log, projection, interactions)
                else:
                    before = kept.projection.activity
                    since = _fold(kept, loaded.facts.get(uuid, ()))
                    projection = project(loaded.record(row), kept.log, interactions, since, now)
                    kept.version, kept.projection, kept.interactions = version, projection, interactions
                projected[uuid] = (row, projection, kept, before)
            if not projected:
                pg.rollback()
                return outcome
            if taken or stale:
                warm_ones = [(row, projection) for row, projection, _, _ in projected.values()
                             if row["session_uuid"] in warm]
                load_legs(pg, loaded, whole=[row["id"] for row, p in warm_ones if p.kept_legs_until is None],
                          regions={row["id"]: p.kept_legs_until for row, p in warm_ones
                                   if p.kept_legs_until is not None})
            changes = Changes()
            for uuid, (row, projection, _, before) in projected.items():
                changes.add(row, loaded, projection, before)
                outcome.projected.append(Projected(uuid, projection.session, _legs_kept(projection)))
            save(pg, changes)
        for uuid, (_, _, kept, _) in projected.items():
            self._keep(uuid, kept)
        committed = datetime.now(UTC)
        for rows in loaded.queue.values():
            for row in rows:
                metrics.PROJECTION_LAG.observe(max((committed - row["queued_at"]).total_seconds(), 0.0))
        metrics.PROJECTIONS.labels("projected").inc(len(outcome.projected))
        with self._lock:
            for done in outcome.projected:
                self._failed_until.pop(done.session_uuid, None)
        return outcome

    def _take(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Kept]:
        """Take out the kept copies of the locked sessions `rows`; those still of the version the lock
        read are returned (a failed projection then simply has none kept)."""
        taken = {}
        with self._lock:
            for row in rows:
                kept = self._kept.pop(row["session_uuid"], None)
                if kept is not None:
                    self._kept_facts -= len(kept.facts)
                    if kept.version == row["projection_version"]:
                        taken[row["session_uuid"]] = kept
        return taken

    def _keep(self, uuid: str, kept: Kept) -> None:
        if len(kept.facts) < self.keep_from:
            return
        with self._lock:
            self._kept[uuid] = kept
            self._kept_facts += len(kept.facts)
            while self._kept_facts > KEEP_AT_MOST and self._kept:
                _, dropped = self._kept.popitem(last=False)
                self._kept_facts -= len(dropped.facts)


def _legs_kept(projection: Projection) -> dict[str, int] | None:
    until = projection.kept_legs_until
    if until is None:
        return None
    kept = dict.fromkeys(until, 0)
    for leg in projection.legs:
        if leg["ended_at"] is not None and leg["ended_at"] <= until[leg["party"]]:
            kept[leg["party"]] += 1
    return kept


def _fold(kept: Kept, new: Iterable[tuple[int, CallbackFact]]) -> Since:
    """Fold a kept session's new facts in (a replayed one replaces its earlier reading); the `Since`
    for projecting it again."""
    changed: list[CallbackFact] = []
    for inbox_id, fact in new:
        old = kept.facts.get(inbox_id)
        if old == fact:
            continue  # read last time too (its queue row came after the queue was read)
        if old is not None:
            kept.log.remove(old)
            changed.append(old)
        kept.facts[inbox_id] = fact
        kept.log.add(fact)
        changed.append(fact)
    return Since(kept.projection, kept.interactions, min((f.at for f in changed), default=None))


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """A projection allocates tens of thousands of short-lived, acyclic objects (a busy session's
    facts and legs), freed by reference counting; the cyclic collector would walk the whole
    process's heap several times meanwhile, doubling a big projection's time. Paused for the
    transaction (milliseconds), not skipped: it runs again right after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class ProjectorLoop:
    """The projector that runs by itself: in the `worker` process, and in a thread of each web process.

    One projector at a time does the continuous work: the one that holds the leader lock (a
    PostgreSQL session advisory lock on a connection of its own; when its process stops or dies,
    the connection closes and another takes over within `retry` seconds). One, not one per
    process: each batch takes every fact due for its sessions, so the callbacks of a call, which
    arrive together, are projected together, and no two processes re-derive one session.

    A `worker` process is preferred: it holds a second lock saying it is there, and a web process
    neither takes the lead while one is, nor keeps it once one arrives (it looks every `retry`
    seconds), so projection leaves the processes that answer Plivo whenever a worker runs.

    The leader projects the oldest due sessions in batches, one batch every `gather` seconds at
    most (more facts per session per batch under load, for a lag of about `gather` more), and looks
    at the queue every `poll` seconds when nothing is due: the projection lag's floor.

    Correctness never depends on the locks: projections lock their sessions, so two projectors at
    once (a lock lost to a network hiccup, or `leader=False` behind a pooler that cannot keep
    session locks) are only less efficient, never wrong.
    """

    LEADER_KEY = 0x70726F6A  # "proj": held by the projector that leads
    WORKER_KEY = 0x776F726B  # "work": held by every running worker process

    def __init__(self, projector: Projector, *, worker: bool = False, poll: float = 0.05, gather: float = 0.1,
                 retry: float = 1.0, leader: bool = True):
        self.projector, self.worker, self.leader = projector, worker, leader
        self.poll, self.gather, self.retry = poll, gather, retry
        self._connection: Any = None  # holds the locks this process has
        self._leads = False
        self._checked = 0.0

    def run(self, stop: threading.Event) -> None:
        """Project until `stop` is set (through database outages: each failure waits, then retries)."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if not self._leading():
                        stop.wait(self.retry)
                        continue
                    outcome = self.projector.project_due()
                except Exception as exc:  # noqa: BLE001 - the loop must outlive a database outage
                    log.warning("projection failed: %s", type(exc).__name__, exc_info=not is_database_unavailable(exc))
                    self._release()
                    stop.wait(self.retry)
                    continue
                if not outcome.projected:
                    stop.wait(self.poll)
                else:
                    stop.wait(max(self.gather - (time.monotonic() - started), 0.0))
        finally:
            self._release()

    def _leading(self) -> bool:
        if not self.leader:
            return True
        connection = self._connection
        if connection is None or connection.closed or connection.broken:
            self._release()
            connection = self._connection = self.projector.db.dedicated_connection()
            if self.worker:  # say a worker is here (held for the process's life)
                connection.execute("SELECT pg_advisory_lock(%s)", [self.WORKER_KEY])
        now = time.monotonic()
        if not self.worker and now - self._checked >= self.retry:
            self._checked = now
            if self._worker_running(connection):
                if self._leads:
                    connection.execute("SELECT pg_advisory_unlock(%s)", [self.LEADER_KEY])
                    self._leads = False
                    log.info("a worker process runs: leaving the projection to it")
                return False
        if not self._leads:
            self._leads = connection.execute("SELECT pg_try_advisory_lock(%s)", [self.LEADER_KEY]).fetchone()[0]
            if self._leads:
                log.info("this process now leads the projection")
        return self._leads

    def _worker_running(self, connection: Any) -> bool:
        """Does some worker process hold its lock? (Tried, and let go at once if it was free.)"""
        if connection.execute("SELECT pg_try_advisory_lock(%s)", [self.WORKER_KEY]).fetchone()[0]:
            connection.execute("SELECT pg_advisory_unlock(%s)", [self.WORKER_KEY])
            return False
        return True

    def _release(self) -> None:
        self._leads = False
        if self._connection is not None:
            try:
                self._connection.close()  # the locks go with the session
            except Exception:  # noqa: BLE001,S110 - already broken
                pass
            self._connection = None


class BackgroundProjector:
    """A web process's projector: `ProjectorLoop` in a daemon thread, started by the first callback.

    Started lazily, in the process that stores callbacks (a gunicorn worker, after the fork), so that
    a deployment running only `web` stays current; a daemon, because stopping the process loses
    nothing (the facts are committed, and another projector takes over).
    """

    def __init__(self, projector: Projector, **options: Any):
        self.loop = ProjectorLoop(projector, **{"leader": projector.db.holds_session_locks} | options)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def nudge(self) -> None:
        """A callback was stored: make sure this process takes part in projecting."""
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._stopping.clear()
                self._thread = threading.Thread(target=self.loop.run, args=(self._stopping,), name="projector",
                                                daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout)


def run_worker(projector: Projector, stop: threading.Event, *, poll: float = 0.05) -> None:
    """The worker's loop (see `ProjectorLoop`): without a leader lock when the database connection
    cannot keep one (a transaction pooler and no DATABASE_DIRECT_URL)."""
    ProjectorLoop(projector, worker=True, poll=poll, leader=projector.db.holds_session_locks).run(stop)
