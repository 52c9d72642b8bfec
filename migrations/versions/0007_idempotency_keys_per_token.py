"""idempotency keys scoped per API token

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 12:00:00.000000

An `Idempotency-Key` was unique across every token: a caller replaying another caller's key got that
caller's response (and two callers that picked the same key, an order id say, shared one session).
Keys are now each caller's own, as Stripe scopes them per account. So this revision:

* adds `session_create_attempts.token_id`: HMAC-SHA256 of the bearer token under a fixed label
  (`webhook_service.domain.callers.token_id`), never the token itself;
* moves the unique constraint from `(idempotency_key)` to `(token_id, idempotency_key)`.

Rows from before this revision get a `token_id` of NULL: which token made them is not known. NULL
equals nothing in a unique constraint or a lookup, so their keys are nobody's: a create retried
across the upgrade with a key first sent before it creates a new session instead of replaying the
first answer. Upgrade when no create is being retried (the window is a client's retry delay), or
accept that rare duplicate. Both statements take a short ACCESS EXCLUSIVE lock on the table (the
index is built under it; the table holds at most the retention period's attempts).

The downgrade restores one key space: where callers shared a key, the earliest attempt keeps it and
the later ones lose theirs (set to NULL, as a create that freed its key), then `token_id` is dropped.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("session_create_attempts", sa.Column("token_id", sa.Text(), nullable=True))
    op.drop_constraint(op.f("uq_session_create_attempts_idempotency_key"), "session_create_attempts", type_="unique")
    op.create_unique_constraint("uq_session_create_attempts_token_id_idempotency_key", "session_create_attempts",
                                ["token_id", "idempotency_key"])


def downgrade() -> None:
    op.execute("""
        UPDATE session_create_attempts a SET idempotency_key = NULL
         WHERE a.idempotency_key IS NOT NULL
           AND EXISTS (SELECT FROM session_create_attempts b
                        WHERE b.idempotency_key = a.idempotency_key AND b.id < a.id)
    """)
    op.drop_constraint("uq_session_create_attempts_token_id_idempotency_key", "session_create_attempts",
                       type_="unique")
    op.drop_column("session_create_attempts", "token_id")
    op.create_unique_constraint(op.f("uq_session_create_attempts_idempotency_key"), "session_create_attempts",
                                ["idempotency_key"])
