"""Benchmark the real webhook path side by side with four baselines, with wrk, on this machine.

    .venv/bin/python bench/webhooks.py [--duration 8] [--rounds 3] [--warmup 3] [--connections 16]
                                       [--worker-class gevent|gthread] [--throughput-only] [-h]
    make bench-webhooks          # installs Debian's wrk first if it is missing

Targets, all on 127.0.0.1, each under gunicorn with `-c gunicorn.conf.py` and the same overrides
(WEB_CONCURRENCY=2, GUNICORN_BIND, LOG_LEVEL=WARNING, GUNICORN_MAX_REQUESTS=0, and GUNICORN_WORKER_CLASS
from --worker-class), so they all have the same worker class, workers and threads:

* four yardsticks from `bench/baselines.py`: a bare view (200); parse + HMAC (the form, then the
  service's own `verify_signature`); a naive ORM handler (that, then one INSERT and one counter
  read-modify-write through an ORM Session, committed); store only (parse + HMAC, then one INSERT
  in autocommit on a pooled connection, nothing applied: the least a handler that keeps each
  callback before answering does, so a ceiling for the service on this machine);
* the service, `webhook_service:create_app()`, on a database of its own (`webhook_service_bench_webhooks`
  on DATABASE_URL's server, else on the embedded PostgreSQL; recreated by the migrations on every run),
  with a sandbox Plivo (`python -m plivo_sandbox`) for POST /v1/sessions. PLIVO_MAX_CONCURRENCY
  is set to the larger of the thread count and the sessions run's connections, or that run would
  measure the 503s the setting exists to give.

Load: every request is generated beforehand and read by `bench/wrk_feed.lua`, one line per request,
each wrk thread from its own file. Callbacks are form-encoded with Plivo's 16 session-callback fields,
from simulated calls (legacy and latest vocabularies, mostly leg events, hangups with billing,
realistic timestamps, SequenceNumber increasing per session) on thousands of sessions whose events
interleave in time. Every callback the service is sent is distinct (its dedupe never short-circuits)
and has its own nonce and V3 signature for that target's URL; half the sessions exist beforehand,
the others are discovered from their first callback.

Runs, in this order: `--rounds` rounds of each target in turn, a warm-up then a measured run as fast
as it answers (same duration, connections and wrk threads for all); the table shows each target's
median round, and its ratios are of medians, so one busy moment of this shared machine does not
skew a ratio; then the service at a fixed rate (paced with wrk's delay() hook), for
its latency; POST /v1/sessions on the service and the same create requests on the bare view; then
callbacks until the service has received `--callbacks` in all, with each worker's RSS at 0, half and
all of them. Before each measured run: a CHECKPOINT, a wait (up to `--quiet-timeout`) for the
machine to be quiet, as other processes on these 2 cores lower every number, the warm-up, then an
ANALYZE (the statistics autovacuum would have by then). During it, the CPU time
of the target, of its Postgres backends and of everything else is taken: the table shows the CPU per
request, which shows where the time goes and depends little on the machine's other load.

Checks (a failed one makes the exit status 1): no socket errors, no non-2xx answers, no feed ran out;
every inbox row applied; the service's inbox rows, and the naive and store-only baselines' rows, number
at least the 2xx answers and at most those plus the requests wrk had sent but not seen answered when it stopped.
The issue's goals are printed as met or not; they do not change the exit status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
import psycopg
import requests
from baselines import CALLBACK_PATH, create_tables
from sqlalchemy import create_engine

from webhook_service.devdb import admin_url, drop_database, ensure_database
from webhook_service.migrate import upgrade
from webhook_service.persistence.db import Database, sqlalchemy_url
from webhook_service.plivo.signature import NONCE_HEADER, SIGNATURE_HEADER, compute_signature
from webhook_service.services.projector import Projector
from webhook_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = ROOT / "bench" / "wrk_feed.lua"
DATABASE = "webhook_service_bench_webhooks"
AUTH_ID = "MASANDBOX00000000000"
AUTH_TOKEN = "sandbox-auth-token"
API_TOKEN = "bench-token-123"
SESSIONS_PATH = "/v1/sessions"
INBOX_ROWS = "SELECT count(*) FROM callback_inbox"
FORM = "application/x-www-form-urlencoded"

# Plivo's session-callback attributes (reference §8.2: the legacy list, plus the latest FirstParty/SecondParty).
CALLBACK_FIELDS = (
    "EventName", "EventTimestamp", "SessionUUID", "FirstParty", "SecondParty", "From", "To", "VirtualNumber",
    "SequenceNumber", "Duration", "BilledDuration", "Amount", "PlivoHangupCause", "PlivoHangupCauseCode",
    "PinAuthenticationStatus", "PinRetryCounter",
)
RATE_PER_MINUTE = Decimal("0.00850")
VIRTUAL_NUMBERS = tuple(f"+1650555{n:04d}" for n in range(100, 140))
SESSION_SPACING_S = 0.5  # sessions start this far apart, so many calls overlap and their events interleave


def log(message: str) -> None:
    """Progress goes to stderr; the results table alone goes to stdout."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# Simulated calls -> callback parameters -------------------------------------------------------------


@dataclass(frozen=True)
class PlannedSession:
    """A masking session of the simulated traffic."""

    uuid: str
    first_party: str
    second_party: str
    virtual_number: str
    created_at: datetime
    existing: bool  # created through the API before the run; else the service learns of it from a callback


