"""reconciliation (Plivo interactions and totals) and daily call totals

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 01:59:35.407086
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BACKFILL = """
    INSERT INTO daily_call_totals (day, shard, call_legs, answered_legs, billed_duration,
                                   answered_billed_duration, amount, recordings, sessions_with_calls)
    SELECT day, (session_id % 16)::smallint, sum(legs), sum(answered), sum(billed), sum(answered_billed),
           sum(amount), sum(recordings), count(*) FILTER (WHERE legs > 0)
      FROM (
    SELECT session_id, day, sum(legs) AS legs, sum(answered) AS answered, sum(billed) AS billed,
           sum(answered_billed) AS answered_billed, sum(amount) AS amount, sum(recordings) AS recordings
      FROM (SELECT session_id, (timezone('UTC', coalesce(LEAST(initiated_at, ringing_at, answered_at, ended_at),
                                                   created_at)))::date AS day,
                   1 AS legs, (answered_at IS NOT NULL)::int AS answered, coalesce(billed_duration, 0) AS billed,
                   CASE WHEN answered_at IS NOT NULL THEN coalesce(billed_duration, 0) ELSE 0 END AS answered_billed,
                   coalesce(amount, 0) AS amount, 0 AS recordings
              FROM call_legs WHERE true
            UNION ALL
            SELECT session_id, (timezone('UTC', coalesce(started_at, ended_at, created_at)))::date, 0, 0, 0, 0, 0, 1
              FROM recordings WHERE status <> 'failed' AND true) AS activity
     GROUP BY session_id, day
) AS per_session
     GROUP BY day, (session_id % 16)
"""


def upgrade() -> None:
    op.create_table(
        "daily_call_totals",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("call_legs", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("answered_legs", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("billed_duration", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("answered_billed_duration", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("amount", sa.Numeric(precision=18, scale=5), server_default="0", nullable=False),
        sa.Column("recordings", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("sessions_with_calls", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("day", "shard", name=op.f("pk_daily_call_totals")),
    )
    # Backfill from the legs and recordings already stored (a frozen copy of
    # webhook_service.reporting.daily_totals.RECOUNT as of this revision).
    op.execute(BACKFILL)
    op.create_table(
        "plivo_interactions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_call_uuid", sa.Text(), nullable=True),
        sa.Column("second_call_uuid", sa.Text(), nullable=True),
        sa.Column("first_status", sa.Text(), nullable=True),
        sa.Column("second_status", sa.Text(), nullable=True),
        sa.Column("call_count", sa.Integer(), nullable=True),
        sa.Column("duration", sa.Integer(), nullable=True),
        sa.Column("billed_duration", sa.Integer(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=14, scale=5), nullable=True),
        sa.Column("recording_uuid", sa.Text(), nullable=True),
        sa.Column("fetched_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["masking_sessions.id"],
            name=op.f("fk_plivo_interactions_session_id_masking_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plivo_interactions")),
    )
    op.create_index("uq_plivo_interactions_start", "plivo_interactions", ["session_id", "started_at"], unique=True)
    op.add_column(
        "masking_sessions", sa.Column("answered_call_count", sa.Integer(), server_default="0", nullable=False)
    )
    op.execute(
        "UPDATE masking_sessions s SET answered_call_count = "
        "(SELECT count(*) FROM call_legs l WHERE l.session_id = s.id AND l.answered_at IS NOT NULL)"
    )
    op.add_column("masking_sessions", sa.Column("plivo_call_count", sa.Integer(), nullable=True))
    op.add_column("masking_sessions", sa.Column("plivo_billed_duration", sa.Integer(), nullable=True))
    op.add_column("masking_sessions", sa.Column("plivo_amount", sa.Numeric(precision=14, scale=5), nullable=True))
    op.add_column("masking_sessions", sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("masking_sessions", "reconciled_at")
    op.drop_column("masking_sessions", "plivo_amount")
    op.drop_column("masking_sessions", "plivo_billed_duration")
    op.drop_column("masking_sessions", "plivo_call_count")
    op.drop_column("masking_sessions", "answered_call_count")
    op.drop_table("daily_call_totals")
    op.drop_index("uq_plivo_interactions_start", table_name="plivo_interactions")
    op.drop_table("plivo_interactions")
