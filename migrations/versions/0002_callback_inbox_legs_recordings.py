"""callback inbox, leg events, call legs, recordings, number history, PIN checks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 01:55:23.341903
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callback_inbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=True),
        sa.Column("params", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("nonce", sa.Text(), nullable=True),
        sa.Column("dedupe_key", sa.Text(), nullable=False),
        sa.Column("event_name", sa.Text(), nullable=True),
        sa.Column("session_uuid", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("endpoint IN ('session', 'recording')", name=op.f("ck_callback_inbox_endpoint")),
        sa.CheckConstraint(
            "status IN ('pending', 'applied', 'ignored', 'failed')", name=op.f("ck_callback_inbox_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_inbox")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_callback_inbox_dedupe_key")),
    )
    op.create_index("ix_callback_inbox_received_at", "callback_inbox", ["received_at"], unique=False)
    op.create_index("ix_callback_inbox_session_uuid", "callback_inbox", ["session_uuid"], unique=False)
    op.create_index(
        "ix_callback_inbox_unfinished",
        "callback_inbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'failed')"),
    )
    op.create_table(
        "call_legs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("party", sa.Text(), nullable=False),
        sa.Column("call_uuid", sa.Text(), nullable=True),
        sa.Column("initiated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ringing_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_event", sa.Text(), nullable=True),
        sa.Column("duration", sa.Integer(), nullable=True),
        sa.Column("billed_duration", sa.Integer(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=14, scale=5), nullable=True),
        sa.Column("hangup_cause", sa.Text(), nullable=True),
        sa.Column("hangup_cause_code", sa.Integer(), nullable=True),
        sa.Column("from_number", sa.Text(), nullable=True),
        sa.Column("to_number", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), server_default="callback", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("end_event IN ('hangup', 'complete', 'failed')", name=op.f("ck_call_legs_end_event")),
        sa.CheckConstraint("party IN ('first', 'second')", name=op.f("ck_call_legs_party")),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["masking_sessions.id"],
            name=op.f("fk_call_legs_session_id_masking_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_legs")),
    )
    op.create_index("ix_call_legs_ended_at", "call_legs", ["ended_at"], unique=False)
    op.create_index("ix_call_legs_session_id_party", "call_legs", ["session_id", "party"], unique=False)
    op.create_table(
        "leg_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("party", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("call_uuid", sa.Text(), nullable=True),
        sa.Column("end_event", sa.Text(), nullable=True),
        sa.Column("duration", sa.Integer(), nullable=True),
        sa.Column("billed_duration", sa.Integer(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=14, scale=5), nullable=True),
        sa.Column("hangup_cause", sa.Text(), nullable=True),
        sa.Column("hangup_cause_code", sa.Integer(), nullable=True),
        sa.Column("from_number", sa.Text(), nullable=True),
        sa.Column("to_number", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("end_event IN ('hangup', 'complete', 'failed')", name=op.f("ck_leg_events_end_event")),
        sa.CheckConstraint("kind IN ('initiated', 'ringing', 'answered', 'ended')", name=op.f("ck_leg_events_kind")),
        sa.CheckConstraint("party IN ('first', 'second')", name=op.f("ck_leg_events_party")),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["masking_sessions.id"],
            name=op.f("fk_leg_events_session_id_masking_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leg_events")),
    )
    op.create_index("uq_leg_events_fact", "leg_events", ["session_id", "party", "kind", "at"], unique=True)
    op.create_table(
        "pin_authentications",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("retry_counter", sa.Integer(), nullable=True),
        sa.Column("from_number", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["masking_sessions.id"],
            name=op.f("fk_pin_authentications_session_id_masking_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pin_authentications")),
    )
    op.create_index(
        "uq_pin_authentications_event",
        "pin_authentications",
        ["session_id", "event_at", "from_number", "retry_counter"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.create_table(
        "recordings",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("recording_uuid", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("recording_url", sa.Text(), nullable=True),
        sa.Column("resource_url", sa.Text(), nullable=True),
        sa.Column("duration", sa.Integer(), nullable=True),
        sa.Column("format", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('initiated', 'completed', 'failed')", name=op.f("ck_recordings_status")),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["masking_sessions.id"],
            name=op.f("fk_recordings_session_id_masking_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recordings")),
        sa.UniqueConstraint("recording_uuid", name=op.f("uq_recordings_recording_uuid")),
    )
    op.create_index("ix_recordings_session_id", "recordings", ["session_id"], unique=False)
    op.create_table(
        "virtual_number_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("virtual_number", sa.Text(), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["masking_sessions.id"],
            name=op.f("fk_virtual_number_history_session_id_masking_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_virtual_number_history")),
    )
    op.create_index(
        "uq_virtual_number_history_assignment",
        "virtual_number_history",
        ["session_id", "virtual_number", "assigned_at"],
        unique=True,
    )
    op.add_column("masking_sessions", sa.Column("virtual_number_changed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("masking_sessions", "virtual_number_changed_at")
    op.drop_index("uq_virtual_number_history_assignment", table_name="virtual_number_history")
    op.drop_table("virtual_number_history")
    op.drop_index("ix_recordings_session_id", table_name="recordings")
    op.drop_table("recordings")
    op.drop_index("uq_pin_authentications_event", table_name="pin_authentications", postgresql_nulls_not_distinct=True)
    op.drop_table("pin_authentications")
    op.drop_index("uq_leg_events_fact", table_name="leg_events")
    op.drop_table("leg_events")
    op.drop_index("ix_call_legs_session_id_party", table_name="call_legs")
    op.drop_index("ix_call_legs_ended_at", table_name="call_legs")
    op.drop_table("call_legs")
    op.drop_index(
        "ix_callback_inbox_unfinished",
        table_name="callback_inbox",
        postgresql_where=sa.text("status IN ('pending', 'failed')"),
    )
    op.drop_index("ix_callback_inbox_session_uuid", table_name="callback_inbox")
    op.drop_index("ix_callback_inbox_received_at", table_name="callback_inbox")
    op.drop_table("callback_inbox")
