"""Benchmark the reporting views against the same answers computed from the raw tables.

    .venv/bin/python bench/reporting.py [--sessions 100000] [--legs-per-session 10] [--runs 7] [--explain]

Builds its own database, `webhook_service_bench` (on DATABASE_URL's server when set, else on the
embedded one; recreated on every run), applies the migrations and fills it with SQL
generate_series: sessions spread over 60 days with an external_ref shared by 5 sessions each,
`--legs-per-session` legs per session (70 % answered, 20 % unanswered, 10 % failed) and one
recording per 5 legs (5 % failed). The daily totals are then rebuilt and the sessions' counters
set from the legs, as the callbacks would have left them.

Each typical query is timed as the median of `--runs` runs after a warm-up run, against a
baseline giving the same answer from the raw tables without the counters, the daily totals or any
index scan. Before timing, each query's answer is checked to equal its baseline's.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from webhook_service.devdb import admin_url, ensure_database
from webhook_service.migrate import upgrade
from webhook_service.persistence.db import sqlalchemy_url
from webhook_service.services.reporting import rebuild_daily_totals

DATABASE = "webhook_service_bench"
START = "2026-09-01 00:00:00+00"  # sessions are created over the 60 days from here
SPAN_DAYS = 60
MONTH = {"first": "2026-10-01", "last": "2026-10-31"}
SESSIONS_PER_REF = 5
LEGS_PER_RECORDING = 5

SESSIONS = """
    INSERT INTO masking_sessions (session_uuid, external_ref, origin, first_party, second_party, virtual_number,
                                  status, record, session_expiry, created_at, updated_at, plivo_created_at,
                                  expires_at, expired_at, session_amount)
    SELECT md5('session' || i)::uuid::text, 'ref-' || (i % (:sessions / :per_ref)),
           CASE WHEN i % 50 = 0 THEN 'callback' ELSE 'api' END,
           '+1415' || lpad(i::text, 7, '0'), '+1628' || lpad(i::text, 7, '0'),
           '+1650555' || lpad((i % 500)::text, 4, '0'),
           CASE WHEN expired THEN 'expired' ELSE 'active' END,
           i % 2 = 0, 86400, created, created, created, created + interval '1 day',
           CASE WHEN expired THEN created + interval '1 day' END, 0
      FROM generate_series(1, :sessions) AS i,
           LATERAL (SELECT CAST(:start AS timestamptz) + (i - 1) * interval '1 day' * :span_days / :sessions
                           AS created) AS c,
           -- a day's expiry: every session but those of the last day has expired
           LATERAL (SELECT created < CAST(:start AS timestamptz) + (:span_days - 1) * interval '1 day'
                           AS expired) AS e
"""

# Calls every 10 minutes from the session's creation; a pseudo-random mix from the ids.
LEGS = """
    INSERT INTO call_legs (session_id, party, initiated_at, ringing_at, answered_at, ended_at, end_event, duration,
                           billed_duration, amount, hangup_cause, hangup_cause_code, from_number, to_number)
    SELECT s.id, CASE WHEN j % 2 = 0 THEN 'first' ELSE 'second' END,
           CASE WHEN kind = 'failed' THEN start END,
           CASE WHEN kind <> 'failed' THEN start END,
           CASE WHEN kind = 'answered' THEN start + interval '6 seconds' END,
           start + CASE kind WHEN 'answered' THEN (6 + talk) * interval '1 second'
                             WHEN 'unanswered' THEN interval '45 seconds' ELSE interval '2 seconds' END,
           CASE WHEN kind = 'failed' THEN 'failed' ELSE 'complete' END,
           CASE WHEN kind = 'answered' THEN talk ELSE 0 END,
           CASE WHEN kind = 'answered' THEN ceil(talk / 60.0) * 60 ELSE 0 END,
           CASE WHEN kind = 'answered' THEN ceil(talk / 60.0) * 0.0085 ELSE 0 END,
           CASE kind WHEN 'answered' THEN 'NORMAL_CLEARING' WHEN 'unanswered' THEN 'NO_ANSWER' ELSE 'USER_BUSY' END,
           CASE kind WHEN 'answered' THEN 4000 WHEN 'unanswered' THEN 3000 ELSE 3010 END,
           s.first_party, s.second_party
      FROM masking_sessions AS s
     CROSS JOIN generate_series(0, :legs_per_session - 1) AS j
     CROSS JOIN LATERAL (
           SELECT s.created_at + (j / 2) * interval '10 minutes' AS start,
                  CASE WHEN (s.id * 31 + j * 17) % 10 < 7 THEN 'answered'
                       WHEN (s.id * 31 + j * 17) % 10 < 9 THEN 'unanswered' ELSE 'failed' END AS kind,
                  20 + (s.id * 7 + j * 13) % 600 AS talk) AS leg
