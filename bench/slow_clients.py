"""Slow clients against gunicorn alone, worker class by worker class: what chose the gevent worker.

    .venv/bin/python bench/slow_clients.py [--callbacks 400] [--slow 0,8,200] [--workers gthread,gevent]

For each worker class (gunicorn.conf.py with GUNICORN_WORKER_CLASS, WEB_CONCURRENCY=2; gthread with
its 4 threads), the service on a fresh database of DATABASE_URL's server (else the embedded PostgreSQL)
and the sandbox Plivo, then for each count of slowloris connections (a request line, then a header
line a second; reopened when the server closes them): signed callbacks sent by 4 senders as fast as
they are answered (for 20 s at most), each with a 5 s timeout. Printed: callbacks answered 2xx,
failed (timed out), req/s, p50 and p99 latency, and req/s as a ratio of the same worker's without
slow clients and of gthread's. It reuses the drills' harness
(tests/drills/harness.py). About a minute per worker class.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.drills.harness import (  # noqa: E402
    GunicornService,
    Sandbox,
    SlowClients,
    create_sessions,
    percentile,
    plan_calls,
    send,
    service_env,
    split,
)
from webhook_service.devdb import admin_url, drop_database, ensure_database  # noqa: E402
from webhook_service.migrate import upgrade  # noqa: E402

DATABASE = "webhook_service_bench_slow_clients"
DEADLINE = 20.0  # seconds of sending per measurement, at most


def measure(service: GunicornService, callbacks: list, slow: int) -> dict:
    attack = SlowClients(service.port, slow, "headers").start(timeout=20) if slow else None
    try:
        held = attack.tally.open if attack else 0
        answers, started = [], time.perf_counter()
        deadline = time.monotonic() + DEADLINE

        def sender(jobs: list) -> None:
            for index, callback, _ in jobs:
                if time.monotonic() > deadline:  # a starved server would take 5 s a callback
                    return
                answers.append(send(callback, index, timeout=5.0))

        threads = [threading.Thread(target=sender, args=(jobs,)) for jobs in split(
            [(i, cb, None) for i, cb in enumerate(callbacks)], 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        if attack:
            attack.stop()
    ok = [a.latency for a in answers if a.kind == "2xx"]
    return {"slow": slow, "held": held, "2xx": len(ok), "failed": len(answers) - len(ok),
            "rps": len(answers) / elapsed, "p50": percentile(ok, 0.5) * 1000, "p99": percentile(ok, 0.99) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", type=int, default=400, help="callbacks sent per measurement (about)")
    parser.add_argument("--slow", default="0,8,200", help="slowloris connection counts, comma-separated")
    parser.add_argument("--workers", default="gthread,gevent", help="worker classes, comma-separated")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.slow.split(",")]
    admin = admin_url()
    sandbox = Sandbox().start()
    rows = []
    try:
        for worker in args.workers.split(","):
            url = ensure_database(admin, DATABASE, recreate=True)
            upgrade(url)
            with tempfile.TemporaryDirectory(prefix="bench-slow-") as workdir:
                service = GunicornService(Path(workdir), service_env(
                    url, sandbox.url, GUNICORN_WORKER_CLASS=worker, PROJECT_IN_WEB="false"), name=worker).start()
                try:
                    uuids = create_sessions(service.url, 10, first=len(rows) * 100)
                    calls = max(1, args.callbacks // (len(uuids) * 8))  # about 8 callbacks a call
                    callbacks, _ = plan_calls(sandbox, uuids, calls * len(counts))
                    size = len(callbacks) // len(counts)
                    for n, slow in enumerate(counts):
                        rows.append({"worker": worker} | measure(service, callbacks[n * size:(n + 1) * size], slow))
                        print(rows[-1], flush=True)
                finally:
                    service.stop()
            drop_database(admin, DATABASE)
    finally:
        sandbox.stop()
    base = {r["worker"]: r["rps"] for r in rows if r["slow"] == 0}
    reference = base.get("gthread") or next(iter(base.values()), None)
    print(f"\n{'worker':8} {'slow':>5} {'held':>5} {'2xx':>5} {'failed':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>8}"
          f" {'÷ own 0':>8} {'÷ gthread 0':>11}")
    for r in rows:
        own = r["rps"] / base[r["worker"]] if base.get(r["worker"]) else float("nan")
        vs = r["rps"] / reference if reference else float("nan")
        print(f"{r['worker']:8} {r['slow']:5} {r['held']:5} {r['2xx']:5} {r['failed']:6} {r['rps']:7.1f}"
              f" {r['p50']:7.1f} {r['p99']:8.1f} {own:8.2f} {vs:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
