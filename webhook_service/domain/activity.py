"""`daily_call_totals`: call activity per UTC day, kept exact in the transaction of every change.

Reporting a month must not scan tens of millions of legs, so every transaction that changes a
session's legs or recordings adds the change of that session's activity (after minus before,
`activity_delta`) to the day's rows. Deltas telescope, so the totals equal a full recount
(`RECOUNT`) whatever the order of callbacks, replays and reconciliations; tests compare the two.
A day is split into `SHARDS` rows (session id modulo 16) so concurrent callbacks for different
sessions rarely queue on one row; the reporting view sums the shards.

Definitions (the same in `session_activity_of` and in the view `session_daily_activity`): a leg
counts on the UTC day it started (its earliest known time); it is answered if it has an answer
time; a recording that did not fail counts on the day it started.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

SHARDS = 16
_PHASES = ("initiated_at", "ringing_at", "answered_at", "ended_at")

# The SQL definition is the view `session_daily_activity` (migration 0005; the day of a leg is the
# function `leg_day`, which `apply_leg_callback` also uses); the totals are its sum per day and shard.
RECOUNT = f"""
    INSERT INTO daily_call_totals (day, shard, call_legs, answered_legs, billed_duration,
                                   answered_billed_duration, amount, recordings, sessions_with_calls)
    SELECT day, (session_id % {SHARDS})::smallint, sum(legs), sum(answered), sum(billed), sum(answered_billed),
           sum(amount), sum(recordings), count(*) FILTER (WHERE legs > 0)
      FROM session_daily_activity
     GROUP BY day, (session_id % {SHARDS})
"""

_ZERO = {"legs": 0, "answered": 0, "billed": 0, "answered_billed": 0, "amount": Decimal(0), "recordings": 0}


def _day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def session_activity_of(legs: Iterable[Mapping[str, Any]], recordings: Iterable[Mapping[str, Any]]
                        ) -> dict[date, dict[str, Any]]:
    """One session's activity per UTC day, from its legs and recordings (as `RECOUNT` counts it)."""
    days: dict[date, dict[str, Any]] = {}
    for leg in legs:
        times = [leg[c] for c in _PHASES if leg.get(c) is not None]
        if not times:
            continue  # every derived leg has at least one time
        row = days.setdefault(_day(min(times)), dict(_ZERO))
        billed = leg.get("billed_duration") or 0
        row["legs"] += 1
        row["billed"] += billed
        row["amount"] += leg.get("amount") or Decimal(0)
        if leg.get("answered_at") is not None:
            row["answered"] += 1
            row["answered_billed"] += billed
    for recording in recordings:
        if recording["status"] == "failed":
            continue
        moment = recording.get("started_at") or recording.get("ended_at") or recording["created_at"]
        days.setdefault(_day(moment), dict(_ZERO))["recordings"] += 1
    return days


def activity_delta(before: Mapping[date, Mapping[str, Any]], after: Mapping[date, Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:
    """The rows to add to the totals (JSON-ready), one per day whose numbers changed."""
    rows = []
    for day in sorted(set(before) | set(after)):
        old, new = before.get(day, _ZERO), after.get(day, _ZERO)
        row = {key: new[key] - old[key] for key in _ZERO}
        row["sessions_with_calls"] = int(new["legs"] > 0) - int(old["legs"] > 0)
        if any(row.values()):
            rows.append({"day": day.isoformat(), **row, "amount": str(row["amount"])})
    return rows


def recount_daily_totals(conn: Connection) -> None:
    """Rebuild the totals from the legs and recordings (for backfills and checks)."""
    conn.execute(text("DELETE FROM daily_call_totals"))
    conn.execute(text(RECOUNT))
