"""callback facts and the projection queue; the SQL derivation dropped

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 12:00:00.000000

A callback now stores its inbox row, its fact (`callback_facts`) and a row of `projection_queue`
in one statement, and answers; the projector derives the session from all its facts later, in
Python (`domain.projection`). So this revision:

* creates `callback_facts` and `projection_queue`;
* makes a recording's UUID unique within its session (a projection writes only its own session's rows);
* moves the facts kept so far into `callback_facts`: the leg events, the PIN checks, the number
  replacements and the recordings (each gets an `inbox_id` drawn from the inbox's own sequence, so
  it collides with no callback's); the number a session was created with becomes
  `original_virtual_number`, and every session with facts is queued for projection, which gives
  the same legs, counters and totals (tests/test_migrations.py checks it);
* drops `apply_leg_callback`, the view `session_daily_activity`, `leg_day`, `leg_events` and
  `pin_authentications` (the rule each held now lives once, in Python); `reporting.pin_authentications`
  reads the facts, with the same columns;
* inbox rows: `applied` becomes `recorded`; rows left `pending` (stored, never applied) become
  `failed` with a note, for `flask callbacks replay --failed`. The B-tree on `received_at` becomes
  a BRIN index, the partial index covers failed rows only, and the index on `session_uuid` goes
  (a session's callbacks are found through its facts).

The downgrade moves the facts back where it can (leg events, PIN checks, number history and
recordings are projections or facts there too) and recreates what was dropped as revision 0005 had it.
"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FACT_KINDS = "('leg', 'recording', 'timeout', 'number', 'pin', 'call_done')"


def _revision_0005():
    """Revision 0005's module (its SQL), for the downgrade to recreate exactly what it made."""
    path = Path(__file__).with_name("0005_leg_callbacks_in_one_statement.py")
    spec = importlib.util.spec_from_file_location("revision_0005", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PIN_VIEW = """
    SELECT s.session_uuid, s.external_ref, f.at AS event_at, coalesce(f.pin_status, 'unknown') AS status,
           f.pin_retry_counter AS retry_counter, f.from_number
      FROM (SELECT DISTINCT session_uuid, at, pin_status, pin_retry_counter, from_number
              FROM public.callback_facts WHERE kind = 'pin') f
      JOIN public.masking_sessions s ON s.session_uuid = f.session_uuid
"""
OLD_PIN_VIEW = """
    SELECT s.session_uuid, s.external_ref, p.event_at, p.status, p.retry_counter, p.from_number
      FROM public.pin_authentications p
      JOIN public.masking_sessions s ON s.id = p.session_id
"""


def upgrade() -> None:
    op.create_table(
        "callback_facts",
        sa.Column("session_uuid", sa.Text(), nullable=False),
        sa.Column("inbox_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("event_name", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sequence_number", sa.BigInteger(), nullable=True),
        sa.Column("party", sa.Text(), nullable=True),
        sa.Column("phase", sa.Text(), nullable=True),
        sa.Column("end_event", sa.Text(), nullable=True),
        sa.Column("first_party", sa.Text(), nullable=True),
        sa.Column("second_party", sa.Text(), nullable=True),
        sa.Column("virtual_number", sa.Text(), nullable=True),
        sa.Column("from_number", sa.Text(), nullable=True),
        sa.Column("to_number", sa.Text(), nullable=True),
        sa.Column("call_uuid", sa.Text(), nullable=True),
        sa.Column("duration", sa.Integer(), nullable=True),
        sa.Column("billed_duration", sa.Integer(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=14, scale=5), nullable=True),
        sa.Column("hangup_cause", sa.Text(), nullable=True),
        sa.Column("hangup_cause_code", sa.Integer(), nullable=True),
        sa.Column("pin_status", sa.Text(), nullable=True),
        sa.Column("pin_retry_counter", sa.Integer(), nullable=True),
        sa.Column("recording_uuid", sa.Text(), nullable=True),
        sa.Column("recording_status", sa.Text(), nullable=True),
        sa.Column("recording_url", sa.Text(), nullable=True),
        sa.Column("recording_resource_url", sa.Text(), nullable=True),
        sa.Column("recording_duration", sa.Integer(), nullable=True),
        sa.Column("recording_format", sa.Text(), nullable=True),
        sa.Column("recording_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recording_ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("end_event IN ('hangup', 'complete', 'failed')", name=op.f("ck_callback_facts_end_event")),
        sa.CheckConstraint(f"kind IN {FACT_KINDS}", name=op.f("ck_callback_facts_kind")),
        sa.CheckConstraint("party IN ('first', 'second')", name=op.f("ck_callback_facts_party")),
        sa.CheckConstraint("phase IN ('initiated', 'ringing', 'answered', 'ended')",
                           name=op.f("ck_callback_facts_phase")),
        sa.CheckConstraint("recording_status IN ('initiated', 'completed', 'failed')",
                           name=op.f("ck_callback_facts_recording_status")),
        sa.PrimaryKeyConstraint("session_uuid", "inbox_id", name=op.f("pk_callback_facts")),
    )
    op.create_table(
        "projection_queue",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_uuid", sa.Text(), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projection_queue")),
    )
    op.create_index("ix_projection_queue_session_uuid", "projection_queue", ["session_uuid"], unique=False)
    op.add_column("masking_sessions", sa.Column("original_virtual_number", sa.Text(), nullable=True))
    op.add_column("recordings", sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("plivo_interactions", sa.Column("recording_resource_url", sa.Text(), nullable=True))
    # A recording belongs to its session: one session's facts can never move another's row.
    op.drop_constraint(op.f("uq_recordings_recording_uuid"), "recordings", type_="unique")
    op.create_index("uq_recordings_session_id_recording_uuid", "recordings", ["session_id", "recording_uuid"],
                    unique=True)
    op.drop_index("ix_recordings_session_id", table_name="recordings")  # the unique index leads with session_id

    # The facts kept so far, moved. `nextval` of the inbox's sequence: ids no callback has.
    inbox_id = "nextval(pg_get_serial_sequence('callback_inbox', 'id'))"
    op.execute(f"""
        INSERT INTO callback_facts (session_uuid, inbox_id, kind, at, party, phase, end_event, from_number, to_number,
                                    call_uuid, duration, billed_duration, amount, hangup_cause, hangup_cause_code)
        SELECT s.session_uuid, {inbox_id}, 'leg', e.at, e.party, e.kind, e.end_event, e.from_number, e.to_number,
               e.call_uuid, e.duration, e.billed_duration, e.amount, e.hangup_cause, e.hangup_cause_code
          FROM leg_events e JOIN masking_sessions s ON s.id = e.session_id
    """)
    op.execute(f"""
        INSERT INTO callback_facts (session_uuid, inbox_id, kind, event_name, at, from_number, pin_status,
                                    pin_retry_counter)
        SELECT s.session_uuid, {inbox_id}, 'pin', 'SessionPinAuthenticationStatus', p.event_at, p.from_number,
               p.status, p.retry_counter
          FROM pin_authentications p JOIN masking_sessions s ON s.id = p.session_id
    """)
    # The history held the original number (the earliest entry) and every replacement after it.
    op.execute("""
        UPDATE masking_sessions s SET original_virtual_number = coalesce(
            (SELECT h.virtual_number FROM virtual_number_history h WHERE h.session_id = s.id
              ORDER BY h.assigned_at, h.id LIMIT 1),
            s.virtual_number)
    """)
    op.execute(f"""
        INSERT INTO callback_facts (session_uuid, inbox_id, kind, event_name, at, virtual_number)
        SELECT s.session_uuid, {inbox_id}, 'number', 'SessionVirtualNumberReplaced', h.assigned_at, h.virtual_number
          FROM virtual_number_history h JOIN masking_sessions s ON s.id = h.session_id
         WHERE h.id <> (SELECT first.id FROM virtual_number_history first WHERE first.session_id = h.session_id
                         ORDER BY first.assigned_at, first.id LIMIT 1)
    """)
    op.execute(f"""
        INSERT INTO callback_facts (session_uuid, inbox_id, kind, at, recording_uuid, recording_status, recording_url,
                                    recording_resource_url, recording_duration, recording_format,
                                    recording_started_at, recording_ended_at)
        SELECT s.session_uuid, {inbox_id}, 'recording', coalesce(r.started_at, r.ended_at, r.created_at),
               r.recording_uuid, r.status, r.recording_url, r.resource_url, r.duration, r.format, r.started_at,
               r.ended_at
          FROM recordings r JOIN masking_sessions s ON s.id = r.session_id
    """)
    op.execute("UPDATE recordings SET reported_at = coalesce(started_at, ended_at, created_at)")
    op.alter_column("recordings", "reported_at", nullable=False)
    op.execute("""
        INSERT INTO projection_queue (session_uuid)
        SELECT session_uuid FROM masking_sessions s
         WHERE EXISTS (SELECT FROM call_legs l WHERE l.session_id = s.id)
            OR EXISTS (SELECT FROM recordings r WHERE r.session_id = s.id)
            OR EXISTS (SELECT FROM virtual_number_history h WHERE h.session_id = s.id)
         ORDER BY s.id
    """)

    # Projections update each session's row (counters, last interaction) many times: room on its
    # page lets those updates be HOT (no new entry in each of the table's nine indexes).
    op.execute("ALTER TABLE masking_sessions SET (fillfactor = 70)")
    op.execute("ALTER TABLE call_legs SET (fillfactor = 80)")
    op.execute(f"CREATE OR REPLACE VIEW reporting.pin_authentications AS {PIN_VIEW}")
    op.execute("DROP FUNCTION apply_leg_callback")
    op.execute("DROP VIEW session_daily_activity")
    op.execute("DROP FUNCTION leg_day")
    op.drop_index("uq_leg_events_fact", table_name="leg_events")
    op.drop_table("leg_events")
    op.drop_index("uq_pin_authentications_event", table_name="pin_authentications", postgresql_nulls_not_distinct=True)
    op.drop_table("pin_authentications")

    op.drop_constraint(op.f("ck_callback_inbox_status"), "callback_inbox", type_="check")
    op.execute("UPDATE callback_inbox SET status = 'recorded' WHERE status = 'applied'")
    op.execute("""
        UPDATE callback_inbox SET status = 'failed',
               error = 'stored before revision 0006 without being applied: flask callbacks replay --failed records it'
         WHERE status = 'pending'
    """)
    op.create_check_constraint("status", "callback_inbox", "status IN ('recorded', 'ignored', 'failed')")
    op.alter_column("callback_inbox", "status", server_default=None)
    op.alter_column("callback_inbox", "attempts", server_default="1")
    op.drop_column("callback_inbox", "applied_at")
    op.drop_index("ix_callback_inbox_unfinished", table_name="callback_inbox",
                  postgresql_where=sa.text("status IN ('pending', 'failed')"))
    op.create_index("ix_callback_inbox_failed", "callback_inbox", ["id"], unique=False,
                    postgresql_where=sa.text("status = 'failed'"))
    op.drop_index("ix_callback_inbox_received_at", table_name="callback_inbox")
    op.create_index("ix_callback_inbox_received_at", "callback_inbox", ["received_at"], unique=False,
                    postgresql_using="brin")
    # A session's callbacks are found through its facts (callback_facts.inbox_id), which are keyed by
    # session: one index less for every callback to write.
    op.drop_index("ix_callback_inbox_session_uuid", table_name="callback_inbox")


def downgrade() -> None:
    old = _revision_0005()
    op.create_index("ix_callback_inbox_session_uuid", "callback_inbox", ["session_uuid"], unique=False)
    op.drop_index("ix_callback_inbox_received_at", table_name="callback_inbox", postgresql_using="brin")
    op.create_index("ix_callback_inbox_received_at", "callback_inbox", ["received_at"], unique=False)
    op.drop_index("ix_callback_inbox_failed", table_name="callback_inbox",
                  postgresql_where=sa.text("status = 'failed'"))
    op.create_index("ix_callback_inbox_unfinished", "callback_inbox", ["id"], unique=False,
                    postgresql_where=sa.text("status IN ('pending', 'failed')"))
    op.add_column("callback_inbox", sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True))
    op.alter_column("callback_inbox", "attempts", server_default="0")
    op.alter_column("callback_inbox", "status", server_default="pending")
    op.drop_constraint(op.f("ck_callback_inbox_status"), "callback_inbox", type_="check")
    op.execute("UPDATE callback_inbox SET status = 'applied', applied_at = received_at WHERE status = 'recorded'")
    op.create_check_constraint("status", "callback_inbox", "status IN ('pending', 'applied', 'ignored', 'failed')")

    op.create_table(
        "pin_authentications",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("retry_counter", sa.Integer(), nullable=True),
        sa.Column("from_number", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["session_id"], ["masking_sessions.id"],
                                name=op.f("fk_pin_authentications_session_id_masking_sessions"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pin_authentications")),
    )
    op.create_index("uq_pin_authentications_event", "pin_authentications",
                    ["session_id", "event_at", "from_number", "retry_counter"], unique=True,
                    postgresql_nulls_not_distinct=True)
    op.execute("""
        INSERT INTO pin_authentications (session_id, event_at, status, retry_counter, from_number)
        SELECT s.id, f.at, coalesce(f.pin_status, 'unknown'), f.pin_retry_counter, f.from_number
          FROM callback_facts f JOIN masking_sessions s ON s.session_uuid = f.session_uuid
         WHERE f.kind = 'pin'
        ON CONFLICT DO NOTHING
    """)
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
        sa.ForeignKeyConstraint(["session_id"], ["masking_sessions.id"],
                                name=op.f("fk_leg_events_session_id_masking_sessions"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leg_events")),
    )
    op.create_index("uq_leg_events_fact", "leg_events", ["session_id", "party", "kind", "at"], unique=True)
    # A caller known only by number (party NULL) was matched to a party when it was applied.
    op.execute("""
        INSERT INTO leg_events (session_id, party, kind, at, call_uuid, end_event, duration, billed_duration, amount,
                                hangup_cause, hangup_cause_code, from_number, to_number)
        SELECT s.id, coalesce(f.party, CASE WHEN f.from_number = s.first_party THEN 'first'
                                            WHEN f.from_number = s.second_party THEN 'second' END),
               f.phase, f.at, f.call_uuid, f.end_event, f.duration, f.billed_duration, f.amount, f.hangup_cause,
               f.hangup_cause_code, f.from_number, f.to_number
          FROM callback_facts f JOIN masking_sessions s ON s.session_uuid = f.session_uuid
         WHERE f.kind = 'leg'
           AND coalesce(f.party, CASE WHEN f.from_number = s.first_party THEN 'first'
                                      WHEN f.from_number = s.second_party THEN 'second' END) IS NOT NULL
         ORDER BY f.inbox_id
        ON CONFLICT DO NOTHING
    """)
    op.execute(f"CREATE OR REPLACE VIEW reporting.pin_authentications AS {OLD_PIN_VIEW}")
    op.execute("ALTER TABLE masking_sessions RESET (fillfactor)")
    op.execute("ALTER TABLE call_legs RESET (fillfactor)")
    op.execute(old.LEG_DAY)
    op.execute(old.SESSION_DAILY_ACTIVITY)
    op.execute("COMMENT ON VIEW session_daily_activity IS 'One session''s activity per UTC day (internal)'")
    op.execute(old.APPLY_LEG_CALLBACK)

    op.drop_column("plivo_interactions", "recording_resource_url")
    op.create_index("ix_recordings_session_id", "recordings", ["session_id"], unique=False)
    op.drop_index("uq_recordings_session_id_recording_uuid", table_name="recordings")
    op.create_unique_constraint(op.f("uq_recordings_recording_uuid"), "recordings", ["recording_uuid"])
    op.drop_column("recordings", "reported_at")
    op.drop_column("masking_sessions", "original_virtual_number")
    op.drop_index("ix_projection_queue_session_uuid", table_name="projection_queue")
    op.drop_table("projection_queue")
    op.drop_table("callback_facts")
