"""A session's call activity per UTC day, and the change between two projections of it.

Reporting a month must not scan tens of millions of legs, so every projection that changes a
session's legs or recordings adds the change of that session's activity (after minus before,
`activity_delta`) to the day's rows of `daily_call_totals`. Deltas telescope, so the totals equal
a full recount (`services.reporting.recount_daily_totals`, which sums this same function over
every session) whatever the order of callbacks, replays and reconciliations.

Definitions: a leg counts on the UTC day it started (its earliest known time); it is answered if
it has an answer time; a recording that did not fail counts on the day it started (or ended, or
was first reported).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

_PHASES = ("initiated_at", "ringing_at", "answered_at", "ended_at")
ZERO = {"legs": 0, "answered": 0, "billed": 0, "answered_billed": 0, "amount": Decimal(0), "recordings": 0}
Activity = dict[date, dict[str, Any]]


def _day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def session_activity_of(legs: Iterable[Mapping[str, Any]], recordings: Iterable[Mapping[str, Any]]) -> Activity:
    """One session's activity per UTC day, from its legs and recordings."""
    days: Activity = {}
    for leg in legs:
        first = None
        for column in _PHASES:
            at = leg.get(column)
            if at is not None and (first is None or at < first):
                first = at
        if first is None:
            continue  # every derived leg has at least one time
        day = first.date() if first.tzinfo is UTC else _day(first)
        row = days.get(day)
        if row is None:
            row = days[day] = dict(ZERO)
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
        moment = recording.get("started_at") or recording.get("ended_at") or recording["reported_at"]
        days.setdefault(_day(moment), dict(ZERO))["recordings"] += 1
    return days


def counters(activity: Activity) -> dict[str, Any]:
    """The session's counters: its activity summed over the days (every derived leg has a day)."""
    days = activity.values()
    return {
        "call_count": sum(day["legs"] for day in days),
        "answered_call_count": sum(day["answered"] for day in days),
        "billed_duration": sum(day["billed"] for day in days),
        "amount": sum((day["amount"] for day in days), Decimal(0)),
        "recording_count": sum(day["recordings"] for day in days),
    }


def activity_delta(before: Activity, after: Activity) -> dict[date, dict[str, Any]]:
    """What to add to each day's totals, for the days whose numbers changed.

    `sessions_with_calls` changes by one when the session gains or loses its first leg of the day.
    """
    rows = {}
    for day in sorted(set(before) | set(after)):
        old, new = before.get(day, ZERO), after.get(day, ZERO)
        row = {key: new[key] - old[key] for key in ZERO}
        row["sessions_with_calls"] = int(new["legs"] > 0) - int(old["legs"] > 0)
        if any(row.values()):
            rows[day] = row
    return rows


def add_activity(total: dict[date, dict[str, Any]], change: Mapping[date, Mapping[str, Any]]) -> None:
    """Add one session's change (or activity, with `sessions_with_calls`) into `total`, day by day."""
    for day, row in change.items():
        into = total.setdefault(day, dict(ZERO, sessions_with_calls=0))
        for key, value in row.items():
            into[key] += value
