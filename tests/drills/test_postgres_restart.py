"""Drill: PostgreSQL restarted in the middle of a load of callbacks.

Callbacks sent while the database is down must get a quick 503 (nothing stored); every callback
that got a 2xx must be in the inbox with its fact, exactly once; redelivering what did not get a
2xx must complete the record, exactly: every leg, total and day as the drill planned them. See
`harness.recover_and_verify`.

The database goes down twice during one load: a clean restart (`pg_ctl stop -m fast`: sessions
terminated, in-flight transactions rolled back) and a crash (`-m immediate`: every backend killed,
crash recovery at the next start).
"""

from __future__ import annotations

import time

import pytest

from .harness import (
    create_sessions,
    percentile,
    plan_calls,
    recover_and_verify,
    service_env,
    shuffled_load,
    tally,
)

SESSIONS = 12
CALLS = 5  # per session: about 400 callbacks in all
SENDERS = 6
# Each sender waits this long between callbacks, so the load lasts well beyond both outages
# (about 14 s): without it the senders would race through their slices with quick 503s while the
# database is down, and nothing would be left to send once it is back.
PACE = 0.2
OUTAGES = ((0.15, "fast"), (0.55, "immediate"))  # (fraction of the load sent before, pg_ctl stop mode)
DOWN_SECONDS = 3.0
MAX_503_LATENCY = 2.0  # DB_CONNECT_TIMEOUT=1: "database down" is answered without waiting long


@pytest.mark.slow
def test_postgres_restart_mid_load(drill_cluster, drill_db, drill_engine, drill_sandbox, start_service, drill_report):
    service = start_service(service_env(drill_db, drill_sandbox.url))
    uuids = create_sessions(service.url, SESSIONS)
    callbacks, expected = plan_calls(drill_sandbox, uuids, CALLS)
    drill_report.update(sessions=SESSIONS, callbacks=len(callbacks), senders=SENDERS)
    drill_report.phase("setup")

    # The load: every callback once, in a shuffled order, with the database down twice on the way.
    load = shuffled_load(callbacks, SENDERS, seed=7, pace=PACE)
    outages = []
    try:
        for fraction, mode in OUTAGES:
            load.wait_for(fraction)
            down = time.monotonic()
            drill_cluster.stop(mode)
            time.sleep(DOWN_SECONDS)
            drill_cluster.start()
            outages.append(f"{mode}: {time.monotonic() - down:.2f} s")
    finally:
        drill_cluster.ensure_running()
    answers = load.join()
    ready_after = service.wait_ready()

    unavailable = [a.latency for a in answers if a.kind == "503"]
    drill_report.update({
        "postgres down (stop mode: seconds)": outages,
        "load answers": tally(answers),
        "503 latency max / p50, s": (round(max(unavailable, default=0), 3), round(percentile(unavailable, 0.5), 3)),
        "service ready after the load, s": round(ready_after, 2),
    })
    assert len(unavailable) > 20, "few callbacks met the outages: the drill tested little"
    assert max(unavailable) < MAX_503_LATENCY, f"a 503 took {max(unavailable):.2f} s"
    drill_report.phase("load")
    recover_and_verify(drill_engine, service.env, callbacks, answers, expected, drill_report)
