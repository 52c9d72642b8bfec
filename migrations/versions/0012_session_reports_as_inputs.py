"""what Plivo and the API report about a session's end and use, kept as the projection's inputs

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 12:00:00.000000

Issue 10 ("one home for each rule"). Reconciliation, the API's expire and the overdue sweep wrote a
session's `status`, `expired_at` and `last_interaction_at` themselves, restating in SQL the rules
the projection (`domain.projection.project`) also applies: an expired session stays expired, at
the earliest time anyone reported, and the last interaction only moves later. Now they store what
they were told, and the projection alone decides. This revision adds the columns they write:

* `plivo_expired_at`: when Plivo said the session expired (its `expiry_time`, or when we read it),
  from reconciliation's GET or an update's answer; NULL while Plivo has not said so;
* `api_expired_at`: when this service's API expired the session on Plivo;
* `plivo_last_interaction_at`: Plivo's `last_interaction_time` at the last reconciliation.

Existing rows need no backfill: their `status`, `expired_at` and `last_interaction_at` already
hold what those reports made them, and the projection keeps what they hold. Adding nullable
columns without a default only touches the catalog. The downgrade drops them; the projected
columns keep their values.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

COLUMNS = ("plivo_expired_at", "api_expired_at", "plivo_last_interaction_at")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("masking_sessions", sa.Column(name, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for name in COLUMNS:
        op.drop_column("masking_sessions", name)