"""

RECORDINGS = """
    INSERT INTO recordings (session_id, recording_uuid, status, resource_url, duration, format, started_at, ended_at)
    SELECT s.id, md5('recording' || s.id || '-' || k)::uuid::text,
           CASE WHEN (s.id + k) % 20 = 0 THEN 'failed' ELSE 'completed' END,
           'https://api.plivo.com/v1/Account/MABENCH/Recording/' || md5('recording' || s.id || '-' || k) || '/',
           60 + (s.id + k) % 300, '.mp3',
           s.created_at + k * interval '10 minutes' + interval '6 seconds',
           s.created_at + k * interval '10 minutes' + interval '6 seconds' + (60 + (s.id + k) % 300) * interval '1 s'
      FROM masking_sessions AS s
     CROSS JOIN generate_series(0, :recordings_per_session - 1) AS k
"""

# What refresh_counters leaves on every session, for all at once; and Plivo's totals as
# reconciliation would store them, one session in 97 drifting by a leg.
COUNTERS = """
    UPDATE masking_sessions AS s
       SET call_count = l.n, answered_call_count = l.answered, billed_duration = l.billed, amount = l.amount,
           recording_count = coalesce(r.n, 0), last_interaction_at = l.last,
           plivo_call_count = l.n + (s.id % 97 = 0)::int, plivo_billed_duration = l.billed,
           plivo_amount = l.amount, reconciled_at = l.last + interval '1 minute'
      FROM (SELECT session_id, count(*) AS n, count(answered_at) AS answered,
                   coalesce(sum(billed_duration), 0) AS billed, coalesce(sum(amount), 0) AS amount,
                   max(ended_at) AS last
              FROM call_legs GROUP BY session_id) AS l
      LEFT JOIN (SELECT session_id, count(*) AS n FROM recordings WHERE status <> 'failed' GROUP BY session_id) AS r
             ON r.session_id = l.session_id
     WHERE s.id = l.session_id
"""

OURS_DAILY = "SELECT * FROM reporting.call_activity_daily WHERE day BETWEEN :first AND :last ORDER BY day"

BASELINE_DAILY = """
    WITH leg_days AS (
        SELECT day, count(DISTINCT session_id) AS sessions_with_calls, count(*) AS call_legs,
               count(answered_at) AS answered_legs, sum(billed) AS billed_duration,
               sum(billed) FILTER (WHERE answered_at IS NOT NULL) AS answered_billed, sum(amount) AS amount
          FROM (SELECT (timezone('UTC', coalesce(least(initiated_at, ringing_at, answered_at, ended_at),
                                                 created_at)))::date AS day,
                       session_id, answered_at, coalesce(billed_duration, 0) AS billed,
                       coalesce(amount, 0) AS amount
                  FROM call_legs) AS legs
         WHERE day BETWEEN :first AND :last
         GROUP BY day),
    recording_days AS (
        SELECT day, count(*) AS recordings
          FROM (SELECT (timezone('UTC', coalesce(started_at, ended_at, created_at)))::date AS day
                  FROM recordings WHERE status <> 'failed') AS started
         WHERE day BETWEEN :first AND :last
         GROUP BY day),
    session_days AS (
        SELECT (timezone('UTC', created_at))::date AS day, count(*) AS sessions_created
          FROM masking_sessions
         WHERE (timezone('UTC', created_at))::date BETWEEN :first AND :last
         GROUP BY 1)
    SELECT day, coalesce(sessions_created, 0), coalesce(sessions_with_calls, 0), coalesce(call_legs, 0),
           coalesce(answered_legs, 0), round(answered_legs::numeric / nullif(call_legs, 0), 4),
           coalesce(billed_duration, 0), round(coalesce(billed_duration, 0) / 60.0, 2), coalesce(amount, 0),
           round(answered_billed::numeric / nullif(answered_legs, 0), 2), coalesce(recordings, 0)
      FROM session_days FULL JOIN leg_days USING (day) FULL JOIN recording_days USING (day)
     ORDER BY day
