"""masking_sessions.subaccount: the Plivo subaccount a session belongs to, for the list filter

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 12:00:00.000000

Issue 11 ("Plivo fidelity"). Plivo's list of sessions filters by `subaccount` (reference §5), and
so does `GET /v1/sessions` now. The subaccount was kept only inside `create_params`; this revision:

* adds `masking_sessions.subaccount` (the auth ID given as `subaccount` at create, or the one
  Plivo's session object shows; NULL for the main account's sessions);
* fills it from `create_params` for the sessions created before it (an UPDATE of the rows that
  have one: only sessions created with `subaccount`, so the rest of the table is not rewritten);
* indexes it, as the other list filters are.

The downgrade drops the index and the column (the value stays in `create_params`).
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("masking_sessions", sa.Column("subaccount", sa.Text(), nullable=True))
    op.execute("UPDATE masking_sessions SET subaccount = create_params ->> 'subaccount'"
               " WHERE create_params ? 'subaccount' AND create_params ->> 'subaccount' <> ''")
    op.create_index("ix_masking_sessions_subaccount", "masking_sessions", ["subaccount"])


def downgrade() -> None:
    op.drop_index("ix_masking_sessions_subaccount", table_name="masking_sessions")
    op.drop_column("masking_sessions", "subaccount")
