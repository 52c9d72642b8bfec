"""Drill: gunicorn workers killed with SIGKILL in the middle of a load of callbacks, in the commit window.

Each kill hits a worker while callbacks it handles are inside their one statement, after the inbox
row and the fact are written and before the commit (the drill holds them there: a trigger on the
projection queue waits on an advisory lock the drill owns). The worker is killed, and the database
connections it held are terminated too, as when a machine dies: their transactions roll back. So
those callbacks are not stored, and their senders got no answer; had the service answered before
its commit, those answers would be 2xx for callbacks that are not stored, and the check after the
load would find them. The master must start a new worker in its place. After redelivery (new
nonces, as Plivo's), the record must be exactly what the drill planned. See `harness.recover_and_verify`.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import text

from ..helpers import writes_held
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
HOLD = 4247  # the advisory lock the trigger waits on


def kill_a_worker_in_the_commit_window(service, engine, session_uuid: str, wait: float = 15.0) -> tuple[int, int]:
    """Hold the session's callbacks before their commit until some wait there; SIGKILL the worker with
    the most of them, terminate its held connections (their transactions roll back), let go.
    Returns the worker killed and how many of its callbacks were held."""
    held = text("SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory' AND query LIKE '%callback_inbox%'")
    deadline = time.monotonic() + wait
    # The session's callbacks wait inside their statement, before they commit (let go on the way out).
    with writes_held(engine, "projection_queue", HOLD, when=f"NEW.session_uuid = '{session_uuid}'"):
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                backends = dict(conn.execute(held).all())  # pid -> client port
            waiting = service.connections_from(set(backends.values()))
            if waiting and max(waiting.values()) > 0:
                victim = max(waiting, key=waiting.get)
                ports = service.client_ports(victim)
                os.kill(victim, signal.SIGKILL)  # its requests are in the commit window: no answer
                with engine.connect() as conn:  # a dead machine's connections die with it
                    for pid, port in backends.items():
                        if port in ports:
                            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                return victim, waiting[victim]
            time.sleep(0.005)
    raise TimeoutError(f"no callback for session {session_uuid} came to wait before its commit")


@pytest.mark.slow
def test_worker_killed_mid_load(drill_cluster, drill_db, drill_engine, drill_sandbox, start_service, drill_report):
    service = start_service(service_env(drill_db, drill_sandbox.url))
    uuids = create_sessions(service.url, SESSIONS)
    callbacks, expected = plan_calls(drill_sandbox, uuids, CALLS)
    drill_report.update(sessions=SESSIONS, callbacks=len(callbacks), senders=SENDERS)
    drill_report.phase("setup")

    load = shuffled_load(callbacks, SENDERS, seed=11, pace=PACE)
    kills = []
    for fraction in KILLS:
        load.wait_for(fraction)
        workers = service.worker_pids()
        victim, held = kill_a_worker_in_the_commit_window(service, drill_engine, uuids[len(kills)])
        killed_at = time.monotonic()
        # The master notices the death and forks a replacement: a new pid, and as many workers as before.
        replaced = service.wait_workers(len(workers), timeout=30, excluding={victim})
        kills.append(f"pid {victim} with {held} callbacks held before their commit -> {sorted(replaced - workers)} "
                     f"in {time.monotonic() - killed_at:.2f} s")
    answers = load.join()

    drill_report.update({"workers killed": kills, "load answers": tally(answers)})
    assert not [a for a in answers if a.kind == "503"], f"503s without a database fault: {tally(answers)}"
    assert [a for a in answers if a.kind == "error"], "no request was cut short: the drill tested nothing"
    drill_report.phase("load")
    recover_and_verify(drill_engine, service.env, callbacks, answers, expected, drill_report)
