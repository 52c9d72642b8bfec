"""the parties' PINs and Plivo's api_id kept; PINs masked in reporting.session_summary

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 12:00:00.000000

Issue 11 ("Plivo fidelity"). With `generate_pin: true` Plivo generates the parties' PINs, and a
caller must be able to give them to the parties; an operator must be able to quote Plivo's `api_id`
of a call to Plivo's support. So this revision:

* adds `masking_sessions.first_party_pin` and `second_party_pin` (the caller's PINs, or Plivo's
  generated ones; NULL without PIN authentication) and `masking_sessions.plivo_api_id` (the api_id
  of the last Plivo call that changed the row: create, update or refresh);
* adds `session_create_attempts.plivo_api_id` (the create's api_id, when Plivo answered one, error
  answers included);
* replaces `reporting.session_summary` with the same columns plus, at the end, `first_party_pin` and
  `second_party_pin` masked (one `*` per digit: whether a party has a PIN, never the PIN) and
  `plivo_api_id`. Adding columns at the end keeps `CREATE OR REPLACE VIEW` and the reader's grants.

Existing rows get NULLs: their PINs and api_ids were never kept. Adding nullable columns without a
default only touches the catalog. The downgrade restores the view as revision 0004 made it, then
drops the columns (the PINs and api_ids are lost).
"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _revision_0004():
    """Revision 0004's module (its views), to build on and to restore exactly what it made."""
    path = Path(__file__).with_name("0004_reporting_views_and_reader_role.py")
    spec = importlib.util.spec_from_file_location("revision_0004", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUMMARY_EXTRA = """,
               -- One '*' per digit: whether a party has a PIN, never the PIN itself.
               repeat('*', length(s.first_party_pin)) AS first_party_pin,
               repeat('*', length(s.second_party_pin)) AS second_party_pin,
               s.plivo_api_id
          FROM public.masking_sessions s
"""


def upgrade() -> None:
    op.add_column("masking_sessions", sa.Column("first_party_pin", sa.Text(), nullable=True))
    op.add_column("masking_sessions", sa.Column("second_party_pin", sa.Text(), nullable=True))
    op.add_column("masking_sessions", sa.Column("plivo_api_id", sa.Text(), nullable=True))
    op.add_column("session_create_attempts", sa.Column("plivo_api_id", sa.Text(), nullable=True))
    summary = _revision_0004().VIEWS["session_summary"]
    head, tail = summary.rsplit("\n          FROM public.masking_sessions s", 1)
    assert not tail.strip(), "revision 0004's session_summary ends with its FROM"
    op.execute(f"CREATE OR REPLACE VIEW reporting.session_summary AS {head}{SUMMARY_EXTRA}")


def downgrade() -> None:
    op.execute("DROP VIEW reporting.session_summary")
    module = _revision_0004()
    op.execute(f"CREATE VIEW reporting.session_summary AS {module.VIEWS['session_summary']}")
    op.execute(f"COMMENT ON VIEW reporting.session_summary IS '{module.COMMENTS['session_summary']}'")
    op.execute(f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{module.READER}') THEN
                GRANT SELECT ON reporting.session_summary TO {module.READER};
            END IF;
        END
        $$
    """)
    op.drop_column("session_create_attempts", "plivo_api_id")
    op.drop_column("masking_sessions", "plivo_api_id")
    op.drop_column("masking_sessions", "second_party_pin")
    op.drop_column("masking_sessions", "first_party_pin")