"""

OURS_SUMMARY = "SELECT * FROM reporting.session_summary WHERE {where} ORDER BY created_at, session_uuid"

# session_summary's columns with the counters recomputed from the legs and recordings.
BASELINE_SUMMARY = """
    WITH s AS (SELECT * FROM masking_sessions WHERE {where}),
    l AS (SELECT session_id, count(*) AS n, count(answered_at) AS answered,
                 coalesce(sum(billed_duration), 0) AS billed, coalesce(sum(amount), 0) AS amount
            FROM call_legs WHERE session_id IN (SELECT id FROM s) GROUP BY session_id),
    r AS (SELECT session_id, count(*) AS n FROM recordings
           WHERE status <> 'failed' AND session_id IN (SELECT id FROM s) GROUP BY session_id),
    c AS (SELECT s.*, coalesce(l.n, 0) AS calls, coalesce(l.answered, 0) AS answered,
                 coalesce(l.billed, 0) AS billed, coalesce(l.amount, 0) AS cost, coalesce(r.n, 0) AS recorded
            FROM s LEFT JOIN l ON l.session_id = s.id LEFT JOIN r ON r.session_id = s.id)
    SELECT session_uuid, external_ref, origin, first_party, second_party, virtual_number, status, created_at,
           expires_at, expired_at, calls, answered, billed, round(billed / 60.0, 2), cost, session_amount,
           cost + coalesce(session_amount, 0), recorded, last_interaction_at, plivo_call_count,
           plivo_billed_duration, plivo_amount, calls - plivo_call_count, billed - plivo_billed_duration,
           cost - plivo_amount, reconciled_at
      FROM c
     ORDER BY created_at, session_uuid
"""

SESSION_LEGS = """
    SELECT * FROM reporting.call_legs WHERE session_uuid = :uuid
     ORDER BY least(initiated_at, ringing_at, answered_at, ended_at), party