def _billing(seconds: int, cause: tuple[str, str]) -> dict[str, str]:
    minutes = -(-seconds // 60)
    return {"Duration": str(seconds), "BilledDuration": str(minutes * 60), "Amount": f"{RATE_PER_MINUTE * minutes:.5f}",
            "PlivoHangupCause": cause[0], "PlivoHangupCauseCode": cause[1]}


def call_events(session: PlannedSession, start: datetime, rng: random.Random) -> list[tuple[datetime, dict[str, str]]]:
    """The session callbacks of one call, as Plivo sends them (legacy or latest vocabulary)."""
    legacy = rng.random() < 0.75
    first_calls = rng.random() < 0.7
    answered = rng.random() < 0.9
    a, b = ("First", "Second") if first_calls else ("Second", "First")  # caller's and callee's names
    caller, callee = (session.first_party, session.second_party)[:: 1 if first_calls else -1]
    common = dict.fromkeys(CALLBACK_FIELDS, "") | {
        "SessionUUID": session.uuid, "FirstParty": session.first_party, "SecondParty": session.second_party,
        "From": caller, "To": callee, "VirtualNumber": session.virtual_number, "PinRetryCounter": "0",
    }
    events: list[tuple[datetime, dict[str, str]]] = []

    def event(name: str, at: datetime, **extra: str) -> None:
        events.append((at, common | {"EventName": name, "EventTimestamp": at.strftime("%Y-%m-%d %H:%M:%S")} | extra))

    if legacy:
        event(f"Session{a}PartyAnswer", start, PinAuthenticationStatus="AuthorizedCaller")
        ring_at = start + timedelta(seconds=1)
    else:
        event("SessionVirtualNumberAnswer", start)
        event(f"Session{b}PartyInitiated", start + timedelta(seconds=1))
        ring_at = start + timedelta(seconds=2)
    event(f"Session{b}PartyRing" + ("ing" if not legacy and b == "First" else ""), ring_at)
    if answered:
        answer_at = ring_at + timedelta(seconds=rng.randint(3, 15))
        talk = rng.randint(5, 900)
        end = answer_at + timedelta(seconds=talk)
        event(f"Session{b}PartyAnswer", answer_at)
        callee_billing = _billing(talk, ("NORMAL_CLEARING", "4000"))
    else:
        end = ring_at + timedelta(seconds=45)
        callee_billing = _billing(0, ("NO_ANSWER", "3000"))
    hangup = "Hangup" if legacy else "Complete"
    event(f"Session{b}Party{hangup if legacy or answered else 'Failed'}", end, **callee_billing)
    event(f"Session{a}Party{hangup}", end, **_billing(int((end - start).total_seconds()),
                                                       ("NORMAL_CLEARING", "4000")))
    return events


def callback_stream(count: int, seed: int) -> tuple[list[dict[str, str]], list[PlannedSession]]:
    """`count` distinct callbacks, in event-time order, and the sessions they belong to.

    Sessions start SESSION_SPACING_S apart and have one to three calls each, minutes apart, so at
    any moment a few hundred sessions are active and one session's events are far apart in the
    stream: concurrent requests rarely touch the same session, as with real traffic.
    """
    rng = random.Random(seed)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=8)
    sessions: list[PlannedSession] = []
    timeline: list[tuple[datetime, int, int, dict[str, str]]] = []
    while len(timeline) < count:
        i = len(sessions)
        session = PlannedSession(
            uuid=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            first_party=f"+1415{2_000_000 + i:07d}", second_party=f"+1628{3_000_000 + i:07d}",
            virtual_number=rng.choice(VIRTUAL_NUMBERS),
            created_at=start + timedelta(seconds=i * SESSION_SPACING_S), existing=i % 2 == 0,
        )
        sessions.append(session)
        at = session.created_at + timedelta(seconds=rng.uniform(5, 900))
        events: list[tuple[datetime, dict[str, str]]] = []
        for _ in range(rng.choice((1, 1, 2, 2, 3))):
            events += call_events(session, at, rng)
            at = events[-1][0] + timedelta(seconds=rng.uniform(60, 1800))
        for seq, (moment, params) in enumerate(events, 1):
            params["SequenceNumber"] = str(seq)
            timeline.append((moment, i, seq, params))
    timeline.sort(key=lambda e: e[:3])
    stream = [params for *_, params in timeline[:count]]
    assert len({(p["SessionUUID"], p["SequenceNumber"]) for p in stream}) == count, "callbacks must be distinct"
    return stream, sessions


# Feeds: the request files wrk_feed.lua reads ---------------------------------------------------------


@dataclass
class Feed:
    """Pre-generated requests in one file per wrk thread, and where the next run resumes in each."""

    prefix: Path
    threads: int
    wrap: bool = False  # start the files over at their end (baselines only: the service never sees a repeat)
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets = self.offsets or [0] * self.threads

    def reuse(self, *, wrap: bool) -> Feed:
        """The same files read from the start by another target."""
        return Feed(self.prefix, self.threads, wrap)

    def remaining(self) -> list[int]:
        """Requests left in each thread's file after its offset (the first run skips the header line)."""
        left = []
        for t, offset in enumerate(self.offsets):
            with open(f"{self.prefix}.{t}", "rb") as f:
                f.seek(offset)
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 20), b""))
                left.append(lines - (1 if offset == 0 else 0))
        return left


