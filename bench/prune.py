"""Retention of the inbox both ways: batched DELETEs on the plain table, partition drops on the
partitioned one (migration 0011), on the same rows.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/prune.py --rows 1000000

Needs DATABASE_URL (a server this script may create two databases on). Each database is built by
the migrations: one stops at the revision before 0011 (the plain inbox), the other goes to head
(partitioned by month, with a partition for each month of the data). Both get `--rows` callback-shaped
rows, spread evenly over `--months` months up to now (0.1 % of them failed, which retention keeps),
then VACUUM ANALYZE. Then `services.inbox.prune` (what `flask callbacks prune` runs) removes every
month that ended before the start of last month (the cutoff a minute later), with the service's own
batch size (1000) on the plain table. Prints, for each layout: rows deleted, seconds, rows per second,
and the table's size on disk before and after (a DELETE leaves its space to be reused; a dropped
partition gives it back).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alembic import command  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import text  # noqa: E402

from webhook_service.devdb import drop_database, ensure_database  # noqa: E402
from webhook_service.migrate import alembic_config  # noqa: E402
from webhook_service.persistence import partitions  # noqa: E402
from webhook_service.persistence.db import Database  # noqa: E402
from webhook_service.services.inbox import ensure_partitions, prune  # noqa: E402
from webhook_service.settings import Settings  # noqa: E402

FILL = """
INSERT INTO callback_inbox (received_at, {month_column} endpoint, method, content_type, params, nonce, dedupe_key,
                            event_name, session_uuid, status)
SELECT at, {month_value} 'session', 'POST', 'application/x-www-form-urlencoded',
       jsonb_build_object('EventName', 'SessionFirstPartyHangup', 'SessionUUID', md5(n::text),
                          'EventTimestamp', to_char(at, 'YYYY-MM-DD HH24:MI:SS'), 'From', '+14155550100',
                          'To', '+14155550123', 'Duration', '60', 'BilledDuration', '60', 'Amount', '0.00850',
                          'PlivoHangupCause', 'NORMAL_CLEARING', 'SequenceNumber', n::text),
       n::text, md5(n::text) || md5((n + 1)::text), 'SessionFirstPartyHangup', md5(n::text),
       CASE WHEN n % 1000 = 0 THEN 'failed' ELSE 'recorded' END
  FROM (SELECT n, :start + (:span * (n - 1)::float / :rows) * interval '1 second' AS at
          FROM generate_series(:first, :last) AS n) AS rows
"""
CHUNK = 1_000_000


def size(db: Database) -> int:
    with db.engine.connect() as conn:
        names = partitions.partitions(conn) if partitions.is_partitioned(conn) else []
        return sum(conn.execute(text("SELECT pg_total_relation_size(to_regclass(:name))"), {"name": name}).scalar()
                   or 0 for name in [*names, "callback_inbox"])


def fill(db: Database, rows: int, start: datetime, end: datetime, partitioned: bool) -> float:
    started = time.perf_counter()
    month = ("event_month,", "date_trunc('month', at AT TIME ZONE 'UTC')::date,") if partitioned else ("", "")
    statement = text(FILL.format(month_column=month[0], month_value=month[1]))
    for first in range(1, rows + 1, CHUNK):
        with db.engine.begin() as conn:
            conn.execute(statement, {"start": start, "span": (end - start).total_seconds(), "first": first,
                                     "last": min(first + CHUNK - 1, rows), "rows": rows})
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE callback_inbox"))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--months", type=int, default=4, help="months the rows span, the current one included")
    parser.add_argument("--keep", action="store_true", help="keep the two databases")
    args = parser.parse_args()
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        sys.exit("set DATABASE_URL to a PostgreSQL server this script may create databases on")
    settings = Settings.from_env({"DB_STATEMENT_TIMEOUT_MS": "3600000"})
    now = datetime.now(UTC)
    this_month = now.date().replace(day=1)
    first_month = partitions.add_months(this_month, 1 - args.months)
    start = datetime.combine(first_month, datetime.min.time(), UTC)
    cutoff = datetime.combine(partitions.add_months(this_month, -1), datetime.min.time(), UTC)
    before_0011 = ScriptDirectory.from_config(alembic_config()).get_revision("0011").down_revision
    results = {}
    for layout, revision in (("plain", before_0011), ("partitioned", "head")):
        name = f"bench_prune_{layout}"
        url = ensure_database(admin, name, recreate=True)
        command.upgrade(alembic_config(url), revision)
        db = Database.connect(url, settings)
        try:
            if layout == "partitioned":
                ensure_partitions(db, months_ahead=args.months + 3, today=first_month)
            filled = fill(db, args.rows, start, now, layout == "partitioned")
            before = size(db)
            started = time.perf_counter()
            # The cutoff a minute past the start of last month: every earlier month has ended by then.
            deleted = prune(db, older_than=datetime.now(UTC) - cutoff - timedelta(minutes=1))
            seconds = time.perf_counter() - started
            results[layout] = {"rows": args.rows, "fill s": round(filled, 1), "deleted": deleted,
                               "prune s": round(seconds, 3), "rows/s": round(deleted / seconds),
                               "MB before": before // 2**20, "MB after": size(db) // 2**20}
            print(layout, json.dumps(results[layout]), flush=True)
        finally:
            db.dispose()
            if not args.keep:
                drop_database(admin, name)
    plain, parts = results["plain"], results["partitioned"]
    # The plain table also loses the rows of last month's first minute (the cutoff's minute): a few.
    assert abs(plain["deleted"] - parts["deleted"]) <= args.rows // 10_000, "the layouts removed different rows"
    print(json.dumps({"rows": args.rows, "deleted": plain["deleted"], "plain s": plain["prune s"],
                      "partitioned s": parts["prune s"],
                      "plain / partitioned": round(plain["prune s"] / parts["prune s"], 1)}))


if __name__ == "__main__":
    main()