"""


@dataclass(frozen=True)
class Case:
    """One typical query, its raw-table baseline, and the parameters of successive runs."""

    name: str
    ours: str
    baseline: str
    baseline_label: str
    params: list[dict]


def database_url() -> str:
    return ensure_database(admin_url(), DATABASE, recreate=True)


def step(label: str, engine: Engine, statement: str, **params) -> None:
    started = time.perf_counter()
    with engine.begin() as conn:
        count = conn.execute(text(statement), params).rowcount
    print(f"  {label}: {count:,} rows in {time.perf_counter() - started:.1f} s", flush=True)


def fill(engine: Engine, sessions: int, legs_per_session: int) -> None:
    print(f"filling {DATABASE}:", flush=True)
    step("sessions", engine, SESSIONS, sessions=sessions, per_ref=SESSIONS_PER_REF, start=START, span_days=SPAN_DAYS)
    step("call legs", engine, LEGS, legs_per_session=legs_per_session)
    step("recordings", engine, RECORDINGS, recordings_per_session=max(1, legs_per_session // LEGS_PER_RECORDING))
    started = time.perf_counter()
    rebuild_daily_totals(engine)
    print(f"  daily totals recounted in {time.perf_counter() - started:.1f} s", flush=True)
    step("session counters", engine, COUNTERS)
    started = time.perf_counter()
    # VACUUM too, not only ANALYZE: index-only scans need the visibility map a live database's
    # autovacuum keeps current.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    print(f"  vacuum analyze in {time.perf_counter() - started:.1f} s", flush=True)


def session_uuid(i: int) -> str:
    """The UUID SESSIONS gives session number i: md5('session' || i)::uuid."""
    return str(uuid.UUID(hashlib.md5(f"session{i}".encode(), usedforsecurity=False).hexdigest()))


def cases(sessions: int, runs: int) -> list[Case]:
    # A different session (and ref) on each run, spread over the data, so no run merely re-reads
    # the previous run's rows.
    picks = [1 + (k * 7919) % sessions for k in range(runs + 1)]
    refs = sessions // SESSIONS_PER_REF
    return [
        Case("(a) a month of call_activity_daily", OURS_DAILY, BASELINE_DAILY,
             "aggregate call_legs, recordings, masking_sessions", [MONTH]),
        Case("(b) one session's session_summary", OURS_SUMMARY.format(where="session_uuid = :uuid"),
             BASELINE_SUMMARY.format(where="session_uuid = :uuid"), "recount from call_legs, no index scans",
             [{"uuid": session_uuid(i)} for i in picks]),
        Case("(c) one external_ref's session_summary", OURS_SUMMARY.format(where="external_ref = :ref"),
             BASELINE_SUMMARY.format(where="external_ref = :ref"), "recount from call_legs, no index scans",
             [{"ref": f"ref-{i % refs}"} for i in picks]),
        Case("(d) one session's call_legs", SESSION_LEGS, SESSION_LEGS, "same view, no index scans",
             [{"uuid": session_uuid(i)} for i in picks]),
    ]


def run_once(engine: Engine, query: str, params: dict, *, raw: bool) -> tuple[float, list[tuple]]:
    with engine.begin() as conn:
        if raw:
            for setting in ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan"):
                conn.execute(text(f"SET LOCAL {setting} = off"))
        started = time.perf_counter()
        rows = [tuple(row) for row in conn.execute(text(query), params)]
        return (time.perf_counter() - started) * 1000, rows


def median_ms(engine: Engine, query: str, params: list[dict], runs: int, *, raw: bool) -> float:
    timings = [run_once(engine, query, params[run % len(params)], raw=raw)[0] for run in range(runs + 1)]
    return statistics.median(timings[1:])  # the first run only warms the cache


def explain(engine: Engine, case: Case) -> None:
    with engine.begin() as conn:
        plan = conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + case.ours), case.params[0]).scalars().all()
    print(f"\nEXPLAIN ANALYZE {case.name}:\n" + "\n".join(plan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--legs-per-session", type=int, default=10)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of each of our queries")
    args = parser.parse_args()
    if args.sessions < SESSIONS_PER_REF or args.legs_per_session < 1 or args.runs < 1:
        parser.error(f"need --sessions >= {SESSIONS_PER_REF}, --legs-per-session >= 1, --runs >= 1")

    url = database_url()
    upgrade(url)
    engine = create_engine(sqlalchemy_url(url))
    fill(engine, args.sessions, args.legs_per_session)

    results = []
    for case in cases(args.sessions, args.runs):
        ours_rows = run_once(engine, case.ours, case.params[0], raw=False)[1]
        baseline_rows = run_once(engine, case.baseline, case.params[0], raw=True)[1]
        if not ours_rows or ours_rows != baseline_rows:
            sys.exit(f"{case.name}: the view and its baseline disagree (or found nothing)")
        ours = median_ms(engine, case.ours, case.params, args.runs, raw=False)
        baseline = median_ms(engine, case.baseline, case.params, args.runs, raw=True)
        results.append((case, ours, baseline))

    print(f"\n{args.sessions:,} sessions, {args.sessions * args.legs_per_session:,} legs; "
          f"median of {args.runs} runs after a warm-up; same answers checked\n")
    headers = ("query", "ours ms", "baseline ms", "baseline/ours", "ours < 100 ms", "baseline")
    table = [(case.name, f"{ours:.2f}", f"{baseline:.2f}", f"{baseline / ours:.0f}x", "yes" if ours < 100 else "NO",
              case.baseline_label) for case, ours, baseline in results]
    widths = [max(len(str(row[i])) for row in [headers, *table]) for i in range(len(headers))]
    for row in [headers, tuple("-" * w for w in widths), *table]:
        print("  ".join(cell.rjust(w) if i in (1, 2, 3) else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    if args.explain:
        for case, _, _ in results:
            explain(engine, case)
    engine.dispose()


if __name__ == "__main__":
    main()
