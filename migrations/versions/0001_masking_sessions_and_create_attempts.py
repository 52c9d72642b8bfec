"""masking sessions and create attempts

Revision ID: 0001
Revises:
Create Date: 2026-11-27 01:50:42.830608
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "masking_sessions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_uuid", sa.Text(), nullable=False),
        sa.Column("external_ref", sa.Text(), nullable=True),
        sa.Column(
            "metadata", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("first_party", sa.Text(), nullable=True),
        sa.Column("second_party", sa.Text(), nullable=True),
        sa.Column("virtual_number", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="active", nullable=False),
        sa.Column("origin", sa.Text(), server_default="api", nullable=False),
        sa.Column(
            "create_params",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("record", sa.Boolean(), nullable=True),
        sa.Column("session_expiry", sa.Integer(), nullable=True),
        sa.Column("plivo_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("plivo_modified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_interaction_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("session_amount", sa.Numeric(precision=14, scale=5), nullable=True),
        sa.Column("call_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("billed_duration", sa.Integer(), server_default="0", nullable=False),
        sa.Column("amount", sa.Numeric(precision=14, scale=5), server_default="0", nullable=False),
        sa.Column("recording_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("origin IN ('api', 'callback', 'reconcile')", name=op.f("ck_masking_sessions_origin")),
        sa.CheckConstraint("status IN ('active', 'in-progress', 'expired')", name=op.f("ck_masking_sessions_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_masking_sessions")),
        sa.UniqueConstraint("session_uuid", name=op.f("uq_masking_sessions_session_uuid")),
    )
    op.create_index("ix_masking_sessions_created_at_id", "masking_sessions", ["created_at", "id"], unique=False)
    op.create_index("ix_masking_sessions_external_ref", "masking_sessions", ["external_ref"], unique=False)
    op.create_index("ix_masking_sessions_first_party", "masking_sessions", ["first_party"], unique=False)
    op.create_index("ix_masking_sessions_second_party", "masking_sessions", ["second_party"], unique=False)
    op.create_index("ix_masking_sessions_status", "masking_sessions", ["status"], unique=False)
    op.create_index("ix_masking_sessions_virtual_number", "masking_sessions", ["virtual_number"], unique=False)
    op.create_table(
        "session_create_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("request_body", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("plivo_params", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("first_party", sa.Text(), nullable=True),
        sa.Column("second_party", sa.Text(), nullable=True),
        sa.Column("session_uuid", sa.Text(), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'succeeded', 'failed', 'unknown', 'recovered', 'not_found')",
            name=op.f("ck_session_create_attempts_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_session_create_attempts")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_session_create_attempts_idempotency_key")),
    )
    op.create_index(
        "ix_session_create_attempts_unresolved",
        "session_create_attempts",
        ["started_at"],
        unique=False,
        postgresql_where=sa.text("state IN ('pending', 'unknown')"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_session_create_attempts_unresolved",
        table_name="session_create_attempts",
        postgresql_where=sa.text("state IN ('pending', 'unknown')"),
    )
    op.drop_table("session_create_attempts")
    op.drop_index("ix_masking_sessions_virtual_number", table_name="masking_sessions")
    op.drop_index("ix_masking_sessions_status", table_name="masking_sessions")
    op.drop_index("ix_masking_sessions_second_party", table_name="masking_sessions")
    op.drop_index("ix_masking_sessions_first_party", table_name="masking_sessions")
    op.drop_index("ix_masking_sessions_external_ref", table_name="masking_sessions")
    op.drop_index("ix_masking_sessions_created_at_id", table_name="masking_sessions")
    op.drop_table("masking_sessions")
