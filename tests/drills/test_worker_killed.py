"""Drill: gunicorn workers killed with SIGKILL in the middle of a load of callbacks.

A killed worker's in-flight requests get no answer, and its open transactions are rolled back by
Postgres: no callback may be half-applied. The master must start a new worker in its place. After
re-delivery (and the operator's replay of rows left pending) the totals must be exact, with no
inbox row left pending or failed. See `harness.recover_and_verify`.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from .harness import (
    Load,
    create_sessions,
    endpoint_of,
    generate_callbacks,
    plivo_totals,
    received_params,
    recover_and_verify,
    reference_snapshots,
    service_env,
    split,
    tally,
)

SESSIONS = 12
CALLS = 5  # per session: about 400 callbacks in all
SENDERS = 8  # more senders than a worker has threads, so each worker has requests in flight when killed
PACE = 0.03  # keeps the load going for a few seconds, past the replacement of the first killed worker
KILLS = (0.25, 0.5, 0.75)  # fractions of the load sent when a worker is killed


def busiest_worker(service, wait: float = 2.0) -> tuple[int, int]:
    """The worker with the most requests in flight (at least two if that happens within `wait` seconds).

    Killing a worker that happens to be idle would test nothing: its requests must die mid-way.
    """
    started = time.monotonic()
    while True:
        in_flight = service.in_flight()
        waited = time.monotonic() - started
        if in_flight:
            pid = max(in_flight, key=in_flight.get)
            # Two or more at once if that comes within `wait`, else one; after twice as long, any.
            if in_flight[pid] >= 2 or (in_flight[pid] and waited > wait) or waited > 2 * wait:
                return pid, in_flight[pid]
        elif waited > 2 * wait:
            raise TimeoutError("no gunicorn worker to kill")
        time.sleep(0.002)


@pytest.mark.slow
def test_worker_killed_mid_load(drill_cluster, drill_db, drill_engine, drill_sandbox, start_service, drill_report):
    service = start_service(service_env(drill_db, drill_sandbox.url))
    uuids = create_sessions(service.url, SESSIONS)
    callbacks = generate_callbacks(drill_sandbox, uuids, CALLS)
    expected = plivo_totals(drill_sandbox, uuids, callbacks)
    reference = reference_snapshots(drill_cluster, service.env,
                                    [(endpoint_of(c), received_params(c)) for c in callbacks], uuids)
    drill_report.update(sessions=SESSIONS, callbacks=len(callbacks), senders=SENDERS)
    drill_report.phase("setup")

    order = list(range(len(callbacks)))
    random.Random(11).shuffle(order)
    load = Load(split([(i, callbacks[i], None) for i in order], SENDERS), pace=PACE).start()
    kills = []
    for fraction in KILLS:
        load.wait_for(fraction)
        workers = service.worker_pids()
        victim, busy = busiest_worker(service)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # The master notices the death and forks a replacement: a new pid, and as many workers as before.
        replaced = service.wait_workers(len(workers), timeout=30, excluding={victim})
        kills.append(f"pid {victim} with {busy} requests in flight -> {sorted(replaced - workers)} "
                     f"in {time.monotonic() - killed_at:.2f} s")
    answers = load.join()

    drill_report.update({"workers killed": kills, "load answers": tally(answers)})
    assert not [a for a in answers if a.kind == "503"], f"503s without a database fault: {tally(answers)}"
    assert [a for a in answers if a.kind == "error"], "no request was cut short: the drill tested nothing"
    drill_report.phase("load")
    recover_and_verify(drill_engine, drill_cluster, service.env, callbacks, answers, expected, reference,
                       drill_report)
