"""projections re-derive only what new facts change: a projection version and the queued fact

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 15:00:00.000000

A busy session's projector keeps its facts and its last projection between projections and reads
only the facts queued since (`services.projector`). For that:

* `masking_sessions.projection_version` counts the session's projections. Each one writes the
  next number in its transaction; a projector whose kept copy is of an older number (another
  process projected the session meanwhile) reads the session whole again;
* `projection_queue.inbox_id` names the fact a queue row was written for (the fact's key is the
  session and the inbox id). NULL: no new fact (reconciliation, the API, an operator), only a
  reason to project again.

Both columns are added without rewriting a table (a constant default and a nullable column) under
a brief lock. Queue rows from before this revision have no `inbox_id`; a projector kept no copy of
any session across the upgrade (it starts empty), so it reads their sessions whole.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("masking_sessions", sa.Column("projection_version", sa.BigInteger(), server_default="0",
                                                nullable=False))
    op.add_column("projection_queue", sa.Column("inbox_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("projection_queue", "inbox_id")
    op.drop_column("masking_sessions", "projection_version")
