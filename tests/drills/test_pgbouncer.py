"""Drills through PgBouncer (Debian's `pgbouncer`) in transaction pooling mode.

Many nodes x workers x pool connections exceed PostgreSQL's `max_connections`; a transaction pooler
in between gives each transaction any server connection. The service runs with
DB_TRANSACTION_POOLER=true (no server-side prepared statements, no session settings in the startup
packet: the timeouts and TimeZone are the database's, set with `ALTER DATABASE … SET` as
docs/deploy.md says), through a pooler of 8 server connections for 2 x 2 workers whose pools hold
up to 10 each.

* The two-instances drill (every callback three times, to either instance, re-signed), with no
  DATABASE_DIRECT_URL: no process can keep the leader lock, so every projector polls and projects
  (sessions claimed with SKIP LOCKED); they must project everything by themselves, then the record
  is exactly the plan's.
* A worker-killed load: three times, while some callbacks wait inside their statement before their
  commit, every gunicorn worker is SIGKILLed (their server connections are PgBouncer's, which ends
  the transaction of a client that went away); the `worker` process leads through
  DATABASE_DIRECT_URL. Then Plivo's redelivery and the exact verdict (`recover_and_verify`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from ..helpers import queued, wait_until, writes_held
from .harness import (
    PgBouncer,
    WorkerProcess,
    create_sessions,
    new_engine,
    plan_calls,
    recover_and_verify,
    service_env,
    shuffled_load,
    tally,
)
from .test_two_instances import two_instances_load

HOLD = 4248  # the advisory lock the held callbacks wait on


@pytest.fixture
def pgbouncer(drill_cluster) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(drill_cluster, pool_size=8).start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pooled_db(drill_db, drill_engine, pgbouncer) -> str:
    """The drill's database through the pooler, with the session settings the service cannot send."""
    name = drill_engine.url.database
    with drill_engine.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" SET statement_timeout = 5000'))
        conn.execute(text(f'ALTER DATABASE "{name}" SET lock_timeout = 5000'))
        conn.execute(text(f"""ALTER DATABASE "{name}" SET "TimeZone" = 'UTC'"""))
        conn.commit()
    return pgbouncer.url(drill_db)


def server_connections(engine, database: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db"
                                 " AND application_name = 'webhook_service'"), {"db": database}).scalar()


@pytest.mark.slow
def test_two_instances_through_pgbouncer_project_by_polling_without_a_leader(
        pooled_db, drill_engine, drill_sandbox, start_service, drill_report):
    two_instances_load(pooled_db, drill_engine, drill_sandbox, start_service, drill_report, projected_within=30,
                       DB_TRANSACTION_POOLER="true")
    seen = server_connections(drill_engine, drill_engine.url.database)
    drill_report["server connections of the service afterwards"] = seen
    assert 0 < seen <= 8, seen


def kill_every_worker_in_the_commit_window(service, engine, session_uuid: str, wait: float = 15.0) -> int:
    """Hold the session's callbacks inside their statement (before their commit) until some wait
    there, then SIGKILL every gunicorn worker: whichever holds them, its requests get no answer.
    PgBouncer's server connections stay, so it is PgBouncer that must end their transactions."""
    held = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory' AND query LIKE '%callback_inbox%'")
    deadline = time.monotonic() + wait
    with writes_held(engine, "projection_queue", HOLD, when=f"NEW.session_uuid = '{session_uuid}'"):
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                waiting = conn.execute(held).scalar()
            if waiting:
                for pid in service.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                return waiting
            time.sleep(0.005)
    raise TimeoutError(f"no callback for session {session_uuid} came to wait before its commit")


@pytest.mark.slow
def test_workers_killed_mid_load_through_pgbouncer(drill_db, pooled_db, drill_engine, drill_sandbox, start_service,
                                                   tmp_path, drill_report):
    env = service_env(pooled_db, drill_sandbox.url, DB_TRANSACTION_POOLER="true", DATABASE_DIRECT_URL=drill_db)
    service = start_service(env)
    worker = WorkerProcess(tmp_path, env).start()
    try:
        uuids = create_sessions(service.url, 12)
        callbacks, expected = plan_calls(drill_sandbox, uuids, 5)
        drill_report.update(callbacks=len(callbacks))
        drill_report.phase("setup")

        load = shuffled_load(callbacks, 8, seed=17, pace=0.03)
        kills = []
        for n, fraction in enumerate((0.25, 0.5, 0.75)):
            load.wait_for(fraction)
            workers = service.worker_pids()
            held = kill_every_worker_in_the_commit_window(service, drill_engine, uuids[n])
            killed_at = time.monotonic()
            replaced = service.wait_workers(len(workers), timeout=30, excluding=workers)
            kills.append(f"{sorted(workers)} with {held} callbacks held before their commit -> {sorted(replaced)} "
                         f"in {time.monotonic() - killed_at:.2f} s")
        answers = load.join()
        drill_report.update({"workers killed": kills, "load answers": tally(answers)})
        drill_report.phase("load")
        assert [a for a in answers if a.kind == "error"], "no request was cut short: the drill tested nothing"
        # The worker leads (through DATABASE_DIRECT_URL) and keeps up by itself.
        assert wait_until(lambda: queued(drill_engine) == 0, timeout=30), f"{queued(drill_engine)} facts unprojected"
        with new_engine(drill_db).connect() as conn:
            leader = conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 1886547818")).scalar()
        assert leader == 1, "no projector holds the leader lock through DATABASE_DIRECT_URL"
        recover_and_verify(drill_engine, service.env, callbacks, answers, expected, drill_report)
    finally:
        worker.stop()
