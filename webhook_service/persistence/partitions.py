"""The inbox's monthly partitions (migration 0011): which exist, make the next ones, drop old ones.

Partitions are named `callback_inbox_pYYYY_MM` and hold one month of `event_month`;
`callback_inbox_legacy` holds the rows stored before the partitioning, `callback_inbox_default`
whatever no other partition takes: a month with no partition (a timestamp far ahead or long past),
callbacks with no EventTimestamp (`domain.callbacks.NO_MONTH`), failed rows kept from a dropped month.

Every statement that changes the partitioned table's shape waits `LOCK_TIMEOUT` at most for its
lock (callbacks queue behind a waiting DDL statement), and is simply tried again on the next run.
"""

from __future__ import annotations

import re
from datetime import date

from sqlalchemy import text
from sqlalchemy.engine import Connection

LOCK_TIMEOUT = "1s"
MONTHS_AHEAD = 3  # partitions made ahead of time by the worker (so does migration 0011)
MONTH_PARTITION = re.compile(r"^callback_inbox_p(\d{4})_(\d{2})$")
LEGACY_PARTITION = "callback_inbox_legacy"
DEFAULT_PARTITION = "callback_inbox_default"
ROW_BY_ROW = (LEGACY_PARTITION, DEFAULT_PARTITION)  # pruned in batches of rows, not dropped by month
COLUMNS = ("id, received_at, endpoint, method, content_type, params, nonce, dedupe_key, event_name, session_uuid,"
           " status, error, attempts, event_month")


def is_partitioned(conn: Connection) -> bool:
    """Is callback_inbox the partitioned table (after migration 0011), rather than a plain one?"""
    return conn.execute(text("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('callback_inbox')")
                        ).scalar() is True


def partitions(conn: Connection) -> list[str]:
    """The names of callback_inbox's partitions."""
    return list(conn.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'callback_inbox'::regclass ORDER BY c.relname")).scalars())


def month_of(partition: str) -> date | None:
    """The first day of a monthly partition's month (None for the legacy and default ones)."""
    match = MONTH_PARTITION.match(partition)
    return date(int(match.group(1)), int(match.group(2)), 1) if match else None


def month_name(month: date) -> str:
    """The name of `month`'s partition (`MONTH_PARTITION` reads it back)."""
    return f"callback_inbox_p{month:%Y_%m}"


def add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def create_month(conn: Connection, month: date) -> str:
    """Make `month`'s partition (in the caller's transaction): a table, then attached, which locks the
    parent only against other DDL (SHARE UPDATE EXCLUSIVE), never against callbacks. Rows of that
    month the default partition took meanwhile (a callback dated months ahead) move into it first:
    attaching checks that the default partition holds none."""
    name = month_name(month)
    bounds = {"start": month, "end": add_months(month, 1)}
    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(text(f"CREATE TABLE {name} (LIKE callback_inbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
    conn.execute(text(f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE event_month >= :start"
                      f" AND event_month < :end RETURNING {COLUMNS})"
                      f" INSERT INTO {name} ({COLUMNS}) SELECT {COLUMNS} FROM moved"), bounds)
    conn.execute(text(f"ALTER TABLE callback_inbox ATTACH PARTITION {name}"
                      f" FOR VALUES FROM ('{bounds['start']}') TO ('{bounds['end']}')"))
    return name


def drop_partition(conn: Connection, name: str) -> int:
    """Drop a partition (in the caller's transaction), keeping its failed rows for replay (they move
    to the default partition); returns the rows dropped with it. The rows are counted first, before
    the detach takes the parent's ACCESS EXCLUSIVE lock (waited for LOCK_TIMEOUT at most), which is
    then held only for the failed rows' copy (found by their partial index) and the drop: callbacks
    wait that long, not for a count of the month."""
    dropped = conn.execute(text(f"SELECT count(*) FROM {name} WHERE status <> 'failed'")).scalar_one()
    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(text(f"ALTER TABLE callback_inbox DETACH PARTITION {name}"))
    conn.execute(text(f"INSERT INTO callback_inbox ({COLUMNS}) SELECT {COLUMNS} FROM {name} WHERE status = 'failed'"))
    conn.execute(text(f"DROP TABLE {name}"))
    return dropped


def legacy_is_empty(conn: Connection) -> bool:
    """Does the legacy partition hold no recorded or ignored row any more (failed ones may remain)?"""
    return conn.execute(text(f"SELECT NOT EXISTS (SELECT 1 FROM {LEGACY_PARTITION} WHERE status <> 'failed')")
                        ).scalar() is True
