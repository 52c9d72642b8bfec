"""Drill: Plivo slow (answers take 30 s) or down while sessions are being created.

* Slow: each create answers 504 within its own timeout (PLIVO_READ_TIMEOUT=2), or 503
  `plivo_busy` at once when the worker's Plivo slots (PLIVO_MAX_CONCURRENCY) are all taken;
  meanwhile callbacks keep being answered quickly, because they never wait on Plivo.
* Failing (Plivo answers 503) or down (connection refused): creates answer 502 at once.
* No session row is left inconsistent: every create attempt is final or `unknown`, no API session
  exists without a successful attempt; once Plivo is back, `flask sessions resolve` settles the
  unknown ones: the sessions Plivo did create (after our timeout) are recovered, the others are
  `not_found`; in the end our sessions are exactly Plivo's, none lost, none doubled.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import pytest
import requests
from sqlalchemy import text

from .harness import (
    API_HEADERS,
    check_exact,
    create_sessions,
    parties,
    percentile,
    plan_calls,
    resolve_unknown_creates,
    send,
    service_env,
)

SESSIONS = 10  # created before the faults; one call each gives the callbacks sent during them
SLOW = 30  # seconds Plivo takes to answer
READ_TIMEOUT = 2  # PLIVO_READ_TIMEOUT
SLOTS = 2  # PLIVO_MAX_CONCURRENCY, per worker
CREATORS = 14  # clients creating sessions at once: far more than the 2 workers x 2 slots
SLOW_PHASE = 6.0  # seconds the creators keep trying while Plivo is slow
RECOVERED = 3  # the first slow creates that Plivo performs before answering late (outcome unknown, session exists)
CALLBACK_SENDERS = 2
SESSION_PATH = "/Masking/Session"


@dataclass(frozen=True)
class Create:
    """One POST /v1/sessions and what it got."""

    n: int  # its parties' number (`harness.parties`), also its Idempotency-Key
    status: int | None
    code: str | None
    started: float  # time.monotonic()
    latency: float


def create(service_url: str, n: int, timeout: float = 30.0) -> Create:
    """POST /v1/sessions for parties(n), with Idempotency-Key drill-<n>."""
    started = time.monotonic()
    try:
        response = requests.post(service_url + "/v1/sessions", json=parties(n) | {"session_expiry": 3600},
                                 headers=API_HEADERS | {"Idempotency-Key": f"drill-{n}"}, timeout=timeout)
    except requests.RequestException as exc:
        return Create(n, None, type(exc).__name__, started, time.monotonic() - started)
    body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
    return Create(n, response.status_code, body.get("error"), started, time.monotonic() - started)


def most_at_once(creates: list[Create], margin: float = 0.2) -> int:
    """The largest number of these requests in progress at the same moment.

    Seen from the client, a request starts before the service takes its Plivo slot and ends after
    the slot is released; `margin` trims both ends so that back-to-back requests do not count twice.
    """
    edges = sorted([(c.started + margin, 1) for c in creates]
                   + [(c.started + c.latency - margin, -1) for c in creates])
    most = current = 0
    for _, step in edges:  # at equal times the end (-1) sorts first: back-to-back requests do not overlap
        current += step
        most = max(most, current)
    return most


def counts(creates: list[Create]) -> dict[str, int]:
    result: dict[str, int] = {}
    for c in creates:
        key = f"{c.status} {c.code or ''}".strip()
        result[key] = result.get(key, 0) + 1
    return dict(sorted(result.items()))


def attempts(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(text("SELECT id, state, first_party, session_uuid FROM session_create_attempts")).all()


def check_sessions_consistent(engine) -> list[str]:
    """Every attempt is final or `unknown`; API sessions and successful attempts match one to one."""
    with engine.connect() as conn:
        problems = [f"attempt {r.id} left {r.state}" for r in conn.execute(text(
            "SELECT id, state FROM session_create_attempts WHERE state = 'pending'"))]
        problems += [f"API session {r.session_uuid} has no succeeded/recovered attempt" for r in conn.execute(text(
            "SELECT session_uuid FROM masking_sessions s WHERE origin = 'api' AND NOT EXISTS ("
            " SELECT 1 FROM session_create_attempts a WHERE a.session_uuid = s.session_uuid"
            " AND a.state IN ('succeeded', 'recovered'))"))]
        problems += [f"attempt {r.id} ({r.state}) has no session row" for r in conn.execute(text(
            "SELECT id, state FROM session_create_attempts a WHERE state IN ('succeeded', 'recovered') AND NOT EXISTS ("
            " SELECT 1 FROM masking_sessions s WHERE s.session_uuid = a.session_uuid)"))]
        problems += [f"session {r.session_uuid} claimed by {r.n} attempts" for r in conn.execute(text(
            "SELECT session_uuid, count(*) AS n FROM session_create_attempts WHERE session_uuid IS NOT NULL "
            "GROUP BY session_uuid HAVING count(*) > 1"))]
    return problems


@pytest.mark.slow
def test_plivo_slow_or_down_while_creating(drill_cluster, drill_db, drill_engine, drill_sandbox, start_service,
                                           drill_report):
    service = start_service(service_env(drill_db, drill_sandbox.url, PLIVO_READ_TIMEOUT=str(READ_TIMEOUT),
                                        PLIVO_MAX_CONCURRENCY=str(SLOTS)))
    uuids = create_sessions(service.url, SESSIONS, record=True)
    callbacks, expected = plan_calls(drill_sandbox, uuids, 1)
    drill_report.phase("setup")

    # 1. Plivo slow. The first creates to reach it are performed, then answered late; the others
    # are answered late with an error and not performed; reads are slow too.
    drill_sandbox.add_faults([
        {"method": "POST", "path_contains": SESSION_PATH, "delay": SLOW, "after_effect": True, "times": RECOVERED},
        {"method": "POST", "path_contains": SESSION_PATH, "delay": SLOW, "status": 503},
        {"method": "GET", "path_contains": SESSION_PATH, "delay": SLOW, "status": 503},
        {"method": "DELETE", "path_contains": SESSION_PATH, "delay": SLOW, "status": 503},
    ])
    numbers = itertools.count(1000)
    creates: list[Create] = []
    callback_answers = []
    in_flight, most_in_flight = [0], [0]
    lock = threading.Lock()
    end = time.monotonic() + SLOW_PHASE

    def creator() -> None:
        while time.monotonic() < end:
            with lock:
                n = next(numbers)
                in_flight[0] += 1
                most_in_flight[0] = max(most_in_flight[0], in_flight[0])
            result = create(service.url, n)
            with lock:
                in_flight[0] -= 1
                creates.append(result)
            if result.status == 503:
                time.sleep(1)  # the Retry-After a well-behaved client honours

    def callback_sender(first: int) -> None:
        # Every callback once, then duplicates, for as long as creates are being tried.
        for k in itertools.count(first, CALLBACK_SENDERS):
            if k >= len(callbacks) and time.monotonic() >= end:
                return
            answer = send(callbacks[k % len(callbacks)], k % len(callbacks))
            with lock:
                callback_answers.append(answer)
            time.sleep(0.02)

    threads = [threading.Thread(target=creator, daemon=True) for _ in range(CREATORS)]
    threads += [threading.Thread(target=callback_sender, args=(i,), daemon=True) for i in range(CALLBACK_SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SLOW_PHASE + 30)
    assert not any(t.is_alive() for t in threads), "a client is still waiting long after the slow phase"

    timeouts = [c for c in creates if c.status == 504]
    busy = [c for c in creates if c.status == 503 and c.code == "plivo_busy"]
    latencies = [a.latency for a in callback_answers]
    reached_plivo = [r for r in drill_sandbox.server.state.request_log() if r["method"] == "POST"]
    drill_report.update({
        "slow Plivo: creates": counts(creates),
        "creates in flight at once (clients)": most_in_flight[0],
        "creates waiting on Plivo at once (504s)": most_at_once(timeouts),
        "504 latency min / max, s": (round(min((c.latency for c in timeouts), default=0), 2),
                                     round(max((c.latency for c in timeouts), default=0), 2)),
        "503 plivo_busy latency max, s": round(max((c.latency for c in busy), default=0), 3),
        "creates that reached Plivo": len(reached_plivo) - SESSIONS,
        "callbacks meanwhile": len(callback_answers),
        "callback latency p50 / p99 / max, s": (round(percentile(latencies, 0.5), 3),
                                                round(percentile(latencies, 0.99), 3), round(max(latencies), 3)),
    })
    # The premise, from what the service answered (the clients' own peak depends on thread start-up):
    # more creates came at once than there were slots, so some found every slot taken.
    assert busy, "no create found every slot taken: the load never exceeded the slots"
    assert len(creates) == len(timeouts) + len(busy), counts(creates)
    assert len(timeouts) >= 2 * SLOTS, "too few creates reached Plivo"
    assert most_at_once(timeouts) <= SLOTS * int(service.env["WEB_CONCURRENCY"]), "more creates than slots"
    assert max(c.latency for c in timeouts) < 5.0, "a create waited on Plivo longer than its timeout"
    assert max((c.latency for c in busy), default=0) < 1.0, "plivo_busy was not answered at once"
    assert {a.status for a in callback_answers} == {200}, "a callback was not answered 200 while Plivo was slow"
    assert percentile(latencies, 0.99) < 1.0, "callbacks were slowed down by the slow Plivo"

    # A retry of a timed-out create (same Idempotency-Key) and an expire, side by side while Plivo
    # is still slow: both wait on Plivo's reads, which the client retries (PLIVO_MAX_RETRIES) on timeouts.
    slow_calls: dict[str, str] = {}

    def timed(name, call) -> None:
        started = time.perf_counter()
        status, code = call()
        slow_calls[name] = f"{status} {code} in {time.perf_counter() - started:.1f} s"

    def retry_create() -> tuple[int | None, str | None]:
        result = create(service.url, timeouts[0].n, timeout=60)
        return result.status, result.code

    def expire() -> tuple[int, str]:
        response = requests.delete(f"{service.url}/v1/sessions/{uuids[0]}", headers=API_HEADERS, timeout=60)
        return response.status_code, response.json().get("error")

    side_by_side = [threading.Thread(target=timed, args=("create retried with its key", retry_create)),
                    threading.Thread(target=timed, args=("expire", expire))]
    for thread in side_by_side:
        thread.start()
    for thread in side_by_side:
        thread.join(90)
    drill_report["slow Plivo: other calls"] = slow_calls
    drill_report.phase("Plivo slow")

    # 2. Plivo failing (503 at once), then 3. down (nothing listens): 502 at once, callbacks unaffected.
    drill_sandbox.clear_faults()
    drill_sandbox.add_faults([{"method": "POST", "path_contains": SESSION_PATH, "status": 503}])
    failing = [create(service.url, next(numbers)) for _ in range(3)]
    drill_sandbox.stop()
    down = [create(service.url, next(numbers)) for _ in range(3)]
    duplicates = [send(c) for c in callbacks[:10]]
    drill_report.update({"failing Plivo: creates": counts(failing), "Plivo down: creates": counts(down),
                         "502 latency max, s": round(max(c.latency for c in failing + down), 3)})
    assert [c.status for c in failing + down] == [502] * 6, counts(failing + down)
    assert max(c.latency for c in failing + down) < 2.0
    assert {a.status for a in duplicates} == {200}
    drill_report.phase("Plivo failing, down")

    # No inconsistent row, before and after the operator resolves the unknown creates.
    problems = check_sessions_consistent(drill_engine)
    assert not problems, "\n".join(problems)
    before = [r.state for r in attempts(drill_engine)]
    drill_report["create attempts before resolve"] = {s: before.count(s) for s in sorted(set(before))}
    drill_sandbox.start()
    drill_sandbox.clear_faults()
    resolved = resolve_unknown_creates(service.env)
    after = attempts(drill_engine)
    states = [r.state for r in after]
    drill_report.update({"resolve": resolved,
                         "create attempts after": {s: states.count(s) for s in sorted(set(states))}})
    problems = check_sessions_consistent(drill_engine)
    problems += [f"attempt {r.id} still {r.state}" for r in after if r.state in ("unknown", "pending")]
    with drill_engine.connect() as conn:
        ours = {r[0] for r in conn.execute(text("SELECT session_uuid FROM masking_sessions WHERE origin = 'api'"))}
    plivos = drill_sandbox.session_uuids()
    problems += [f"Plivo session {u} unknown to the service (lost)" for u in sorted(plivos - ours)]
    problems += [f"session {u} unknown to Plivo" for u in sorted(ours - plivos)]
    if states.count("recovered") != RECOVERED:
        problems.append(f"{states.count('recovered')} creates recovered, Plivo performed {RECOVERED}")
    assert not problems, "\n".join(problems)

    # Plivo back: a create works again, and the callbacks sent during the faults are exact.
    assert create(service.url, next(numbers)).status == 201
    problems = check_exact(drill_engine, service.env, callbacks, expected)
    drill_report.phase("resolve and verify")
    assert not problems, "\n".join(problems)
