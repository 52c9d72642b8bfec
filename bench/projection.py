"""One busy session's projection, read whole and from the projector's kept copy, side by side.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/projection.py [--calls 1000]

Stores `--calls` calls' callbacks of one session (bench/webhooks.py's simulated calls) with the
webhook path's own statement, in a database of its own, then times (median of 9 each, in turns):

* whole: a projector that kept nothing reads and derives the session whole (after a restart, or
  when another process projected it last);
* kept: the projector that projected it last, after one more call's callbacks (what it does while
  the session's calls go on).

Only this process projects, so every "kept" projection is taken from the kept copy (it says so).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from webhooks import VIRTUAL_NUMBERS, PlannedSession, call_events  # noqa: E402

from webhook_service.devdb import admin_url, drop_database, ensure_database  # noqa: E402
from webhook_service.domain.callbacks import inbox_month, read_callback  # noqa: E402
from webhook_service.migrate import upgrade  # noqa: E402
from webhook_service.persistence.db import Database  # noqa: E402
from webhook_service.persistence.inbox import STORE_RECORDED, fact_arguments  # noqa: E402
from webhook_service.plivo.signature import string_to_sign  # noqa: E402
from webhook_service.services.inbox import _inbox_row, dedupe_key  # noqa: E402
from webhook_service.services.projector import Projector  # noqa: E402
from webhook_service.settings import Settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    admin = admin_url()
    url = ensure_database(admin, "webhook_service_bench_projection", recreate=True)
    upgrade(url)
    rng = random.Random(args.seed)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    busy = PlannedSession(uuid=str(uuid.UUID(int=rng.getrandbits(128), version=4)), first_party="+14155559900",
                          second_party="+16285559900", virtual_number=VIRTUAL_NUMBERS[0], created_at=start,
                          existing=False)
    clock = {"at": start, "seq": 0}

    def store_calls(pg: psycopg.Connection, calls: int) -> None:
        for _ in range(calls):
            events = call_events(busy, clock["at"], rng)
            clock["at"] = events[-1][0] + timedelta(seconds=60)
            for _, params in events:
                clock["seq"] += 1
                params = params | {"SequenceNumber": str(clock["seq"])}
                reading = read_callback("session", params)
                signed = string_to_sign("POST", "https://bench.example/webhooks/plivo/session", params)
                row = _inbox_row("session", "POST", "application/x-www-form-urlencoded", params, None,
                                 dedupe_key(signed)) | {"status": "recorded", "error": None,
                                                        "event_month": inbox_month(signed)}
                pg.execute(STORE_RECORDED, row | fact_arguments(reading.fact))

    db = Database.connect(url, Settings.from_env({"DATABASE_URL": url, "DB_STATEMENT_TIMEOUT_MS": "60000"}))
    whole, kept, taken = [], [], 0
    try:
        with psycopg.connect(url, autocommit=True) as pg:
            store_calls(pg, args.calls)
            facts = pg.execute("SELECT count(*) FROM callback_facts").fetchone()[0]
            projector = Projector(db)
            projector.project([busy.uuid], wait=True)
            for _ in range(9):
                pg.execute("INSERT INTO projection_queue (session_uuid) VALUES (%s)", [busy.uuid])
                started = time.perf_counter()
                Projector(db).project([busy.uuid], wait=True)
                whole.append(time.perf_counter() - started)
                pg.execute("INSERT INTO projection_queue (session_uuid) VALUES (%s)", [busy.uuid])
                projector.project([busy.uuid], wait=True)  # read whole: its kept copy is current again
                store_calls(pg, 1)
                started = time.perf_counter()
                outcome = projector.project([busy.uuid], wait=True)
                kept.append(time.perf_counter() - started)
                taken += outcome.projected[0].legs_kept is not None
    finally:
        db.dispose()
        drop_database(admin, "webhook_service_bench_projection")
    w, k = 1000 * statistics.median(whole), 1000 * statistics.median(kept)
    print(f"one busy session ({facts} facts), median of 9: read whole {w:.1f} ms; from the kept copy after one more "
          f"call {k:.1f} ms ({taken} of 9 taken from it) = {k / w:.2f} x whole (goal < 50 ms: {k < 50})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
