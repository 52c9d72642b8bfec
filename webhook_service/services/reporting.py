"""The daily totals, recounted from the projected legs and recordings with the projection's own rules.

`daily_call_totals` is kept by adding each projection's change; a recount sums
`domain.activity.session_activity_of` over every session instead. They must agree (the tests and
drills compare them); `rebuild_daily_totals` replaces the kept totals with the recount, for a
backfill or after a manual repair of the legs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from itertools import groupby
from typing import Any

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.engine import Connection, Engine

from ..domain.activity import ZERO, add_activity, session_activity_of
from ..domain.legs import LEG_COLUMNS
from ..persistence.models import CallLeg, DailyCallTotals, Recording
from ..persistence.projections import RECORDING_COLUMNS, TOTALS, TOTALS_FROM

legs = CallLeg.__table__
recordings = Recording.__table__
totals = DailyCallTotals.__table__


def _by_session(conn: Connection, table: Any, columns: tuple[str, ...]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    rows = conn.execution_options(yield_per=5000).execute(
        select(table.c.session_id, *(table.c[c] for c in columns)).order_by(table.c.session_id, table.c.id))
    for session_id, group in groupby(rows.mappings(), key=lambda r: r["session_id"]):
        yield session_id, [dict(r) for r in group]


def recount(conn: Connection) -> dict[date, dict[str, Any]]:
    """Every day's totals, from the stored legs and recordings (days with nothing are left out)."""
    activity: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for session_id, rows in _by_session(conn, legs, LEG_COLUMNS):
        activity.setdefault(session_id, ([], []))[0].extend(rows)
    for session_id, rows in _by_session(conn, recordings, RECORDING_COLUMNS):
        activity.setdefault(session_id, ([], []))[1].extend(rows)
    days: dict[date, dict[str, Any]] = {}
    for session_legs, session_recordings in activity.values():
        per_day = session_activity_of(session_legs, session_recordings)
        add_activity(days, {day: row | {"sessions_with_calls": int(row["legs"] > 0)} for day, row in per_day.items()})
    return {day: row for day, row in days.items() if any(row.values())}


def kept_totals(conn: Connection) -> dict[date, dict[str, Any]]:
    """Every day's totals as `daily_call_totals` keeps them (shards summed; days with nothing left out)."""
    rows = conn.execute(select(totals.c.day, *(func.sum(totals.c[c]).label(c) for c in TOTALS))
                        .group_by(totals.c.day)).mappings()
    kept = {row["day"]: {name: type(ZERO.get(name, 0))(row[column]) for column, name in TOTALS_FROM.items()}
            for row in rows}
    return {day: row for day, row in kept.items() if any(row.values())}


def rebuild_daily_totals(engine: Engine) -> None:
    """Replace the kept totals with a recount (in one transaction; projections wait on it briefly)."""
    with engine.begin() as conn:
        conn.execute(text("LOCK TABLE daily_call_totals IN SHARE ROW EXCLUSIVE MODE"))  # no change slips in
        counted = recount(conn)
        conn.execute(delete(totals))
        if counted:
            conn.execute(insert(totals), [{"day": day, "shard": 0, **{c: row[n] for c, n in TOTALS_FROM.items()}}
                                          for day, row in sorted(counted.items())])
