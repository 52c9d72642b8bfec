"""Drill: the projector (the `worker` process) SIGKILLed in the middle of a projection, then restarted.

The web instance only stores callbacks (PROJECT_IN_WEB=false): every projection is the worker's.
While a load of callbacks runs, the drill holds the worker inside a projection (a trigger on
`call_legs` waits on an advisory lock the drill owns), so the worker certainly has sessions claimed
and writes half made when it is killed. Its transaction never commits: once the lock is let go, its
backend finds its client gone and rolls back, releasing the sessions. A new worker claims them
again; nothing is lost (every fact's queue row is still there) and nothing is projected twice (the
record is exactly what the drill planned, daily totals included).
"""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import text

from ..helpers import queued, wait_for_lock, wait_until, writes_held
from .harness import (
    WorkerProcess,
    check_exact,
    create_sessions,
    plan_calls,
    service_env,
    shuffled_load,
    tally,
)

SESSIONS = 12
CALLS = 4
SENDERS = 6
PACE = 0.02
HOLD = 4249


@pytest.mark.slow
def test_projector_killed_mid_projection(drill_db, drill_engine, drill_sandbox, start_service, tmp_path,
                                         drill_report):
    env = service_env(drill_db, drill_sandbox.url, PROJECT_IN_WEB="false")
    service = start_service(env)
    uuids = create_sessions(service.url, SESSIONS)
    callbacks, expected = plan_calls(drill_sandbox, uuids, CALLS)
    worker = WorkerProcess(tmp_path, service.env, name="worker-1").start()
    drill_report.update(sessions=SESSIONS, callbacks=len(callbacks))
    drill_report.phase("setup")
    try:
        load = shuffled_load(callbacks, SENDERS, seed=3, pace=PACE)
        load.wait_for(0.4)
        with writes_held(drill_engine, "call_legs", HOLD, events="INSERT OR UPDATE") as release:
            wait_for_lock(drill_engine, "%call_legs%", timeout=20)  # the worker writes legs, held
            with drill_engine.connect() as conn:
                claimed = conn.execute(text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.relation = 'masking_sessions'::regclass AND l.mode = 'RowShareLock'"
                    " AND a.wait_event = 'advisory'")).scalar()
            assert claimed > 0, "the held projection has no session locked"
            worker.kill(signal.SIGKILL)  # mid-projection: sessions claimed, writes under way
            # The dead worker's backend finishes its statement, finds its client gone, and rolls back.
            release()
        due_when_killed = queued(drill_engine)
        answers = load.join()
        drill_report.phase("load")
        assert {a.kind for a in answers} == {"2xx"}, tally(answers)

        restarted = WorkerProcess(tmp_path, service.env, name="worker-2").start()
        try:
            started = time.monotonic()
            wait_until(lambda: queued(drill_engine) == 0, timeout=60, alive=lambda: restarted.proc.poll() is None)
            drill_report.update({"load answers": tally(answers), "facts due when killed": due_when_killed,
                                 "projector's lock on sessions when killed": claimed,
                                 "due after the restart, s": round(time.monotonic() - started, 2)})
            assert queued(drill_engine) == 0, "the restarted worker did not project everything"
        finally:
            restarted.stop()
    finally:
        worker.stop()
    drill_report.phase("restart")
    problems = check_exact(drill_engine, service.env, callbacks, expected)
    drill_report.phase("verify")
    assert not problems, "\n".join(problems)
