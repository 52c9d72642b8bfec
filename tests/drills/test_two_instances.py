"""Drill: two gunicorn instances (two machines behind a load balancer) on one database.

Both run with the same PUBLIC_BASE_URL, the load balancer's address, which is what Plivo signs;
each callback is delivered three times, to either instance, the copies from different sender
threads at about the same moment, the callbacks of every session interleaved and out of order.
Each callback must be recorded exactly once (one "recorded" answer, every other copy a
"duplicate", including the copies re-signed with new nonces as Plivo's redeliveries are), and the
record must be exactly what the drill planned.
"""

from __future__ import annotations

import random

import pytest

from ..helpers import queued, wait_until
from .harness import (
    Load,
    check_exact,
    create_sessions,
    percentile,
    plan_calls,
    service_env,
    split,
    tally,
)

LOAD_BALANCER = "https://masking.drill.invalid"  # signed by Plivo, never connected to
SESSIONS = 10
CALLS = 4  # per session: about 270 callbacks, each sent 3 times
COPIES = 3
SENDERS = 8


@pytest.mark.slow
def test_two_instances_one_database(drill_cluster, drill_db, drill_engine, drill_sandbox, start_service,
                                    drill_report):
    two_instances_load(drill_db, drill_engine, drill_sandbox, start_service, drill_report)


def two_instances_load(drill_db, drill_engine, drill_sandbox, start_service, drill_report, *,
                       projected_within: float | None = None, **overrides: str) -> None:
    """The drill, on `drill_db` with the service's settings changed by `overrides` (also run through
    PgBouncer: tests/drills/test_pgbouncer.py). `projected_within`: the instances' own projectors must
    have projected everything within that many seconds after the load, before the verdict."""
    env = service_env(drill_db, drill_sandbox.url, LOAD_BALANCER, **overrides)
    instances = [start_service(env, name, wait=False) for name in ("a", "b")]
    for instance in instances:
        instance.wait_started()
    a, b = instances
    # Sessions created through either instance; all their calls' callbacks are signed for the balancer.
    uuids = create_sessions(a.url, SESSIONS // 2) + create_sessions(b.url, SESSIONS - SESSIONS // 2,
                                                                    first=SESSIONS // 2)
    callbacks, expected = plan_calls(drill_sandbox, uuids, CALLS)
    assert all(c["url"].startswith(LOAD_BALANCER) for c in callbacks)

    drill_report.phase("setup")

    # The copies of a callback are neighbours in the job list, so `split` deals them to different
    # senders at the same position: they race each other, to different instances.
    order = list(range(len(callbacks)))
    chooser = random.Random(5)
    chooser.shuffle(order)
    jobs = []
    for n, i in enumerate(order):
        targets = [instances[(n + copy) % 2].url for copy in range(COPIES - 1)] + [chooser.choice(instances).url]
        jobs += [(i, callbacks[i], target) for target in targets]
    answers = Load(split(jobs, SENDERS), fresh_nonce=True).start().join()
    drill_report.phase("load")

    per_instance = {s.name: tally(x for x in answers if x.target == s.url) for s in instances}
    firsts = [x.index for x in answers if x.outcome != "duplicate"]
    latencies = [x.latency for x in answers]
    drill_report.update({
        "sessions": SESSIONS, "callbacks": len(callbacks), "deliveries": len(answers), "senders": SENDERS,
        "answers by instance": per_instance,
        "latency p50 / p99 / max, s": tuple(round(v, 3) for v in (percentile(latencies, 0.5),
                                                                  percentile(latencies, 0.99), max(latencies))),
    })
    assert all(x.kind == "2xx" for x in answers), tally(answers)
    # Exactly one delivery of each callback recorded it; all the others found it already stored.
    assert sorted(firsts) == list(range(len(callbacks))), tally(answers)
    assert {x.outcome for x in answers} == {"recorded", "duplicate"}, tally(answers)

    if projected_within is not None:
        assert wait_until(lambda: queued(drill_engine) == 0, timeout=projected_within), (
            f"{queued(drill_engine)} facts still unprojected {projected_within} s after the load")
        drill_report.phase("projected by the instances")
    problems = check_exact(drill_engine, env, callbacks, expected)
    drill_report.phase("verify")
    assert not problems, "\n".join(problems)
