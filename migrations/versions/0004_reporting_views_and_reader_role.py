"""reporting views and reader role

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 02:10:00.000000

Schema `reporting` holds read-only views with stable columns (documented in docs/reporting.md),
and role `reporting_reader` may read them and nothing else. The views run with their owner's
rights, so the reader needs no privilege on the tables behind them.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

READER = "reporting_reader"

# The UTC day a session was created, as call_activity_daily groups it; indexed so that a filter on
# that view's `day` reaches masking_sessions as an index range instead of a full scan. The index
# INCLUDEs created_at because Postgres only scans an expression index index-only when the
# columns the expression reads are in the index too.
CREATED_DAY = "(timezone('UTC', created_at))::date"

VIEWS = {
    "session_summary": """
        SELECT s.session_uuid, s.external_ref, s.origin, s.first_party, s.second_party, s.virtual_number,
               s.status, s.created_at, s.expires_at, s.expired_at AS ended_at,
               s.call_count, s.answered_call_count, s.billed_duration,
               round(s.billed_duration / 60.0, 2) AS billed_minutes,
               s.amount, s.session_amount, s.amount + coalesce(s.session_amount, 0) AS total_amount,
               s.recording_count, s.last_interaction_at,
               s.plivo_call_count, s.plivo_billed_duration, s.plivo_amount,
               -- NULL until reconciliation has stored Plivo's totals
               s.call_count - s.plivo_call_count AS call_count_drift,
               s.billed_duration - s.plivo_billed_duration AS billed_duration_drift,
               s.amount - s.plivo_amount AS amount_drift,
               s.reconciled_at
          FROM public.masking_sessions s
    """,
    # Both sources are grouped by day and stacked, then summed per day, rather than joined with a
    # FULL JOIN: the rows are the same (every day either side has), but a filter on `day` can be
    # pushed below a GROUP BY and into each arm of a UNION ALL, not through a FULL JOIN's
    # coalesce(a.day, b.day). That push-down is what lets a month's query read one range of
    # ix_masking_sessions_created_day (index-only) and of daily_call_totals, whatever the history.
    "call_activity_daily": f"""
        SELECT day,
               sum(sessions_created)::bigint AS sessions_created,
               sum(sessions_with_calls)::bigint AS sessions_with_calls,
               sum(call_legs)::bigint AS call_legs,
               sum(answered_legs)::bigint AS answered_legs,
               round(sum(answered_legs) / nullif(sum(call_legs), 0), 4) AS answer_rate,
               sum(billed_duration)::bigint AS billed_duration,
               round(sum(billed_duration) / 60.0, 2) AS billed_minutes,
               sum(amount) AS amount,
               round(sum(answered_billed_duration) / nullif(sum(answered_legs), 0), 2)
                   AS avg_billed_seconds_per_answered_leg,
               sum(recordings)::bigint AS recordings
          FROM (SELECT {CREATED_DAY} AS day, count(*) AS sessions_created, 0 AS sessions_with_calls,
                       0 AS call_legs, 0 AS answered_legs, 0 AS billed_duration, 0 AS answered_billed_duration,
                       0::numeric(18, 5) AS amount, 0 AS recordings
                  FROM public.masking_sessions
                 GROUP BY 1
                UNION ALL
                SELECT day, 0, sessions_with_calls, call_legs, answered_legs, billed_duration,
                       answered_billed_duration, amount, recordings
                  FROM public.daily_call_totals) AS activity
         GROUP BY day
         -- Deltas can leave a day's shard rows all zero (a leg moved to another day); a recount
         -- would have no such day, so neither does the view.
        HAVING sum(sessions_created) > 0 OR sum(call_legs) > 0 OR sum(recordings) > 0
    """,
    "call_legs": """
        SELECT s.session_uuid, s.external_ref, s.virtual_number, l.party, l.call_uuid,
               l.from_number, l.to_number, l.initiated_at, l.ringing_at, l.answered_at, l.ended_at,
               l.answered_at IS NOT NULL AS answered, l.end_event, l.hangup_cause, l.hangup_cause_code,
               l.duration, l.billed_duration, round(l.billed_duration / 60.0, 2) AS billed_minutes,
               l.amount, l.source
          FROM public.call_legs l
          JOIN public.masking_sessions s ON s.id = l.session_id
    """,
    "recordings": """
        SELECT s.session_uuid, s.external_ref, r.recording_uuid, r.status, r.recording_url, r.resource_url,
               r.duration, r.format, r.started_at, r.ended_at
          FROM public.recordings r
          JOIN public.masking_sessions s ON s.id = r.session_id
    """,
    "pin_authentications": """
        SELECT s.session_uuid, s.external_ref, p.event_at, p.status, p.retry_counter, p.from_number
          FROM public.pin_authentications p
          JOIN public.masking_sessions s ON s.id = p.session_id
    """,
    "virtual_number_history": """
        SELECT s.session_uuid, h.virtual_number, h.assigned_at
          FROM public.virtual_number_history h
          JOIN public.masking_sessions s ON s.id = h.session_id
    """,
}

COMMENTS = {
    "session_summary": "One row per masking session with its call, cost and recording totals. See docs/reporting.md.",
    "call_activity_daily": "Sessions created and call activity per UTC day. See docs/reporting.md.",
    "call_legs": "Every call leg with its session. See docs/reporting.md.",
    "recordings": "Every recording with its session. See docs/reporting.md.",
    "pin_authentications": "Every PIN check Plivo reported. See docs/reporting.md.",
    "virtual_number_history": "Every virtual number a session has had. See docs/reporting.md.",
}


def upgrade() -> None:
    # A plain (not CONCURRENTLY) build keeps the revision atomic; it blocks writes to
    # masking_sessions while it runs: about 1.2 s per million sessions (bench/reporting.py database).
    op.create_index("ix_masking_sessions_created_day", "masking_sessions", [sa.text(f"({CREATED_DAY})")],
                    unique=False, postgresql_include=["created_at"])
    op.execute("CREATE SCHEMA reporting")
    for name, query in VIEWS.items():
        op.execute(f"CREATE VIEW reporting.{name} AS {query}")
        op.execute(f"COMMENT ON VIEW reporting.{name} IS '{COMMENTS[name]}'")
    # Roles belong to the cluster, not the database: another database on the server (a test or
    # staging copy) may have created it already, possibly at the same moment as this one. On a
    # managed Postgres where the migrating user may not create roles, the views are still made
    # and a notice says so: an administrator creates the role, then re-runs the grants below.
    op.execute(f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
                CREATE ROLE {READER} NOLOGIN;
            END IF;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created concurrently by another database's migration
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'cannot create role {READER} (no CREATEROLE): create it, then grant it '
                             'USAGE on schema reporting and SELECT on its views';
        END
        $$
    """)
    op.execute(f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
                GRANT USAGE ON SCHEMA reporting TO {READER};
                GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO {READER};
                -- Views added to the schema later by this migration's role are readable too.
                ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT SELECT ON TABLES TO {READER};
            END IF;
        END
        $$
    """)


def downgrade() -> None:
    # Dropping the views and the schema also drops every grant on them and the schema's default
    # privileges: no REVOKE is needed, and nothing in this database refers to the role afterwards.
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW reporting.{name}")
    op.execute("DROP SCHEMA reporting")
    # The role itself is kept: it is cluster-wide, and other databases on the server may still
    # grant it their own reporting views.
    op.drop_index("ix_masking_sessions_created_day", table_name="masking_sessions")
