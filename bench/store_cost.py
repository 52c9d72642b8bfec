"""What storing one callback costs Postgres, statement by statement: the webhook path's limit.

    .venv/bin/python bench/store_cost.py [--callbacks 20000] [--clients 8]

Needs DATABASE_URL (a server this script may create databases on); each variant gets a fresh
database built by the migrations. `--clients` connections store the same signed-callback-shaped
rows concurrently (after a CHECKPOINT, as bench/webhooks.py does before each run); the figure is
the CPU time of their Postgres backends per callback, read from /proc (so run it on the database's
machine), beside the clients' own CPU and the wall time. Variants, cheapest first:

* `store only`: one INSERT of the parameters into a table with a primary key alone (bench/webhooks.py's
  store-only yardstick);
* `inbox only`: the service's inbox row alone (`STORE_OTHER`: dedupe on the unique key, no fact);
* `service`: the service's statement (`STORE_RECORDED`: inbox row, fact and projection-queue row);
* `service, 4 per commit`: the same statements, four to a transaction (what group commit would give);
* `service, queue unindexed` and `service, queue unlogged`: two cheaper "due" marks.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhook_service.devdb import drop_database, ensure_database  # noqa: E402
from webhook_service.domain.callbacks import NO_MONTH, read_callback  # noqa: E402
from webhook_service.migrate import upgrade  # noqa: E402
from webhook_service.persistence.inbox import STORE_OTHER, STORE_RECORDED, fact_arguments  # noqa: E402

STORE_ONLY = "INSERT INTO bench_stored (params) VALUES (%(params)s)"
VARIANTS = {  # name: (statement, statements per transaction, DDL first)
    "store only": (STORE_ONLY, 1, ""),
    "inbox only": (STORE_OTHER, 1, ""),
    "service": (STORE_RECORDED, 1, ""),
    "service, 4 per commit": (STORE_RECORDED, 4, ""),
    "service, queue unindexed": (STORE_RECORDED, 1, "DROP INDEX ix_projection_queue_session_uuid"),
    "service, queue unlogged": (STORE_RECORDED, 1, "ALTER TABLE projection_queue SET UNLOGGED"),
}
WARMUP = 60  # per client: enough for psycopg to prepare the statement


def callbacks(count: int, seed: int) -> list[dict]:
    """The statements' arguments for `count` distinct leg hangups over 2 000 sessions."""
    rng = random.Random(seed)
    sessions = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2000)]
    rows = []
    for i in range(count):
        params = {"EventName": "SessionFirstPartyHangup", "SessionUUID": rng.choice(sessions),
                  "From": "+14155550100", "To": "+14155550123", "FirstParty": "+14155550100",
                  "SecondParty": "+14155550123", "VirtualNumber": "+16505550199",
                  "EventTimestamp": f"2026-11-20 {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}",
                  "Duration": "60", "BilledDuration": "60", "Amount": "0.00850", "PlivoHangupCause": "NORMAL_CLEARING",
                  "PlivoHangupCauseCode": "4000", "SequenceNumber": str(i)}
        row = {"endpoint": "session", "method": "POST", "content_type": "application/x-www-form-urlencoded",
               "params": Jsonb(params), "nonce": str(i), "dedupe_key": f"{rng.getrandbits(256):064x}",
               "event_name": params["EventName"], "session_uuid": params["SessionUUID"], "status": "recorded",
               "error": None, "event_month": NO_MONTH}  # the default partition
        rows.append(row | fact_arguments(read_callback("session", params).fact))
    return rows


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, statement: str, per_commit: int, rows: list[dict], clients: int) -> tuple[float, float, float]:
    """(backend CPU, client CPU, wall) in ms per callback."""
    conns = [psycopg.connect(url, autocommit=True) for _ in range(clients)]
    try:
        pids = [conn.info.backend_pid for conn in conns]
        for k, conn in enumerate(conns):
            for row in rows[k * WARMUP:(k + 1) * WARMUP]:
                conn.execute(statement, row)
        measured = rows[clients * WARMUP:]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

        def store(k: int) -> None:
            conn, mine = conns[k], measured[k::clients]
            for start in range(0, len(mine), per_commit):
                if per_commit == 1:
                    conn.execute(statement, mine[start])
                    continue
                with conn.pipeline(), conn.transaction():
                    for row in mine[start:start + per_commit]:
                        conn.execute(statement, row)

        backend, client, wall = sum(map(cpu_seconds, pids)), time.process_time(), time.perf_counter()
        threads = [threading.Thread(target=store, args=(k,)) for k in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        backend = sum(map(cpu_seconds, pids)) - backend
        client, wall = time.process_time() - client, time.perf_counter() - wall
    finally:
        for conn in conns:
            conn.close()
    n = len(measured)
    return 1000 * backend / n, 1000 * client / n, 1000 * wall / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        print("DATABASE_URL must name a PostgreSQL server on this machine", file=sys.stderr)
        return 2
    rows = callbacks(args.callbacks + args.clients * WARMUP, seed=1)
    print(f"{args.callbacks} callbacks, {args.clients} clients; ms per callback")
    print(f"{'variant':<28} {'postgres CPU':>12} {'x store only':>13} {'client CPU':>11} {'wall':>7}")
    baseline = None
    for name, (statement, per_commit, ddl) in VARIANTS.items():
        url = ensure_database(admin, "webhook_service_bench_store_cost", recreate=True)
        try:
            upgrade(url)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE TABLE bench_stored (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                             " received_at timestamptz DEFAULT now(), params jsonb)")
                if ddl:
                    conn.execute(ddl)
            backend, client, wall = measure(url, statement, per_commit, rows, args.clients)
        finally:
            drop_database(admin, "webhook_service_bench_store_cost")
        baseline = baseline or backend
        print(f"{name:<28} {backend:12.3f} {backend / baseline:13.2f} {client:11.3f} {wall:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
