"""Drill: a rolling restart behind the load balancer, under a steady load of callbacks and API calls.

Debian's haproxy, running the repository's configuration (deploy/haproxy/), balances two gunicorn
nodes and health-checks them on /readyz; the `worker` process projects. While signed callbacks and
API calls (reads, and creates with an Idempotency-Key) flow through haproxy, each node in turn is
drained (its DRAIN_FILE created: /readyz answers 503 `draining`, haproxy takes it out), stopped
with SIGTERM (gunicorn finishes what it holds), started again on its port, and let back in.

Nothing may be lost: every answer is a 2xx, or a 503 that Plivo would retry (none is expected:
haproxy sends a 503 to the other node itself); every callback answered 2xx is stored once with its
fact and projected; after Plivo's redelivery of the rest, the record is exactly the plan's; each
Idempotency-Key made one session.
"""

from __future__ import annotations

import threading
import uuid as uuid_module
from collections import Counter

import pytest
import requests
from sqlalchemy import text

from .harness import (
    API_HEADERS,
    GunicornService,
    HAProxyBalancer,
    WorkerProcess,
    check_consistency,
    check_exact,
    check_inbox,
    create_sessions,
    deliver_all,
    parties,
    plan_calls,
    service_env,
    settle,
    shuffled_load,
    tally,
)

SESSIONS = 12
CALLS = 6  # per session: about 540 callbacks
SENDERS = 4
PACE = 0.3  # a steady load of about 13 callbacks a second, for about 36 s: longer than restarting both nodes


class ApiCalls:
    """An internal caller through the load balancer: a read every 0.05 s, a create (with an
    Idempotency-Key) every tenth; every status kept."""

    def __init__(self, url: str, uuids: list[str]):
        self.url, self.uuids = url, uuids
        self.statuses: list[tuple[str, int | str]] = []
        self.keys: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="api-caller")

    def start(self) -> ApiCalls:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            n += 1
            try:
                if n % 10:
                    answer = requests.get(f"{self.url}/v1/sessions/{self.uuids[n % len(self.uuids)]}",
                                          headers=API_HEADERS, timeout=10)
                    self.statuses.append(("read", answer.status_code))
                else:
                    key = uuid_module.uuid4().hex
                    self.keys.append(key)
                    body = parties(1000 + n) | {"session_expiry": 600}
                    answer = requests.post(f"{self.url}/v1/sessions", json=body, timeout=15,
                                           headers=API_HEADERS | {"Idempotency-Key": key})
                    self.statuses.append(("create", answer.status_code))
            except requests.RequestException as exc:
                self.statuses.append(("error", type(exc).__name__))

    def stop(self) -> list[tuple[str, int | str]]:
        self._stop.set()
        self._thread.join(30)
        return self.statuses


@pytest.mark.slow
def test_rolling_restart_behind_haproxy_loses_nothing(drill_db, drill_engine, drill_sandbox, tmp_path,
                                                      drill_report):
    drains = [tmp_path / f"node{n}.drain" for n in (1, 2)]
    envs = [service_env(drill_db, drill_sandbox.url, "https://masking.drill.test", DRAIN_FILE=str(drain))
            for drain in drains]
    nodes = [GunicornService(tmp_path, env, name=f"node{n}").launch() for n, env in enumerate(envs, 1)]
    started = list(nodes)
    worker = WorkerProcess(tmp_path, envs[0]).start()
    balancer = HAProxyBalancer([node.port for node in nodes])
    api = None
    try:
        for node in nodes:
            node.wait_started()
        balancer.start()
        for n in (1, 2):
            balancer.wait_state(f"node{n}", "UP")
        uuids = create_sessions(balancer.url, SESSIONS)
        callbacks, expected = plan_calls(drill_sandbox, uuids, CALLS)
        drill_report.phase("setup")

        load = shuffled_load(callbacks, SENDERS, seed=13, pace=PACE, base_url=balancer.url)
        api = ApiCalls(balancer.url, uuids).start()
        load.wait_for(0.1)
        restarts = []
        for n, (node, drain) in enumerate(zip(nodes, drains, strict=True), 1):
            drain.touch()
            out = balancer.wait_state(f"node{n}", "DOWN")
            node.stop()  # SIGTERM: gunicorn finishes its requests in flight, then exits
            drain.unlink()
            restarted = GunicornService(tmp_path, envs[n - 1], name=f"node{n}-restarted", port=node.port)
            started.append(restarted)
            restarted.start()
            back = balancer.wait_state(f"node{n}", "UP")
            nodes[n - 1] = restarted
            restarts.append(f"node{n}: out of the rotation {out:.1f} s after draining, back {back:.1f} s after "
                            f"its restart, at callback {load.done} of {load.total}")
        assert load.done < load.total, "the load ended before the restart did: the drill tested nothing"
        answers = load.join()
        api_statuses = api.stop()
        drill_report.phase("load and rolling restart")

        accepted = {a.index for a in answers if a.kind == "2xx"}
        with drill_engine.connect() as conn:
            stored = conn.execute(text("SELECT count(*) FROM callback_inbox")).scalar()
        drill_report.update({
            "restarts": restarts,
            "callbacks sent / answered 2xx / stored": (len(answers), len(accepted), stored),
            "callback answers": tally(answers),
            "api answers": dict(sorted(Counter(f"{kind} {status}" for kind, status in api_statuses).items())),
            "haproxy": balancer.counters(),
        })
        assert {a.kind for a in answers} <= {"2xx", "503"}, tally(answers)
        assert {status for _, status in api_statuses} <= {200, 201, 503}, drill_report["api answers"]
        # Every callback answered 2xx is stored once with its fact, and once projected nothing is partial.
        problems = check_inbox(drill_engine, callbacks, accepted)
        settle(envs[0])
        problems += check_consistency(drill_engine)
        assert not problems, "\n".join(problems)
        assert stored == len(accepted), (stored, len(accepted))  # nothing stored that was not answered 2xx

        retried = deliver_all(callbacks, sorted(set(range(len(callbacks))) - accepted),
                              base_urls=[balancer.url])  # Plivo's redelivery of the rest
        assert all(a.kind == "2xx" for a in retried), tally(retried)
        problems = check_exact(drill_engine, envs[0], callbacks, expected)
        assert not problems, "\n".join(problems)
        with drill_engine.connect() as conn:
            created = conn.execute(text(
                "SELECT idempotency_key, count(DISTINCT session_uuid) FROM session_create_attempts"
                " WHERE idempotency_key IS NOT NULL GROUP BY idempotency_key")).all()
        assert dict(created) == dict.fromkeys(api.keys, 1), created
        drill_report.phase("verify")
    finally:
        if api is not None:
            api.stop()
        balancer.stop()
        worker.stop()
        for node in started:
            node.stop()