def share_out(need: int, remaining: Sequence[int]) -> list[int]:
    """`need` requests split as evenly as the threads' remaining requests allow."""
    if need > sum(remaining):
        raise RuntimeError(f"the feed has {sum(remaining)} requests left, {need} are needed: raise --callbacks")
    quotas, left, open_threads = [0] * len(remaining), need, sorted(range(len(remaining)), key=remaining.__getitem__)
    for i, t in enumerate(open_threads):  # the threads with the fewest left first; the others take up the rest
        quotas[t] = min(remaining[t], -(-left // (len(open_threads) - i)))
        left -= quotas[t]
    return quotas


def write_feed(prefix: Path, threads: int, header_names: Sequence[str], lines: Iterator[str], *,
               wrap: bool = False) -> Feed:
    """Deal request lines round-robin into `prefix.0` … `prefix.N-1`, each starting with the header names."""
    with ExitStack() as stack:
        files = [stack.enter_context(open(f"{prefix}.{t}", "w", encoding="utf-8")) for t in range(threads)]
        for f in files:
            f.write("\t".join(header_names) + "\n")
        for i, line in enumerate(lines):
            files[i % threads].write(line + "\n")
    return Feed(prefix, threads, wrap)


def _sign_chunk(job: tuple[str, int, list[dict[str, str]]]) -> list[str]:
    """Sign a chunk of callbacks for `url`: one `nonce <TAB> signature <TAB> form body` line each."""
    url, seed, chunk = job
    rng = random.Random(seed)
    lines = []
    for params in chunk:
        nonce = "".join(rng.choices(string.digits, k=20))  # Plivo's nonces are 20 digits
        signature = compute_signature("POST", url, params, nonce, AUTH_TOKEN)
        lines.append(f"{nonce}\t{signature}\t{urlencode(params)}")
    return lines


def write_callback_feed(prefix: Path, threads: int, url: str, stream: Sequence[dict[str, str]], seed: int,
                        pool: ProcessPoolExecutor, *, wrap: bool) -> Feed:
    """Signed, form-encoded callbacks for a target whose callback URL is `url` (signing runs on every core)."""
    size = 2000
    jobs = [(url, seed + i, list(stream[i:i + size])) for i in range(0, len(stream), size)]
    lines = (line for chunk in pool.map(_sign_chunk, jobs) for line in chunk)
    return write_feed(prefix, threads, (NONCE_HEADER, SIGNATURE_HEADER), lines, wrap=wrap)


def write_sessions_feed(prefix: Path, threads: int, count: int, run_id: str) -> Feed:
    """Distinct POST /v1/sessions bodies (valid E.164 pairs never used twice) with distinct Idempotency-Keys."""
    def lines() -> Iterator[str]:
        for i in range(count):
            body = {"first_party": f"+1212{2_000_000 + i:07d}", "second_party": f"+1646{2_000_000 + i:07d}",
                    "session_expiry": 3600, "external_ref": f"bench-{run_id}-{i}"}
            yield f"bench-{run_id}-{i:07d}\t{json.dumps(body, separators=(',', ':'))}"

    return write_feed(prefix, threads, ("Idempotency-Key",), lines())


# wrk -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured and what its Lua feed counted."""

    requests: int  # responses received
    duration_s: float
    p50_ms: float
    p99_ms: float
    socket_errors: int  # connect, read, write and timeout errors
    sent: int  # requests taken from the feed and written
    ok: int  # 2xx answers
    failed: int  # other answers
    exhausted: int  # requests the feed could not supply (it ran out)

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s

    @property
    def unanswered(self) -> int:
        """Requests written but not answered before wrk stopped (the server may or may not have handled them)."""
        return self.sent - self.ok - self.failed


def run_wrk(url: str, method: str, path: str, feed: Feed, *, headers: Sequence[str], duration: float,
            connections: int, rate: float = 0, quotas: Sequence[int] | None = None,
            until: Callable[[], bool] | None = None) -> WrkResult:
    """One wrk run reading `feed` from where the last run stopped; advances the feed.

    With `quotas`, each thread stops after its quota and `until()` is polled; once it is true wrk
    is interrupted (SIGINT makes it print its summary), so the run ends when the server has done
    the work rather than when `duration` runs out.
    """
    threads = feed.threads
    command = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{math.ceil(duration)}s", "--latency",
        "--timeout", "10s", "-s", str(WRK_SCRIPT),
    ]
    for header in headers:
        command += ["-H", header]
    command += [url, "--", method, path, str(feed.prefix), ",".join(map(str, feed.offsets)),
                "1" if feed.wrap else "0", f"{rate / threads:.6f}",
                ",".join(map(str, quotas or [-1] * threads))]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if until is not None:
            while proc.poll() is None and not until():
                time.sleep(0.1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = next((x for x in out.splitlines() if x.startswith("WRK_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out.strip()}")
    data = json.loads(line.removeprefix("WRK_RESULT "))
    per_thread = data["threads"]
    feed.offsets = [t["pos"] for t in per_thread]
    errors = data["errors"]
    result = WrkResult(
        requests=data["requests"], duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        sent=sum(t["sent"] for t in per_thread), ok=sum(t["ok"] for t in per_thread),
        failed=sum(t["failed"] for t in per_thread), exhausted=sum(t["exhausted"] for t in per_thread),
    )
    log(f"  {url}{path}: {result.rate:.0f} req/s over {result.duration_s:.1f} s, p50 {result.p50_ms:.2f} ms, "
        f"p99 {result.p99_ms:.2f} ms; sent {result.sent}, 2xx {result.ok}, other {result.failed}, "
        f"socket errors {result.socket_errors}")
    return result


# Servers -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A process we started (gunicorn or the sandbox), its log, and how to stop it."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, health_path: str,
                 workdir: Path) -> None:
        self.name, self.port, self.health_path = name, port, health_path
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as out:
            # Its own session: Ctrl-C on the driver does not hit it, and stop() reaches all its processes.
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        if not self.health_path:  # a process that serves nothing (the worker)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + self.health_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer {self.health_path} within {timeout:.0f} s:\n{self.log_tail()}")

    def workers(self) -> list[psutil.Process]:
        """gunicorn's workers: the children of the master, by pid."""
        return sorted(psutil.Process(self.proc.pid).children(), key=lambda p: p.pid)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (gunicorn finishes in-flight requests), then SIGKILL to the process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created: stray workers too
        except ProcessLookupError:
            pass
        self.proc.wait()


def gunicorn_env(port: int, workers: int, workdir: Path, name: str, worker_class: str | None = None,
                 **extra: str) -> dict[str, str]:
    """The same gunicorn overrides for every target, plus that target's own settings."""
    metrics_dir = workdir / f"prometheus-{name}"
    metrics_dir.mkdir()
    chosen = {"GUNICORN_WORKER_CLASS": worker_class} if worker_class else {}
    return os.environ | chosen | {
        "WEB_CONCURRENCY": str(workers), "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_MAX_REQUESTS": "0",
        "LOG_LEVEL": "WARNING", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    } | extra


def start_gunicorn(name: str, app: str, env: dict[str, str], port: int, workdir: Path) -> Server:
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app]
    return Server(name, command, env, port, "/healthz", workdir)


# Database ------------------------------------------------------------------------------------------


def prepare_database(admin: str, sessions: Sequence[PlannedSession]) -> str:
    """Recreate the bench database: migrations, the baselines' tables, the sessions that already exist."""
    url = ensure_database(admin, DATABASE, recreate=True)
    upgrade(url)
    engine = create_engine(sqlalchemy_url(url))
    try:
        create_tables(engine)
    finally:
        engine.dispose()
    with psycopg.connect(url) as conn:
        with conn.cursor().copy(
            "COPY masking_sessions (session_uuid, origin, status, first_party, second_party, virtual_number, record,"
            " session_expiry, plivo_created_at, expires_at, created_at, updated_at) FROM STDIN"
        ) as copy:
            for s in sessions:
                if s.existing:
                    copy.write_row((s.uuid, "api", "active", s.first_party, s.second_party, s.virtual_number,
                                    False, 86400, s.created_at, s.created_at + timedelta(days=1), s.created_at,
                                    s.created_at))
        with conn.cursor().copy("COPY bench_session_counters (session_uuid, callbacks) FROM STDIN") as copy:
            for s in sessions:
                copy.write_row((s.uuid, 0))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return url


def checkpoint(admin: str) -> None:
    """Flush dirty pages now, so no run pays for the previous run's writes (needs superuser; skipped otherwise)."""
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error as exc:
        log(f"CHECKPOINT skipped: {exc}")


def analyze(url: str) -> None:
    """Bring the planner's statistics up to date, as autovacuum keeps them on a database in service.

    The tables start empty and grow by thousands of rows in a warm-up; autovacuum's analyze comes
    within its one-minute nap, longer than a run. Until then each backend keeps plans made for
    empty tables (sequential scans). ANALYZE invalidates them, so the run measures steady state.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


def scalar(url: str, sql: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


def server_facts(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        values = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                  for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method", "shared_buffers")}
    return ", ".join(f"{k}={v}" for k, v in values.items())


# Other load on the machine ---------------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (Linux counts guest time inside user and nice)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def _cpu_seconds(pids: set[int]) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            seconds[pid] = t.user + t.system
        except psutil.Error:
            pass
    return seconds


class OtherLoad:
    """Who used the CPU during a run: the target, Postgres for it, and processes that are not ours.

    Ours: this driver, wrk (its usage as a reaped child), every server we started and its workers,
    and the Postgres processes on the bench database (its client backends are the "postgres" CPU;
    autovacuum there is ours but nobody's in particular). Everything else busy on the machine,
    such as someone's test suite, shares the cores with the target and makes its numbers low; the
    target's own CPU per request does not depend much on that, so it is reported too.
    """

    def __init__(self, servers: Sequence[Server], db_url: str) -> None:
        self.servers, self.db_url = servers, db_url

    def _backends(self) -> tuple[set[int], set[int]]:
        """The bench database's client backends, and its other Postgres processes (autovacuum)."""
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            rows = conn.execute("SELECT pid, backend_type = 'client backend' FROM pg_stat_activity"
                                " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        return {pid for pid, client in rows if client}, {pid for pid, client in rows if not client}

    @staticmethod
    def _tree(server: Server) -> set[int]:
        try:
            return {server.proc.pid} | {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
        except psutil.Error:
            return set()

    def wait_quiet(self, max_percent: float, timeout: float) -> float:
        """Wait (up to `timeout`) until the machine, with our servers idle, is at most `max_percent` busy."""
        deadline = time.monotonic() + timeout
        while (busy := psutil.cpu_percent(interval=1.0)) > max_percent and time.monotonic() < deadline:
            log(f"  machine {busy:.0f}% busy with other work; waiting for it to calm down")
            time.sleep(2)
        return busy

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        """Yield a dict that holds, after the block, the CPU seconds used meanwhile by each server (by
        name), by the bench database's backends (`postgres`), and `other`: the percent of all cores
        that processes not ours used."""
        result: dict[str, float] = {}
        trees = {server.name: self._tree(server) for server in self.servers}
        servers = set().union(*trees.values()) | {os.getpid()}
        backends, helpers = self._backends()
        before = _cpu_seconds(servers | backends | helpers)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, start = _busy_seconds(), time.monotonic()
        yield result
        busy, wall = _busy_seconds() - busy, time.monotonic() - start
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        more_backends, more_helpers = self._backends()
        backends, helpers = backends | more_backends, helpers | more_helpers
        after = _cpu_seconds(servers | backends | helpers)
        used = {pid: seconds - before.get(pid, 0.0) for pid, seconds in after.items()}
        wrk = (reaped.ru_utime - children.ru_utime) + (reaped.ru_stime - children.ru_stime)
        result |= {name: sum(used.get(pid, 0.0) for pid in pids) for name, pids in trees.items()}
        result["postgres"] = sum(used.get(pid, 0.0) for pid in backends)
        result["other"] = max(0.0, 100 * (busy - sum(used.values()) - wrk) / (wall * (os.cpu_count() or 1)))


# Projection lag, measured from outside -------------------------------------------------------------


class LagProbe:
    """Sends its own callbacks at a fixed rate and times how long each takes to show in the record.

    Each probe is a leg's hangup (a first party's, with 60 billed seconds) for a session of its own,
    which the service has never seen: the time from the probe's 2xx to the moment its session's
    `call_count` reads 1 in Postgres (polled every `poll` seconds, one query for all outstanding
    probes) is the projection lag as a client of the record sees it. Independent of the service's
    own `projection_lag_seconds` histogram.
    """

    def __init__(self, url: str, db_url: str, *, rate: float = 20.0, poll: float = 0.01) -> None:
        self.url, self.db_url, self.rate, self.poll = url + CALLBACK_PATH, db_url, rate, poll
        self.acked: dict[str, float] = {}  # session uuid -> time of its 2xx
        self.seen: dict[str, float] = {}
        self.failed = 0
        self._lock = threading.Lock()
        self._stop_sending = threading.Event()
        self._stop_watching = threading.Event()
        self._threads: list[threading.Thread] = []
        self._run = uuid.uuid4().hex[:8]

    def __enter__(self) -> LagProbe:
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_sending.set()
        self._threads[0].join(10)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every probe sent has been seen (or `timeout`), then stop watching."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if set(self.acked) <= set(self.seen):
                    break
            time.sleep(0.05)
        self._stop_watching.set()
        self._threads[1].join(10)

    def lags(self) -> list[float]:
        """Each probe's lag in seconds; a probe never seen counts as infinite."""
        with self._lock:
            return sorted(self.seen.get(u, math.inf) - t for u, t in self.acked.items())

    def _send(self) -> None:
        rng = random.Random(self._run)
        http = requests.Session()
        n, start = 0, time.monotonic()
        while not self._stop_sending.is_set():
            n += 1
            session_uuid = f"probe-{self._run}-{n:06d}"
            params = {"EventName": "SessionFirstPartyHangup", "SessionUUID": session_uuid,
                      "EventTimestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                      "From": "+14155550100", "To": "+14155550123", "SequenceNumber": "1", "Duration": "42",
                      "BilledDuration": "60", "Amount": "0.00850"}
            nonce = "".join(rng.choices(string.digits, k=20))
            headers = {NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature("POST", self.url, params, nonce,
                                                                                  AUTH_TOKEN)}
            try:
                response = http.post(self.url, data=params, headers=headers, timeout=10)
                ok = response.status_code == 200
            except requests.RequestException:
                ok = False
            with self._lock:
                if ok:
                    self.acked[session_uuid] = time.monotonic()
                else:
                    self.failed += 1
            self._stop_sending.wait(max(start + n / self.rate - time.monotonic(), 0.0))

    def _watch(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while not self._stop_watching.is_set():
                outstanding = self._outstanding()
                if outstanding:
                    found = conn.execute("SELECT session_uuid FROM masking_sessions"
                                         " WHERE session_uuid = ANY(%s) AND call_count > 0", [outstanding]).fetchall()
                    now = time.monotonic()
                    with self._lock:
                        for (session_uuid,) in found:
                            self.seen[session_uuid] = now
                time.sleep(self.poll)

    def _outstanding(self) -> list[str]:
        with self._lock:
            return [u for u in self.acked if u not in self.seen]


@dataclass
class Step:
    """One offered rate of the capacity search, and what it gave."""

    rate: float
    result: WrkResult
    lags: list[float]
    probe_failures: int
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per callback answered: by server, "postgres"

    @property
    def p99_lag(self) -> float:
        return self.lags[min(len(self.lags) - 1, int(0.99 * len(self.lags)))] if self.lags else math.inf

    def failures(self, max_lag: float) -> list[str]:
        """Why the rate was not sustained (empty: it was)."""
        r, why = self.result, []
        if r.failed or r.socket_errors or self.probe_failures:
            why.append(f"{r.failed} non-2xx, {r.socket_errors} socket errors, {self.probe_failures} probes failed")
        if r.exhausted:
            why.append(f"the feed ran out {r.exhausted} times")
        if r.rate < 0.95 * self.rate:
            why.append(f"answered {r.rate:.0f} req/s, under 95% of the {self.rate:.0f} offered")
        if self.p99_lag > max_lag:
            why.append(f"lag p99 {self.p99_lag:.2f} s over {max_lag:g} s")
        return why

    def passed(self, max_lag: float) -> bool:
        return not self.failures(max_lag)


# The benchmark -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Everything one target was sent, to check against what it stored."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    unanswered: int = 0
    socket_errors: int = 0
    exhausted: int = 0

    def add(self, result: WrkResult) -> WrkResult:
        self.sent += result.sent
        self.ok += result.ok
        self.failed += result.failed
        self.unanswered += result.unanswered
        self.socket_errors += result.socket_errors
        self.exhausted += result.exhausted
        return result


@dataclass
class Target:
    """One server under test, the feed it is sent, and what it was sent in all."""

    label: str
    server: Server
    feed: Feed
    tally: Tally = field(default_factory=Tally)


RssSample = tuple[int, list[psutil.Process], list[int]]  # callbacks received, the workers, their RSS (bytes)


@dataclass
class Measured:
    """A measured run, the target's CPU per request and the share of the machine other processes took."""

    result: WrkResult
    other_cpu: float  # percent of all cores
    cpu_ms: dict[str, float]  # CPU per answered request: of each server (by name), of Postgres ("postgres")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8, help="seconds of each measured throughput run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput runs of each target, interleaved; the table shows each one's median")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up before each measured run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections for the callback runs")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads for every run")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers of every server (WEB_CONCURRENCY)")
    parser.add_argument("--worker-class", choices=("gevent", "gthread"), default=None,
                        help="GUNICORN_WORKER_CLASS of all servers (default: gunicorn.conf.py's, gevent)")
    parser.add_argument("--rate", type=float, default=300, help="requests per second of the latency run")
    parser.add_argument("--rate-duration", type=float, default=15, help="seconds of the latency run")
    parser.add_argument("--sessions-duration", type=float, default=10, help="seconds of each POST /v1/sessions run")
    parser.add_argument("--sessions-connections", type=int, default=8)
    parser.add_argument("--callbacks", type=int, default=300_000,
                        help="callbacks the service receives in all; worker RSS is shown at 0, half and all; "
                             "must exceed what its throughput rounds send (rounds x (warm-up + duration) x its "
                             "req/s), or its feed runs out")
    parser.add_argument("--baseline-feed", type=int, default=30_000,
                        help="distinct signed callbacks per baseline (their feeds start over at the end)")
    parser.add_argument("--max-other-cpu", type=float, default=15,
                        help="before each measured run, wait until other processes use at most this %% of the CPU")
    parser.add_argument("--quiet-timeout", type=float, default=60,
                        help="seconds to wait for that before measuring anyway (the report shows the load)")
    parser.add_argument("--step-duration", type=float, default=8, help="seconds of each capacity step")
    parser.add_argument("--probe-rate", type=float, default=20, help="lag probes per second during capacity steps")
    parser.add_argument("--max-lag", type=float, default=1.0, help="the projection lag allowed at p99, seconds")
    parser.add_argument("--busy-calls", type=int, default=1000, help="calls through the one busy session")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the throughput rounds and their table (a few minutes: to compare changes)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.rounds % 2 == 0:
        parser.error("--rounds must be odd (the table shows each target's median round)")
    if args.connections < args.threads or args.sessions_connections < args.threads:
        parser.error("every run needs at least one connection per wrk thread")
    return args


class Bench:
    """One benchmark run: its servers, feeds and database, the runs, the checks and the report."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args, self.stack = args, stack
        self.threads = args.threads
        self.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-webhooks-")))
        self.ports = {name: free_port() for name in ("bare", "hmac", "orm", "store", "request", "service", "sandbox")}
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        self.servers: list[Server] = []
        stack.callback(self._stop_servers)
        self.admin = admin_url()
        self.problems: list[str] = []
        self.drains: list[tuple[int, float]] = []
        self.extra_unanswered = 0
        self.extra_ok = 0  # callbacks the service answered 2xx outside the targets' tallies (probes, busy session)

    def _stop_servers(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    # Setup ----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Simulate and sign the traffic, build the database, start every server."""
        args = self.args
        # Enough distinct callbacks for every run against the service, with slack for uneven threads.
        count = int(args.callbacks * 1.03) + 1000 * self.threads
        log(f"simulating {count} callbacks")
        stream, sessions = callback_stream(count, args.seed)
        log(f"signing them for each target, in {self.workdir}")
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            def feed(name: str, callbacks: Sequence[dict[str, str]], seed: int, wrap: bool) -> Feed:
                url = self.urls[name] + CALLBACK_PATH
                return write_callback_feed(self.workdir / name, self.threads, url, callbacks, seed, pool, wrap=wrap)

            service_feed = feed("service", stream, args.seed, wrap=False)
            hmac_feed = feed("hmac", stream[:args.baseline_feed], args.seed + 1, wrap=True)
            orm_feed = feed("orm", stream[:args.baseline_feed], args.seed + 2, wrap=True)
        self.sessions_feed = write_sessions_feed(self.workdir / "sessions", self.threads, 50_000,
                                                 uuid.uuid4().hex[:8])

        log(f"recreating database {DATABASE}: {len(sessions)} sessions, {sum(s.existing for s in sessions)} "
            "of them existing before the run")
        self.db_url = prepare_database(self.admin, sessions)
        self.stack.callback(lambda: drop_database(self.admin, DATABASE))

        log("starting the sandbox Plivo, the baselines and the service")
        self.sandbox = self._start(Server(
            "sandbox", [sys.executable, "-m", "plivo_sandbox", "--port", str(self.ports["sandbox"])],
            os.environ | {"LOG_LEVEL": "WARNING", "PLIVO_AUTH_ID": AUTH_ID, "PLIVO_AUTH_TOKEN": AUTH_TOKEN},
            self.ports["sandbox"], "/sandbox/healthz", self.workdir))
        signing = {"PLIVO_AUTH_TOKEN": AUTH_TOKEN}
        bare = self._gunicorn("bare", "bench.baselines:create_bare_app()")
        hmac = self._gunicorn("hmac", "bench.baselines:create_hmac_app()", PUBLIC_BASE_URL=self.urls["hmac"],
                              **signing)
        orm = self._gunicorn("orm", "bench.baselines:create_orm_app()", PUBLIC_BASE_URL=self.urls["orm"],
                             DATABASE_URL=self.db_url, **signing)
        # The hmac feed's signatures are over the hmac app's URL: the store app checks them over it.
        store = self._gunicorn("store", "bench.baselines:create_store_app()", PUBLIC_BASE_URL=self.urls["hmac"],
                               DATABASE_URL=self.db_url, **signing)
        self.service_settings = {
            "DATABASE_URL": self.db_url, "PLIVO_AUTH_ID": AUTH_ID, "PUBLIC_BASE_URL": self.urls["service"],
            "PUBLIC_BASE_URL_ALLOW_HTTP": "true",
            "API_TOKENS": API_TOKEN, "PLIVO_API_BASE_URL": self.urls["sandbox"],
            # A Plivo slot for every connection of the sessions run (a gevent worker may get them all):
            # with the default (2 per worker) the extra ones get 503 plivo_busy by design, and a
            # benchmark of 503s measures nothing.
            "PLIVO_MAX_CONCURRENCY": str(max(int(os.environ.get("GUNICORN_THREADS", "4")),
                                             self.args.sessions_connections)), **signing}
        # The request path alone: the same service with no projection in its processes (the run's
        # facts are projected after it, by `drain`). Signed for the service's URL: the same feed.
        request_only = self._gunicorn("request", "webhook_service:create_app()",
                                      **self.service_settings | {"PROJECT_IN_WEB": "false"})
        self.service = self._gunicorn("service", "webhook_service:create_app()", **self.service_settings)
        for server in self.servers:
            server.wait_ready()
        self.targets = {
            "bare": Target("bare Flask view (200)", bare, hmac_feed.reuse(wrap=True)),
            "hmac": Target("parse form + HMAC-SHA256", hmac, hmac_feed),
            "orm": Target("naive ORM (+INSERT, +UPDATE)", orm, orm_feed),
            "store": Target("store only (+1 INSERT, commit)", store, hmac_feed.reuse(wrap=True)),
            "request": Target("request path (no projection)", request_only, service_feed),
            "service": Target("service, web projecting", self.service, service_feed),
        }
        self.load = OtherLoad(self.servers, self.db_url)

    def _start(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def _gunicorn(self, name: str, app: str, **settings: str) -> Server:
        env = gunicorn_env(self.ports[name], self.args.workers, self.workdir, name, self.args.worker_class, **settings)
        return self._start(start_gunicorn(name, app, env, self.ports[name], self.workdir))

    # Runs -----------------------------------------------------------------------------------------

    def _callbacks(self, target: Target, seconds: float, **options) -> WrkResult:
        return target.tally.add(run_wrk(target.server.url, "POST", CALLBACK_PATH, target.feed,
                                        headers=[f"Content-Type: {FORM}"], duration=seconds,
                                        connections=self.args.connections, **options))

    def _measured(self, warmup: Callable[[], object], run: Callable[[], WrkResult]) -> Measured:
        """Checkpoint, wait for a quiet machine, warm up, then measure while watching who uses the CPU."""
        checkpoint(self.admin)
        self.load.wait_quiet(self.args.max_other_cpu, self.args.quiet_timeout)
        warmup()
        analyze(self.db_url)
        with self.load.measure() as cpu:
            result = run()
        answered = max(result.requests, 1)
        other = cpu.pop("other")
        return Measured(result, other, {name: 1000 * seconds / answered for name, seconds in cpu.items()})

    def throughput(self) -> dict[str, list[Measured]]:
        """Each target as fast as it answers (same duration, connections and wrk threads for all), in
        `--rounds` interleaved rounds: a busy moment of this shared machine then spoils one round of one
        target, not a target's only number. Each target's rounds, slowest first."""
        args, results = self.args, {key: [] for key in self.targets}
        for round_ in range(1, args.rounds + 1):
            for key, target in self.targets.items():
                log(f"{target.label}, round {round_}/{args.rounds}: {args.warmup:g} s warm-up, "
                    f"then {args.duration:g} s measured")
                results[key].append(self._measured(lambda t=target: self._callbacks(t, args.warmup),
                                                   lambda t=target: self._callbacks(t, args.duration)))
                if key in ("request", "service"):
                    self.drains.append(self.drain())  # no target's run pays for another's projections
        return {key: sorted(rounds, key=lambda m: m.result.rate) for key, rounds in results.items()}

    def drain(self) -> tuple[int, float]:
        """Project everything due, as a worker does after an outage: (facts projected, seconds)."""
        facts = scalar(self.db_url, "SELECT count(*) FROM projection_queue")
        started = time.perf_counter()
        settings = Settings.from_env(self.service_settings | {"DB_STATEMENT_TIMEOUT_MS": "60000"})
        db = Database.connect(self.db_url, settings)
        try:
            Projector(db).project_all_due()
        finally:
            db.dispose()
        seconds = time.perf_counter() - started
        log(f"  projected {facts} facts in {seconds:.1f} s ({facts / seconds if seconds else 0:.0f} facts/s)")
        return facts, seconds

    def paced(self) -> Measured:
        """The webhook path at a fixed rate, for its latency."""
        args = self.args
        log(f"webhook path at {args.rate:g} req/s for {args.rate_duration:g} s")
        service = self.targets["service"]
        return self._measured(lambda: None, lambda: self._callbacks(service, args.rate_duration, rate=args.rate))

    def capacity(self, deployment: str, request_rate: float) -> list[Step]:
        """The highest offered rate the service sustains: every callback answered 2xx and the projection
        lag (LagProbe) at most `--max-lag` at p99. Rates step up by tenths of the request path's own
        throughput from half of it, until a step fails; then one step halfway back, for resolution. If
        the first step fails, they step down by tenths until one holds.

        `deployment`: "web" (the web processes project, nothing else runs) or "web + worker" (and the
        Procfile's `worker` process too)."""
        args, service = self.args, self.targets["service"]
        worker = None
        if deployment == "web + worker":
            env = gunicorn_env(0, args.workers, self.workdir, "worker", args.worker_class,
                               **self.service_settings | {"LOG_LEVEL": "INFO"})
            command = [sys.executable, "-m", "flask", "--app", "webhook_service:create_app()", "worker",
                       "--reconcile-every", "3600"]
            worker = self._start(Server("worker", command, env, 0, "", self.workdir))
            wait_until(lambda: "worker started" in worker.log_path.read_text(errors="replace"), 60,
                       "the worker to start")
        steps: list[Step] = []
        try:
            rates = [request_rate * f for f in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)]
            for rate in rates:
                steps.append(self._step(service, rate))
                if not steps[-1].passed(args.max_lag):
                    if len(steps) > 1:  # halfway between the last rate sustained and this one
                        steps.append(self._step(service, (steps[-2].rate + rate) / 2))
                    break
            for fraction in (0.4, 0.3, 0.2, 0.1):
                if any(step.passed(args.max_lag) for step in steps):
                    break
                steps.append(self._step(service, request_rate * fraction))
        finally:
            if worker is not None:
                self.servers.remove(worker)
                worker.stop()
        return steps

    def _step(self, target: Target, rate: float) -> Step:
        args = self.args
        self.drains.append(self.drain())  # each step starts with nothing due
        log(f"capacity: {rate:.0f} req/s for {args.step_duration:g} s, lag probed at {args.probe_rate:g}/s")
        with self.load.measure() as cpu:  # the probes' own callbacks are a few percent more
            with LagProbe(target.server.url, self.db_url, rate=args.probe_rate) as probe:
                result = self._callbacks(target, args.step_duration, rate=rate)
            probe.settle()
        self.extra_ok += len(probe.acked)
        cpu.pop("other")
        answered = max(result.requests + len(probe.acked), 1)
        step = Step(rate, result, probe.lags(), probe.failed,
                    {name: 1000 * seconds / answered for name, seconds in cpu.items()})
        why = step.failures(args.max_lag)
        log(f"  lag p50 {step.lags[len(step.lags) // 2] if step.lags else math.nan:.3f} s, p99 {step.p99_lag:.3f} s "
            f"over {len(step.lags)} probes: {'sustained' if not why else 'NOT sustained: ' + '; '.join(why)}; CPU "
            f"ms/callback: " + ", ".join(f"{name} {ms:.2f}" for name, ms in step.cpu_ms.items() if ms))
        return step

    def busy_session(self) -> dict[str, object]:
        """One session receiving `--busy-calls` calls' callbacks from 8 senders, beside the same number of
        callbacks spread over many sessions: rates, latency over the first and last tenth, and how
        long one projection of the busy session then takes."""
        args = self.args
        rng = random.Random(args.seed + 5)
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
        busy = PlannedSession(uuid=str(uuid.UUID(int=rng.getrandbits(128), version=4)), first_party="+14155559900",
                              second_party="+16285559900", virtual_number=VIRTUAL_NUMBERS[0], created_at=start,
                              existing=False)
        events: list[tuple[datetime, dict[str, str]]] = []
        at = start
        for _ in range(args.busy_calls):
            events += call_events(busy, at, rng)
            at = events[-1][0] + timedelta(seconds=60)
        busy_stream = []
        seq = 0
        for seq, (_, params) in enumerate(events, 1):
            busy_stream.append(params | {"SequenceNumber": str(seq)})
        spread_stream, _ = callback_stream(len(busy_stream), args.seed + 6)
        url = self.urls["service"] + CALLBACK_PATH
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            feeds = {name: write_callback_feed(self.workdir / f"busy-{name}", self.threads, url, stream, args.seed + 7,
                                               pool, wrap=False)
                     for name, stream in (("spread", spread_stream), ("busy", busy_stream))}
        runs = {}
        for name, feed in feeds.items():
            self.drains.append(self.drain())
            target = Target(name, self.service, feed)
            chunks = []
            total = len(busy_stream)
            for k in range(10):  # ten tenths, one after the other: the first and the last one's latency
                need = total * (k + 1) // 10 - total * k // 10
                base = scalar(self.db_url, INBOX_ROWS)
                chunks.append(self._callbacks_to(target, need, base + need, connections=8))
            self.extra_ok += target.tally.ok
            self.extra_unanswered += target.tally.unanswered
            requests_, seconds = sum(c.requests for c in chunks), sum(c.duration_s for c in chunks)
            runs[name] = {"rate": requests_ / seconds, "first_p50": chunks[0].p50_ms, "last_p50": chunks[-1].p50_ms,
                          "failed": sum(c.failed + c.socket_errors for c in chunks)}
            log(f"  {name}: {runs[name]['rate']:.0f} req/s; p50 first tenth {chunks[0].p50_ms:.2f} ms, "
                f"last tenth {chunks[-1].p50_ms:.2f} ms")
        self.drains.append(self.drain())
        facts = scalar(self.db_url, f"SELECT count(*) FROM callback_facts WHERE session_uuid = '{busy.uuid}'")
        settings = Settings.from_env(self.service_settings | {"DB_STATEMENT_TIMEOUT_MS": "60000"})
        db = Database.connect(self.db_url, settings)
        cold, warm = [], []
        try:
            # Cold: a projector that keeps no copy of the session reads it whole (after a restart, or
            # when another process projected it last). Warm: the projector that projects it while its
            # calls go on, after one more call's callbacks (read the new facts, derive their legs).
            for _ in range(5):
                with psycopg.connect(self.db_url, autocommit=True) as conn:
                    conn.execute("INSERT INTO projection_queue (session_uuid) VALUES (%s)", [busy.uuid])
                started = time.perf_counter()
                Projector(db).project([busy.uuid], wait=True)
                cold.append(time.perf_counter() - started)
            projector = Projector(db)
            projector.project([busy.uuid], wait=True)
            # The new calls go to the server that only stores (same public URL, so they verify there):
            # the service's own projector would project them first, and this one would then read the
            # session whole, or wait for its lock.
            store_url = self.urls["request"] + CALLBACK_PATH
            for _ in range(5):
                events = call_events(busy, at, rng)
                at = events[-1][0] + timedelta(seconds=60)
                for _, params in events:
                    seq += 1
                    params = params | {"SequenceNumber": str(seq)}
                    nonce = "".join(rng.choices(string.digits, k=20))
                    response = requests.post(store_url, data=urlencode(params), timeout=10, headers={
                        "Content-Type": "application/x-www-form-urlencoded", NONCE_HEADER: nonce,
                        SIGNATURE_HEADER: compute_signature("POST", url, params, nonce, AUTH_TOKEN)})
                    response.raise_for_status()
                    self.extra_ok += 1
                started = time.perf_counter()
                outcome = projector.project([busy.uuid], wait=True)
                warm.append(time.perf_counter() - started)
                # Say how many were taken from the kept copy (all five, unless something else projected).
                runs.setdefault("kept", 0)
                runs["kept"] += bool(outcome.projected and outcome.projected[0].legs_kept is not None)
        finally:
            db.dispose()
        runs["projection_ms"] = 1000 * sorted(warm)[len(warm) // 2]
        runs["cold_projection_ms"] = 1000 * sorted(cold)[len(cold) // 2]
        runs["facts"] = facts
        log(f"  one projection of the busy session ({facts} facts), median of 5: after one more call "
            f"{runs['projection_ms']:.1f} ms ({runs['kept']} of 5 from the kept copy); read whole by a projector "
            f"that kept nothing {runs['cold_projection_ms']:.1f} ms")
        return runs

    def _callbacks_to(self, target: Target, need: int, inbox_rows: int, *, connections: int) -> WrkResult:
        """Send `need` more callbacks from the target's feed as fast as it answers; done when the inbox
        holds `inbox_rows` rows."""
        quotas = share_out(need, target.feed.remaining())
        return target.tally.add(run_wrk(target.server.url, "POST", CALLBACK_PATH, target.feed,
                                        headers=[f"Content-Type: {FORM}"], duration=600, connections=connections,
                                        quotas=quotas, until=_progress_watch(self.db_url, inbox_rows)))

    def sessions_api(self) -> dict[str, Measured]:
        """POST /v1/sessions on the service (which calls the sandbox Plivo), and the same requests to the bare view."""
        args, results = self.args, {}
        headers = ["Content-Type: application/json", f"Authorization: Bearer {API_TOKEN}"]
        for key, server, feed in (("service", self.service, self.sessions_feed),
                                  ("bare", self.targets["bare"].server, self.sessions_feed.reuse(wrap=True))):
            log(f"POST /v1/sessions on {key}: {args.warmup:g} s warm-up, then {args.sessions_duration:g} s measured")
            tally = Tally()

            def run(seconds: float, server: Server = server, feed: Feed = feed, tally: Tally = tally) -> WrkResult:
                return tally.add(run_wrk(server.url, "POST", SESSIONS_PATH, feed, headers=headers, duration=seconds,
                                         connections=args.sessions_connections))

            results[key] = self._measured(lambda run=run: run(args.warmup), lambda run=run: run(args.sessions_duration))
            if tally.failed or tally.socket_errors or tally.exhausted:
                self.problems.append(f"POST /v1/sessions on {key}: {tally.failed} non-2xx answers, "
                                     f"{tally.socket_errors} socket errors, feed ran out {tally.exhausted} times")
        return results

    def memory(self, samples: list[RssSample]) -> list[RssSample]:
        """Add the workers' RSS once the service has received half of `--callbacks`, then all of them."""
        service = self.targets["service"]
        for share in (self.args.callbacks // 2, self.args.callbacks):
            need = share - scalar(self.db_url, INBOX_ROWS)
            if need > 0:
                log(f"memory: {need} more callbacks to the service, to {share} in all")
                quotas = share_out(need, service.feed.remaining())
                self._callbacks(service, 3600, quotas=quotas, until=_progress_watch(self.db_url, share))
            samples.append(self.rss_sample())
        return samples

    def rss_sample(self) -> RssSample:
        """(callbacks received so far, the service's workers, their RSS in bytes)."""
        workers = self.service.workers()
        return scalar(self.db_url, INBOX_ROWS), workers, [w.memory_info().rss for w in workers]

    # Checks and report ----------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Everything that would make the numbers meaningless (empty: all good)."""
        wait_until(lambda: scalar(self.db_url, "SELECT count(*) FROM projection_queue") == 0,
                   120, "the service to project every stored callback")
        problems = list(self.problems) + self.tally_problems()
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            self.inbox = dict(conn.execute("SELECT status, count(*) FROM callback_inbox GROUP BY status").fetchall())
            naive_rows = conn.execute("SELECT count(*) FROM bench_callbacks").fetchone()[0]
            store_rows = conn.execute("SELECT count(*) FROM bench_stored").fetchone()[0]
        if set(self.inbox) - {"recorded"}:
            problems.append(f"service: inbox rows not recorded: {self.inbox}")
        for keys, stored in ((("request", "service"), sum(self.inbox.values())), (("orm",), naive_rows),
                             (("store",), store_rows)):
            ok = sum(self.targets[key].tally.ok for key in keys) + (self.extra_ok if "service" in keys else 0)
            unanswered = sum(self.targets[key].tally.unanswered for key in keys) + (
                self.extra_unanswered if "service" in keys else 0)
            # Requests wrk wrote but had no answer to when it stopped may or may not have been handled.
            if not ok <= stored <= ok + unanswered:
                problems.append(f"{'+'.join(keys)}: {stored} rows stored for {ok} 2xx answers "
                                f"(+{unanswered} unanswered)")
        return problems

    def tally_problems(self) -> list[str]:
        """What the targets' answers say is wrong with the numbers: non-2xx, socket errors, feeds run out."""
        problems = []
        for key, target in self.targets.items():
            t = target.tally
            if t.failed or t.socket_errors:
                problems.append(f"{key}: {t.failed} non-2xx answers, {t.socket_errors} socket errors")
            if t.exhausted:
                problems.append(f"{key}: its feed ran out {t.exhausted} times (raise --callbacks or --baseline-feed)")
        return problems

    def report(self, rounds: dict[str, list[Measured]], paced: Measured, capacity: dict[str, list[Step]],
               busy: dict[str, Any], sessions: dict[str, Measured], rss: list[RssSample], problems: list[str]) -> None:
        """The tables, then the latency, busy session, sessions API, RSS and check lines (stdout)."""
        args, met = self.args, {True: "met", False: "NOT met"}
        throughput, store_rate, orm_rate, request = self.report_throughput(rounds)
        for deployment, steps in capacity.items():
            best = max((step for step in steps if step.passed(args.max_lag)), key=lambda step: step.rate, default=None)
            sustained = best.rate if best is not None else 0.0
            print(f"sustained capacity, {deployment}: {sustained:.0f} req/s = {sustained / orm_rate:.2f} x naive ORM "
                  f"(goal >= 2: {met[sustained >= 2 * orm_rate]}), {sustained / store_rate:.2f} x store only, "
                  f"{sustained / request:.2f} x the request path; steps (req/s offered: achieved, lag p99): "
                  + "; ".join(f"{step.rate:.0f}: {step.result.rate:.0f}, {step.p99_lag:.2f} s"
                              + "".join(f" FAIL ({why})" for why in step.failures(args.max_lag)[:1])
                              for step in steps))
            if best is not None:
                print(f"  CPU ms per callback at {best.rate:.0f} req/s, {deployment}: " + ", ".join(
                    f"{name} {ms:.2f}" for name, ms in best.cpu_ms.items() if ms))
        ratio = busy["busy"]["rate"] / busy["spread"]["rate"]
        latency = busy["busy"]["last_p50"] / busy["busy"]["first_p50"]
        print(f"busy session ({args.busy_calls} calls, {busy['facts']} callbacks, 8 senders): "
              f"{busy['busy']['rate']:.0f} req/s against {busy['spread']['rate']:.0f} spread over many sessions = "
              f"{ratio:.2f} (goal >= 0.8: {met[ratio >= 0.8]}); p50 last tenth / first tenth "
              f"{busy['busy']['last_p50']:.2f} / "
              f"{busy['busy']['first_p50']:.2f} ms = {latency:.2f} (goal <= 1.5: {met[latency <= 1.5]}); one "
              f"projection of it after one more call {busy['projection_ms']:.1f} ms (goal < 50 ms: "
              f"{met[busy['projection_ms'] < 50]}); read whole by a projector that kept nothing (after a restart) "
              f"{busy['cold_projection_ms']:.1f} ms")
        p = paced.result
        behind = "; it could not keep up, so this is its latency when saturated" if p.rate < 0.95 * args.rate else ""
        print(f"webhook path at {args.rate:g} req/s: achieved {p.rate:.1f} req/s, p50 {p.p50_ms:.2f} ms, "
              f"p99 {p.p99_ms:.2f} ms (goal p99 < 20 ms: {met[p.p99_ms < 20]}{behind})")
        s, b, cpu = sessions["service"].result, sessions["bare"].result, sessions["service"].cpu_ms
        print(f"POST /v1/sessions ({args.sessions_connections} connections, {args.sessions_duration:g} s): service "
              f"(-> sandbox Plivo) {s.rate:.0f} req/s, p50 {s.p50_ms:.2f} ms, p99 {s.p99_ms:.2f} ms (CPU ms/req: "
              f"service {cpu['service']:.2f}, postgres {cpu['postgres']:.2f}, sandbox {cpu['sandbox']:.2f}); "
              f"bare view, same requests: {b.rate:.0f} req/s, p50 {b.p50_ms:.2f} ms, p99 {b.p99_ms:.2f} ms")
        for count, workers, sizes in rss:
            text = ", ".join(f"worker {w.pid} {size / 2**20:6.1f} MB" for w, size in zip(workers, sizes, strict=True))
            print(f"service RSS after {count:>7,} callbacks: {text}")
        (_, first_workers, half), (_, last_workers, full) = rss[-2], rss[-1]
        if [w.pid for w in first_workers] == [w.pid for w in last_workers]:
            growth = ", ".join(f"{(after - before) / 2**20:+.1f} MB" for before, after in zip(half, full, strict=True))
            print(f"service RSS growth over the second half: {growth}")
        else:
            problems.append("the service's workers changed during the run (one was restarted): RSS not comparable")
        others = [(self.targets[k].label, throughput[k].other_cpu) for k in rounds]  # of the median round
        others += [(f"{args.rate:g} req/s", paced.other_cpu)]
        others += [(f"sessions on {k}", m.other_cpu) for k, m in sessions.items()]
        print("other processes' CPU during each measured run (share of all cores): "
              + ", ".join(f"{label} {share:.0f}%" for label, share in others)
              + ("  <- too busy: rerun on a quieter machine" if max(x for _, x in others) > args.max_other_cpu else ""))
        ok = sum(self.targets[k].tally.ok for k in ("request", "service"))
        print(f"checks: the service answered {ok} callbacks 2xx; inbox {sum(self.inbox.values())} rows {self.inbox}; "
              + ("all good" if not problems else "PROBLEMS:"))
        for problem in problems:
            print(f"  - {problem}")

    def report_throughput(self, rounds: dict[str, list[Measured]]) -> tuple[dict[str, Measured], float, float, float]:
        """The throughput table and the request path's goals; (each target's median round, store-only,
        naive ORM and request path req/s)."""
        args = self.args
        throughput = {key: runs[len(runs) // 2] for key, runs in rounds.items()}  # each target's median round
        store_rate, orm_rate = throughput["store"].result.rate, throughput["orm"].result.rate
        threads = os.environ.get("GUNICORN_THREADS", "4")
        met = {True: "met", False: "NOT met"}
        print(f"\nwebhook benchmark: {os.cpu_count()} cores; every target under gunicorn -c gunicorn.conf.py, "
              f"{args.workers} {args.worker_class or os.environ.get('GUNICORN_WORKER_CLASS', 'gevent')} workers "
              f"({threads} threads each under gthread); wrk {args.threads} threads, "
              f"{args.connections} connections, {args.duration:g} s after a {args.warmup:g} s warm-up, "
              f"{args.rounds} interleaved rounds: each target's median round")
        print(f"postgres: {server_facts(self.db_url)}\n")
        print(f"{'target':<32} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'x store only':>13} {'x naive ORM':>12}"
              f"   {'CPU ms/req: app':>15} {'postgres':>8}")
        for key, target in self.targets.items():
            r, cpu = throughput[key].result, throughput[key].cpu_ms
            print(f"{target.label:<32} {r.rate:7.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.rate / store_rate:13.2f} "
                  f"{r.rate / orm_rate:12.2f}   {cpu[target.server.name]:15.2f} {cpu['postgres']:8.2f}")
        print("rounds, req/s (slowest first): " + "; ".join(
            f"{self.targets[key].label} {', '.join(f'{m.result.rate:.0f}' for m in runs)}"
            for key, runs in rounds.items()))
        drained = [(n, t) for n, t in self.drains if n >= 1000]
        if drained:
            print("projecting a backlog (one projector, batches of 100 sessions): " + ", ".join(
                f"{n} facts in {t:.1f} s" for n, t in drained))
        request = throughput["request"].result.rate
        print(f"\ngoals, request path: >= 0.8 x store only: {request / store_rate:.2f} "
              f"({met[request >= 0.8 * store_rate]}); >= 2.5 x naive ORM: {request / orm_rate:.2f} "
              f"({met[request >= 2.5 * orm_rate]})")
        return throughput, store_rate, orm_rate, request

    def run(self) -> int:
        self.prepare()
        rss = [self.rss_sample()]  # before any traffic
        throughput = self.throughput()
        if self.args.throughput_only:
            self.report_throughput(throughput)
            problems = self.tally_problems()
            print("checks: " + ("all good" if not problems else "PROBLEMS:"))
            for problem in problems:
                print(f"  - {problem}")
            return 1 if problems else 0
        paced = self.paced()
        request_rate = throughput["request"][len(throughput["request"]) // 2].result.rate
        capacity = {deployment: self.capacity(deployment, request_rate) for deployment in ("web", "web + worker")}
        busy = self.busy_session()
        sessions = self.sessions_api()
        rss = self.memory(rss)
        log("checking what the servers stored")
        problems = self.check()
        self.report(throughput, paced, capacity, busy, sessions, rss, problems)
        return 1 if problems else 0


def _progress_watch(db_url: str, target: int, stall_s: float = 30) -> Callable[[], bool]:
    """A predicate: has the service's inbox reached `target` rows? Raises if the count stops moving."""
    state = {"count": -1, "since": time.monotonic()}

    def reached() -> bool:
        count = scalar(db_url, INBOX_ROWS)
        if count != state["count"]:
            state.update(count=count, since=time.monotonic())
        elif time.monotonic() - state["since"] > stall_s:
            raise RuntimeError(f"the service stopped storing callbacks at {count} (wanted {target})")
        return count >= target

    return reached


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        log("wrk is not installed: apt-get install -y wrk (or run `make bench-webhooks`)")
        return 2
    with ExitStack() as stack:  # stops every server, drops the database and deletes the feeds, whatever happens
        return Bench(args, stack).run()


if __name__ == "__main__":
    sys.exit(main())
