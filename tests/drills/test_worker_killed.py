"""Drill: gunicorn workers killed with SIGKILL in the middle of a load of callbacks.

Each kill hits a worker while callbacks it handles wait inside their transactions (the drill holds
their session's row lock), so requests are certainly cut short. They get no answer, and each of
their callbacks is applied whole or not at all, never half: a leg callback's single statement has
reached Postgres and completes once the lock is released (its re-delivery is then a duplicate);
a callback on the Python path killed between its two round trips is rolled back. The master must
start a new worker in its place. After re-delivery (and the operator's replay of rows left
pending) the totals must be exact, with no inbox row left pending or failed. See `harness.recover_and_verify`.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import text

from .harness import (
    create_sessions,
    plan_calls,
    recover_and_verify,
    service_env,
    shuffled_load,
    tally,
)

SESSIONS = 12
CALLS = 5  # per session: about 400 callbacks in all
SENDERS = 8  # more senders than a worker has threads, so each worker has requests in flight when killed
PACE = 0.03  # keeps the load going for a few seconds, past the replacement of the first killed worker
KILLS = (0.25, 0.5, 0.75)  # fractions of the load sent when a worker is killed


def worker_blocked_in_a_transaction(service, engine, session_uuid: str, wait: float = 15.0) -> tuple[int, int]:
    """Hold the session's row lock until callbacks for it wait inside their transactions; return the
    worker that has the most of them waiting, and how many.

    A request takes a millisecond or two: killing a worker that merely looks busy often kills it
    between requests, which tests nothing. A request blocked on the lock is certainly mid-way.
    """
    blocked = text("SELECT client_port FROM pg_stat_activity"
                   " WHERE datname = current_database() AND wait_event_type = 'Lock' AND client_port > 0")
    deadline = time.monotonic() + wait
    with engine.connect() as holder, holder.begin():
        holder.execute(text("SELECT 1 FROM masking_sessions WHERE session_uuid = :uuid FOR UPDATE"),
                       {"uuid": session_uuid})
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                ports = {port for (port,) in conn.execute(blocked)}
            waiting = service.connections_from(ports)
            if waiting and max(waiting.values()) > 0:
                victim = max(waiting, key=waiting.get)
                os.kill(victim, signal.SIGKILL)  # before the lock is released: its requests are mid-way
                return victim, waiting[victim]
            time.sleep(0.005)
    raise TimeoutError(f"no callback for session {session_uuid} came to wait on its lock")


@pytest.mark.slow
def test_worker_killed_mid_load(drill_cluster, drill_db, drill_engine, drill_sandbox, start_service, drill_report):
    service = start_service(service_env(drill_db, drill_sandbox.url))
    uuids = create_sessions(service.url, SESSIONS)
    callbacks, expected, reference = plan_calls(drill_cluster, drill_sandbox, service.env, uuids, CALLS)
    drill_report.update(sessions=SESSIONS, callbacks=len(callbacks), senders=SENDERS)
    drill_report.phase("setup")

    load = shuffled_load(callbacks, SENDERS, seed=11, pace=PACE)
    kills = []
    for fraction in KILLS:
        load.wait_for(fraction)
        workers = service.worker_pids()
        victim, busy = worker_blocked_in_a_transaction(service, drill_engine, uuids[len(kills)])
        killed_at = time.monotonic()
        # The master notices the death and forks a replacement: a new pid, and as many workers as before.
        replaced = service.wait_workers(len(workers), timeout=30, excluding={victim})
        kills.append(f"pid {victim} with {busy} requests waiting in a transaction -> {sorted(replaced - workers)} "
                     f"in {time.monotonic() - killed_at:.2f} s")
    answers = load.join()

    drill_report.update({"workers killed": kills, "load answers": tally(answers)})
    assert not [a for a in answers if a.kind == "503"], f"503s without a database fault: {tally(answers)}"
    assert [a for a in answers if a.kind == "error"], "no request was cut short: the drill tested nothing"
    drill_report.phase("load")
    recover_and_verify(drill_engine, drill_cluster, service.env, callbacks, answers, expected, reference,
                       drill_report)
