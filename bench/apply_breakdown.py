"""Where a leg callback's time goes in Postgres, and what committing several at once would save.

    .venv/bin/python bench/apply_breakdown.py [--callbacks 12000] [--processes 2] [--threads 4] [--batch 4]

Drives the leg callbacks of `bench/webhooks.py`'s simulated traffic straight into
`apply_leg_callback` (migration 0005), without HTTP, from `--processes` processes of `--threads`
threads each, one callback per transaction, as the webhook path does. Each variant runs on a
fresh database (`webhook_service_bench_apply`, on DATABASE_URL's server, else the embedded
PostgreSQL), whose function is cut short after one of its steps, so the steps' costs show by
difference:

* store: the inbox INSERT only (with its dedupe) and the commit;
* + leg fact: also lock the session and record the fact (`leg_events`), update the session;
* + legs: also re-derive the legs (the big statement) without the daily totals;
* full: the function as the migration creates it.

Then `batched`: the "+ legs" variant again, but each process has one writer that commits
`--batch` callbacks per transaction (psycopg pipeline: BEGIN, the calls, COMMIT), as a group
commit would. It leaves out the daily totals because batches that each update several (day,
shard) rows lock them in different orders and deadlock; a real group commit would have to add
the totals once per batch, in one order.

Per variant: callbacks per second (wall), and CPU per callback of the client processes and of
their Postgres backends, each also as a ratio to `store`, measured in the same run. The first
1 000 callbacks of each process are a warm-up, then ANALYZE, then the measured part.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from webhooks import _cpu_seconds, callback_stream

from webhook_service.devdb import admin_url, drop_database, ensure_database
from webhook_service.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "webhook_service_bench_apply"
WARMUP = 1000


def migration():
    """Migration 0005's module (the migrations folder is not a package)."""
    path = next((ROOT / "migrations" / "versions").glob("0005_*.py"))
    spec = importlib.util.spec_from_file_location("migration_0005", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def variant_sql(name: str) -> str | None:
    """CREATE OR REPLACE for the function cut short after one step (None: as migrated)."""
    m = migration()
    sql = m.APPLY_LEG_CALLBACK.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
    derive = m.DERIVE_LEGS.strip()
    if name == "store":
        stored = "        RETURN 'duplicate';\n    END IF;\n"
        return sql.replace(stored, stored + "    RETURN 'applied';\n", 1)
    if name == "+ leg fact":
        return sql.replace(derive + ";", "")
    if name in ("+ legs", "batched"):
        totals, counters = derive.index("), per_day AS ("), derive.index("    )\n    SELECT count(*)")
        return sql.replace(derive, derive[:totals] + ")\n" + derive[counters + len("    )\n"):])
    return None


def arguments(params: dict[str, str]) -> dict:
    """`APPLY_LEG_CALLBACK`'s arguments for one callback, built as the webhook path builds them."""
    from webhook_service.webhooks.events import Event, handler_for

    from webhook_service.services.inbox import inbox_row, leg_callback_arguments

    event = Event.parse(params, datetime.now(UTC))
    row = inbox_row("session", "POST", "application/x-www-form-urlencoded", params, "bench", handled=True)
    return leg_callback_arguments(row, handler_for("session", event), event)  # type: ignore[arg-type]


def worker(url: str, callbacks: list, threads: int, batch: int, ready, go, report, done) -> None:
    """One process: warm up, wait for `go`, send the rest, report (count, CPU seconds); stay until `done`."""
    from webhook_service.services.inbox import APPLY_LEG_CALLBACK

    connections = [psycopg.connect(url, autocommit=True) for _ in range(threads)]

    def send(conn: psycopg.Connection, chunk: list) -> None:
        if len(chunk) == 1:
            conn.execute(APPLY_LEG_CALLBACK, arguments(chunk[0])).fetchone()
            return
        with conn.pipeline():
            conn.execute("BEGIN")
            for params in sorted(chunk, key=lambda p: p["SessionUUID"]):  # one lock order for every batch
                conn.execute(APPLY_LEG_CALLBACK, arguments(params))
            conn.execute("COMMIT")

    for params in callbacks[:WARMUP]:
        send(connections[0], [params])
    ready.put([conn.info.backend_pid for conn in connections])
    go.wait()
    rest = callbacks[WARMUP:]
    started = time.process_time()

    def run(i: int) -> None:
        mine = rest[i::threads]
        for j in range(0, len(mine), batch):
            send(connections[i], mine[j:j + batch])

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    report.put((len(rest), time.process_time() - started))
    done.wait()


def cpu_seconds(pids: list[int]) -> float:
    return sum(_cpu_seconds(set(pids)).values())


def run_variant(admin: str, name: str, stream: list, processes: int, threads: int, batch: int) -> dict:
    url = ensure_database(admin, DATABASE, recreate=True)
    upgrade(url)
    sql = variant_sql(name)
    if sql:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)
    parts: dict[int, list] = {}
    for params in stream:  # one session's callbacks stay in one process, in order
        parts.setdefault(int(params["SessionUUID"][:8], 16) % processes, []).append(params)
    context = multiprocessing.get_context("spawn")
    ready, report, go, done = context.Queue(), context.Queue(), context.Event(), context.Event()
    writers = 1 if name == "batched" else threads
    procs = [context.Process(target=worker, args=(url, parts[i], writers, batch if name == "batched" else 1,
                                                  ready, go, report, done)) for i in range(processes)]
    for proc in procs:
        proc.start()
    backends = [pid for _ in procs for pid in ready.get()]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")
    clients_before = cpu_seconds([p.pid for p in procs])
    postgres_before, wall = cpu_seconds(backends), time.perf_counter()
    go.set()
    results = [report.get() for _ in procs]
    wall = time.perf_counter() - wall
    postgres = cpu_seconds(backends) - postgres_before
    clients = cpu_seconds([p.pid for p in procs]) - clients_before
    done.set()
    for proc in procs:
        proc.join()
    drop_database(admin, DATABASE)
    count = sum(n for n, _ in results)
    return {"rate": count / wall, "client": 1000 * clients / count, "postgres": 1000 * postgres / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callbacks", type=int, default=12_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="callbacks per transaction in the batched run")
    args = parser.parse_args()
    admin = admin_url()
    stream, _ = callback_stream(args.callbacks + WARMUP * args.processes, seed=20260101)
    results = {}
    for name in ("store", "+ leg fact", "+ legs", "full", "batched"):
        print(f"[apply] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_variant(admin, name, stream, args.processes, args.threads, args.batch)
    base = results["store"]
    print(f"\napply_leg_callback by step: {args.processes} processes x {args.threads} threads, one callback per "
          f"transaction; batched: 1 writer per process, {args.batch} per transaction, without the totals")
    print(f"{'variant':12} {'callbacks/s':>12} {'client ms/cb':>13} {'postgres ms/cb':>15} "
          f"{'x store (client)':>17} {'x store (postgres)':>19}")
    for name, r in results.items():
        print(f"{name:12} {r['rate']:12.0f} {r['client']:13.3f} {r['postgres']:15.3f} "
              f"{r['client'] / base['client']:17.2f} {r['postgres'] / base['postgres']:19.2f}")


if __name__ == "__main__":
    main()
