"""Keep `daily_call_totals` exact: every change to a session's legs or recordings adds its delta.

Usage, inside the transaction that changes the session (holding its row lock):

    with daily_totals_tracked(conn, session_id):
        ...change call_legs / recordings of that session...

The session's per-day activity is read before and after, and the difference is added to the
day's shard row. Deltas telescope, so the totals equal a full recount whatever the order of
callbacks, replays and reconciliations (a test checks exactly that).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection

SHARDS = 16

# Activity per UTC day: legs by the day they started (the earliest time known for them),
# recordings by the day they started. `{key}` adds a grouping by session for the full recount.
_ACTIVITY = """
    SELECT {key} day, sum(legs) AS legs, sum(answered) AS answered, sum(billed) AS billed,
           sum(answered_billed) AS answered_billed, sum(amount) AS amount, sum(recordings) AS recordings
      FROM (SELECT {key} (timezone('UTC', coalesce(LEAST(initiated_at, ringing_at, answered_at, ended_at),
                                                   created_at)))::date AS day,
                   1 AS legs, (answered_at IS NOT NULL)::int AS answered, coalesce(billed_duration, 0) AS billed,
                   CASE WHEN answered_at IS NOT NULL THEN coalesce(billed_duration, 0) ELSE 0 END AS answered_billed,
                   coalesce(amount, 0) AS amount, 0 AS recordings
              FROM call_legs WHERE {session_filter}
            UNION ALL
            SELECT {key} (timezone('UTC', coalesce(started_at, ended_at, created_at)))::date, 0, 0, 0, 0, 0, 1
              FROM recordings WHERE status <> 'failed' AND {session_filter}) AS activity
     GROUP BY {key} day
"""
SESSION_ACTIVITY = _ACTIVITY.format(key="", session_filter="session_id = :session_id")
ALL_ACTIVITY = _ACTIVITY.format(key="session_id,", session_filter="true")

APPLY_DELTA = f"""
    WITH after AS ({SESSION_ACTIVITY}),
         before AS (SELECT * FROM jsonb_to_recordset(CAST(:before AS jsonb))
                           AS b(day date, legs bigint, answered bigint, billed bigint, answered_billed bigint,
                                amount numeric, recordings bigint)),
         delta AS (
            SELECT coalesce(a.day, b.day) AS day,
                   coalesce(a.legs, 0) - coalesce(b.legs, 0) AS legs,
                   coalesce(a.answered, 0) - coalesce(b.answered, 0) AS answered,
                   coalesce(a.billed, 0) - coalesce(b.billed, 0) AS billed,
                   coalesce(a.answered_billed, 0) - coalesce(b.answered_billed, 0) AS answered_billed,
                   coalesce(a.amount, 0) - coalesce(b.amount, 0) AS amount,
                   coalesce(a.recordings, 0) - coalesce(b.recordings, 0) AS recordings,
                   (coalesce(a.legs, 0) > 0)::int - (coalesce(b.legs, 0) > 0)::int AS sessions_with_calls
              FROM after a FULL JOIN before b ON a.day = b.day)
    INSERT INTO daily_call_totals AS t (day, shard, call_legs, answered_legs, billed_duration,
                                        answered_billed_duration, amount, recordings, sessions_with_calls)
    SELECT day, :shard, legs, answered, billed, answered_billed, amount, recordings, sessions_with_calls
      FROM delta
     WHERE (legs, answered, billed, answered_billed, amount, recordings, sessions_with_calls)
           IS DISTINCT FROM (0, 0, 0, 0, 0, 0, 0)
     ORDER BY day  -- one lock order for every transaction: no deadlocks between shards' days
    ON CONFLICT (day, shard) DO UPDATE SET
        call_legs = t.call_legs + excluded.call_legs,
        answered_legs = t.answered_legs + excluded.answered_legs,
        billed_duration = t.billed_duration + excluded.billed_duration,
        answered_billed_duration = t.answered_billed_duration + excluded.answered_billed_duration,
        amount = t.amount + excluded.amount,
        recordings = t.recordings + excluded.recordings,
        sessions_with_calls = t.sessions_with_calls + excluded.sessions_with_calls
"""

RECOUNT = f"""
    INSERT INTO daily_call_totals (day, shard, call_legs, answered_legs, billed_duration,
                                   answered_billed_duration, amount, recordings, sessions_with_calls)
    SELECT day, (session_id % {SHARDS})::smallint, sum(legs), sum(answered), sum(billed), sum(answered_billed),
           sum(amount), sum(recordings), count(*) FILTER (WHERE legs > 0)
      FROM ({ALL_ACTIVITY}) AS per_session
     GROUP BY day, (session_id % {SHARDS})
"""


def session_activity(conn: Connection, session_id: int) -> list[dict]:
    rows = conn.execute(text(SESSION_ACTIVITY), {"session_id": session_id}).mappings()
    return [{k: (str(v) if k in ("day", "amount") else int(v)) for k, v in row.items()} for row in rows]


@contextmanager
def daily_totals_tracked(conn: Connection, session_id: int) -> Iterator[None]:
    before = session_activity(conn, session_id)
    yield
    conn.execute(text(APPLY_DELTA), {"session_id": session_id, "shard": session_id % SHARDS,
                                     "before": json.dumps(before)})


def recount_daily_totals(conn: Connection) -> None:
    """Rebuild the totals from the legs and recordings (for backfills and checks)."""
    conn.execute(text("DELETE FROM daily_call_totals"))
    conn.execute(text(RECOUNT))
