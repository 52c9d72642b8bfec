"""Tables, as typed SQLAlchemy 2 models. Alembic revisions in `migrations/` create them."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..domain.vocabulary import (
    ATTEMPT_STATES,
    FACT_KINDS,
    INBOX_ENDPOINTS,
    INBOX_STATUSES,
    LEG_END_EVENTS,
    LEG_PHASES,
    PARTIES,
    RECORDING_STATUSES,
    SESSION_ORIGINS,
    SESSION_STATUSES,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Money = Numeric(14, 5)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True), Decimal: Money}


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class MaskingSession(Base):
    """One Plivo masking session: its parties, virtual number, status and call totals."""

    __tablename__ = "masking_sessions"
    __table_args__ = (
        CheckConstraint(f"status IN {SESSION_STATUSES}", name="status"),
        CheckConstraint(f"origin IN {SESSION_ORIGINS}", name="origin"),
        # Keyset pagination walks (created_at, id) newest first.
        Index("ix_masking_sessions_created_at_id", "created_at", "id"),
        Index("ix_masking_sessions_external_ref", "external_ref"),
        Index("ix_masking_sessions_first_party", "first_party"),
        Index("ix_masking_sessions_second_party", "second_party"),
        Index("ix_masking_sessions_virtual_number", "virtual_number"),
        Index("ix_masking_sessions_status", "status"),
        Index("ix_masking_sessions_subaccount", "subaccount"),
        # reporting.call_activity_daily groups and filters sessions by their UTC creation day.
        Index("ix_masking_sessions_created_day", text("((timezone('UTC', created_at))::date)"),
              postgresql_include=["created_at"]),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_uuid: Mapped[str] = mapped_column(Text, unique=True)
    external_ref: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=text("'{}'::jsonb"))
    first_party: Mapped[str | None] = mapped_column(Text)
    second_party: Mapped[str | None] = mapped_column(Text)
    # The number Plivo gave the session when it was created (or the first callback showed, for a
    # session discovered by callback): SessionVirtualNumberReplaced facts move `virtual_number`
    # away from it, and `virtual_number_history` starts with it. Only the API and reconciliation
    # write it; the projector reads it.
    original_virtual_number: Mapped[str | None] = mapped_column(Text)
    # The number in use now: projected (the newest replacement, else the original).
    virtual_number: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="active")
    # How we learnt of the session: created through our API, first seen in a callback, or
    # found by reconciliation (a create whose outcome was unknown).
    origin: Mapped[str] = mapped_column(Text, server_default="api")
    # Every create parameter sent to Plivo (callback URLs included), as sent.
    create_params: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    record: Mapped[bool | None] = mapped_column(Boolean)
    session_expiry: Mapped[int | None] = mapped_column(Integer)
    plivo_created_at: Mapped[datetime | None]
    plivo_modified_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # when the session is due to expire (Plivo's expiry_time)
    # What others reported, as reported: the projection's inputs (only it writes the three below).
    plivo_expired_at: Mapped[datetime | None]  # Plivo said it expired (reconciliation, an update's answer)
    api_expired_at: Mapped[datetime | None]  # this service's API expired it on Plivo
    plivo_last_interaction_at: Mapped[datetime | None]  # Plivo's last_interaction_time, last read
    # Projected from those, the callbacks and the clock (`domain.projection.project`).
    expired_at: Mapped[datetime | None]
    last_interaction_at: Mapped[datetime | None]
    # When the virtual number last changed (the newest SessionVirtualNumberReplaced): projected.
    virtual_number_changed_at: Mapped[datetime | None]
    # Plivo's `amount`: the charge for creating the session (calls are in `amount` below).
    session_amount: Mapped[Decimal | None]
    # The parties' PINs (the caller's, or Plivo's with generate_pin): secrets of the parties, never
    # logged, shown masked in the reporting views.
    first_party_pin: Mapped[str | None] = mapped_column(Text)
    second_party_pin: Mapped[str | None] = mapped_column(Text)
    plivo_api_id: Mapped[str | None] = mapped_column(Text)  # Plivo's api_id of the last call that changed it
    # The Plivo subaccount (auth ID) the session was created on; NULL: the main account's.
    subaccount: Mapped[str | None] = mapped_column(Text)
    call_count: Mapped[int] = mapped_column(Integer, server_default="0")
    answered_call_count: Mapped[int] = mapped_column(Integer, server_default="0")
    billed_duration: Mapped[int] = mapped_column(Integer, server_default="0")
    amount: Mapped[Decimal] = mapped_column(Money, server_default="0")
    recording_count: Mapped[int] = mapped_column(Integer, server_default="0")
    # Plivo's own totals at the last reconciliation, kept beside ours so drift is visible.
    plivo_call_count: Mapped[int | None] = mapped_column(Integer)
    plivo_billed_duration: Mapped[int | None] = mapped_column(Integer)
    plivo_amount: Mapped[Decimal | None]
    reconciled_at: Mapped[datetime | None]
    # How many times the session has been projected: a projector's kept copy of the session is
    # current while it is of this number (`services.projector`).
    projection_version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class SessionCreateAttempt(Base):
    """One `POST /v1/sessions`: its caller and idempotency key, what we sent Plivo, and how it ended.

    The row is committed before Plivo is called, so a create whose outcome is unknown (a timeout
    after sending) is never forgotten: `flask sessions resolve` finds the session on Plivo later.
    A key is unique per caller (`token_id`), not across callers.
    """

    __tablename__ = "session_create_attempts"
    __table_args__ = (
        CheckConstraint(f"state IN {ATTEMPT_STATES}", name="state"),
        UniqueConstraint("token_id", "idempotency_key", name="uq_session_create_attempts_token_id_idempotency_key"),
        Index(
            "ix_session_create_attempts_unresolved",
            "started_at",
            postgresql_where=text("state IN ('pending', 'unknown')"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # The caller: `domain.callers.token_id` of the bearer token (never the token). NULL: made before
    # revision 0007, when keys were shared by every token; such a row's key is nobody's to replay.
    token_id: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    request_hash: Mapped[str] = mapped_column(Text)
    request_body: Mapped[dict[str, Any]]
    plivo_params: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(Text, server_default="pending")
    first_party: Mapped[str | None] = mapped_column(Text)
    second_party: Mapped[str | None] = mapped_column(Text)
    session_uuid: Mapped[str | None] = mapped_column(Text)
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    plivo_api_id: Mapped[str | None] = mapped_column(Text)  # Plivo's api_id of the create, when it answered one
    started_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None]



class CallbackInbox(Base):
    """Every verified Plivo callback as it arrived, stored exactly once (retention prunes it).

    `dedupe_key` is a hash of the exact string the callback's signature covers, without the nonce
    (which changes on redelivery): every redelivery, and every reshaping of the parameters that
    still verifies, hits the unique constraint and is a no-op. Its fact goes to `callback_facts` in
    the same statement; `status` says whether it had one (`recorded`), had none (`ignored`) or
    could not be read (`failed`, with the reason in `error`, for `flask callbacks replay`).

    Partitioned by month (migration 0011): `event_month` is the month of the EventTimestamp in the
    string the signature covers (as the dedupe key, a function of that string), so every copy of a
    callback falls in one partition and `(dedupe_key, event_month)` is unique across the retention
    window; retention drops a month's partition (`services.inbox.prune`), and the worker creates the
    next months ahead (`ensure_partitions`).
    The partitions themselves are made by the migration and the worker, not declared here.
    """

    __tablename__ = "callback_inbox"
    __table_args__ = (
        CheckConstraint(f"status IN {INBOX_STATUSES}", name="status"),
        CheckConstraint(f"endpoint IN {INBOX_ENDPOINTS}", name="endpoint"),
        UniqueConstraint("dedupe_key", "event_month", name="uq_callback_inbox_dedupe_key"),
        # Rows arrive in received_at order: a BRIN index finds a retention window's blocks for a
        # fraction of a B-tree's size and insert cost.
        Index("ix_callback_inbox_received_at", "received_at", postgresql_using="brin"),
        Index("ix_callback_inbox_failed", "id", postgresql_where=text("status = 'failed'")),
        {"postgresql_partition_by": "RANGE (event_month)"},
    )

    # One sequence for every partition (PostgreSQL 15 has no identity on a partitioned table): the
    # column's default is nextval('callback_inbox_id_seq'), set by migration 0011 (Alembic reads a
    # nextval default as the column's own sequence and compares nothing).
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_month: Mapped[date] = mapped_column(
        Date, primary_key=True, server_default=text("(date_trunc('month', timezone('UTC', now())))::date"))
    received_at: Mapped[datetime] = _now()
    endpoint: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]]
    nonce: Mapped[str | None] = mapped_column(Text)
    dedupe_key: Mapped[str] = mapped_column(Text)
    event_name: Mapped[str | None] = mapped_column(Text)
    session_uuid: Mapped[str | None] = mapped_column(Text)  # not indexed: a session's callbacks are its facts'
    status: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="1")  # 1, plus one per replay


class LegValues:
    """The values a leg callback reports and a call leg keeps, in one place for both tables."""

    call_uuid: Mapped[str | None] = mapped_column(Text)
    end_event: Mapped[str | None] = mapped_column(Text)  # how an ended leg ended
    duration: Mapped[int | None] = mapped_column(Integer)
    billed_duration: Mapped[int | None] = mapped_column(Integer)
    amount: Mapped[Decimal | None]
    hangup_cause: Mapped[str | None] = mapped_column(Text)
    hangup_cause_code: Mapped[int | None] = mapped_column(Integer)
    from_number: Mapped[str | None] = mapped_column(Text)
    to_number: Mapped[str | None] = mapped_column(Text)


class CallbackFact(LegValues, Base):
    """What one callback reported, read by `domain.callbacks.parse_callback`: a projection's input.

    One row per callback that carried a fact (`inbox_id`), written in the same statement as its
    inbox row and kept for good (the inbox's raw rows are pruned). A session's call legs, counters,
    recordings, status and number history are one pure function of its facts and of Plivo's
    interaction records (`domain.projection.project`), so arrival order and duplicates cannot
    matter. Keyed by session first: a session's facts are one index range, and the table shards
    by session. Facts migrated from before revision 0006 have an `inbox_id` that no inbox row has.
    """

    __tablename__ = "callback_facts"
    __table_args__ = (
        CheckConstraint(f"kind IN {FACT_KINDS}", name="kind"),
        CheckConstraint(f"party IN {PARTIES}", name="party"),
        CheckConstraint(f"phase IN {LEG_PHASES}", name="phase"),
        CheckConstraint(f"end_event IN {LEG_END_EVENTS}", name="end_event"),
        CheckConstraint(f"recording_status IN {RECORDING_STATUSES}", name="recording_status"),
    )

    session_uuid: Mapped[str] = mapped_column(Text, primary_key=True)
    inbox_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    event_name: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime]  # EventTimestamp
    sequence_number: Mapped[int | None] = mapped_column(BigInteger)
    party: Mapped[str | None] = mapped_column(Text)  # a leg's party; None: the caller, known by number
    phase: Mapped[str | None] = mapped_column(Text)  # a leg's phase: initiated, ringing, answered, ended
    first_party: Mapped[str | None] = mapped_column(Text)
    second_party: Mapped[str | None] = mapped_column(Text)
    virtual_number: Mapped[str | None] = mapped_column(Text)
    pin_status: Mapped[str | None] = mapped_column(Text)  # success | failed | AuthorizedCaller, as sent
    pin_retry_counter: Mapped[int | None] = mapped_column(Integer)
    recording_uuid: Mapped[str | None] = mapped_column(Text)
    recording_status: Mapped[str | None] = mapped_column(Text)
    recording_url: Mapped[str | None] = mapped_column(Text)  # stored as data, never fetched by this service
    recording_resource_url: Mapped[str | None] = mapped_column(Text)
    recording_duration: Mapped[int | None] = mapped_column(Integer)
    recording_format: Mapped[str | None] = mapped_column(Text)
    recording_started_at: Mapped[datetime | None]
    recording_ended_at: Mapped[datetime | None]
    recorded_at: Mapped[datetime] = _now()


class ProjectionQueue(Base):
    """Sessions with facts their projection has not read yet: one row per new fact (or change).

    Writers only append (no row is ever updated), so concurrent callbacks of one session never wait
    on each other. A projection deletes exactly the rows it read before loading the facts; a row
    written meanwhile stays, and the session is projected again (`services.projector`).
    """

    __tablename__ = "projection_queue"
    __table_args__ = (Index("ix_projection_queue_session_uuid", "session_uuid"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_uuid: Mapped[str] = mapped_column(Text)
    inbox_id: Mapped[int | None] = mapped_column(BigInteger)  # the new fact's (None: no new fact)
    queued_at: Mapped[datetime] = _now()


class CallLeg(LegValues, Base):
    """One call leg (the first or the second party's) of a call through a session: projected.

    Derived from the session's leg facts (callbacks carry no call UUID, so a leg is known by its
    party and end time) and Plivo's interaction records, which add call UUIDs and the legs no
    callback reported (`domain.legs.build_legs`).
    """

    __tablename__ = "call_legs"
    __table_args__ = (
        CheckConstraint(f"party IN {PARTIES}", name="party"),
        CheckConstraint(f"end_event IN {LEG_END_EVENTS}", name="end_event"),
        Index("ix_call_legs_session_id_party", "session_id", "party"),
        Index("ix_call_legs_ended_at", "ended_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("masking_sessions.id", ondelete="CASCADE"))
    party: Mapped[str] = mapped_column(Text)
    initiated_at: Mapped[datetime | None]
    ringing_at: Mapped[datetime | None]
    answered_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    source: Mapped[str] = mapped_column(Text, server_default="callback")
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Recording(Base):
    """One recording (Plivo records each call of a session to its own file): projected from the
    recording callbacks' facts and Plivo's interaction records."""

    __tablename__ = "recordings"
    __table_args__ = (
        CheckConstraint(f"status IN {RECORDING_STATUSES}", name="status"),
        Index("uq_recordings_session_id_recording_uuid", "session_id", "recording_uuid", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("masking_sessions.id", ondelete="CASCADE"))
    recording_uuid: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    # Stored, never fetched by this service: a URL in a callback is only data.
    recording_url: Mapped[str | None] = mapped_column(Text)
    resource_url: Mapped[str | None] = mapped_column(Text)
    duration: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    reported_at: Mapped[datetime]  # the earliest fact about it (the day it counts on when it has no times)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class VirtualNumberAssignment(Base):
    """Every virtual number a session has had, with the time it took effect: projected.

    SessionVirtualNumberReplaced moves a session to a new number; the original and every
    replacement are listed here (nothing when the number was never replaced).
    """

    __tablename__ = "virtual_number_history"
    __table_args__ = (Index("uq_virtual_number_history_assignment", "session_id", "virtual_number", "assigned_at",
                            unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("masking_sessions.id", ondelete="CASCADE"))
    virtual_number: Mapped[str] = mapped_column(Text)
    assigned_at: Mapped[datetime]
    recorded_at: Mapped[datetime] = _now()


class DailyCallTotals(Base):
    """Call activity per UTC day, kept current by every projection in its own transaction.

    Reporting a month must not scan tens of millions of legs, so each projection that changes a
    session's legs or recordings adds the change (after minus before) to these rows. A day is
    split into `shard`s (one picked per projection transaction, `persistence.projections`) so
    concurrent projectors do not queue on one hot row; the reporting view sums the shards.
    """

    __tablename__ = "daily_call_totals"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    call_legs: Mapped[int] = mapped_column(BigInteger, server_default="0")
    answered_legs: Mapped[int] = mapped_column(BigInteger, server_default="0")
    billed_duration: Mapped[int] = mapped_column(BigInteger, server_default="0")
    answered_billed_duration: Mapped[int] = mapped_column(BigInteger, server_default="0")
    amount: Mapped[Decimal] = mapped_column(Numeric(18, 5), server_default="0")
    recordings: Mapped[int] = mapped_column(BigInteger, server_default="0")
    sessions_with_calls: Mapped[int] = mapped_column(BigInteger, server_default="0")


class PlivoInteraction(Base):
    """One entry of Plivo's `interaction[]` for a session, as the last reconciliation read it.

    Plivo's record of each call (its legs' call UUIDs, times and billing). Legs that no callback
    reported are derived from these; legs that callbacks did report get their call UUIDs here.
    """

    __tablename__ = "plivo_interactions"
    __table_args__ = (Index("uq_plivo_interactions_start", "session_id", "started_at", unique=True),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("masking_sessions.id", ondelete="CASCADE"))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    first_call_uuid: Mapped[str | None] = mapped_column(Text)
    second_call_uuid: Mapped[str | None] = mapped_column(Text)
    first_status: Mapped[str | None] = mapped_column(Text)
    second_status: Mapped[str | None] = mapped_column(Text)
    call_count: Mapped[int | None] = mapped_column(Integer)
    duration: Mapped[int | None] = mapped_column(Integer)
    billed_duration: Mapped[int | None] = mapped_column(Integer)
    amount: Mapped[Decimal | None]
    recording_uuid: Mapped[str | None] = mapped_column(Text)
    recording_resource_url: Mapped[str | None] = mapped_column(Text)
    fetched_at: Mapped[datetime] = _now()
