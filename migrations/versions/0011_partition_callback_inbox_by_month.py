"""Partition callback_inbox by month (declarative range partitioning on `event_month`).

Revision ID: 0011
Revises: 0010

At tens of millions of callbacks a day the inbox grows by billions of rows; its retention becomes
dropping a month's partition instead of deleting rows in batches.

The partition key, `event_month`, is the first day of the month of the `EventTimestamp` found in
the string the callback's signature covers (`domain.callbacks.inbox_month`), the same string the
dedupe key hashes: every delivery of one callback (a redelivery, a replay of a captured request,
any reshaping of its parameters that still verifies) has the same string, hence the same month and
the same partition, so the unique key `(dedupe_key, event_month)` is as good as `dedupe_key` alone
was, across the whole retention window, enforced by PostgreSQL in the one statement that stores a
callback. (A unique index on a partitioned table must hold the partition key: keyed by the month of
*arrival* instead, a redelivery on either side of midnight at the end of a month would be stored
twice; keyed by the parsed parameters, a reshaping could be.) A string with no EventTimestamp is
filed under 1970-02-01.

The rows stored before this revision become one partition, `callback_inbox_legacy`, with the
sentinel month 1970-01-01, attached without a scan (a validated CHECK proves its bound) and without
an index build (its new keys are built CONCURRENTLY first, while callbacks flow): the swap itself is
one short transaction. Until it is empty, the webhook statement also looks a key up there (a
redelivery of a callback stored before the swap is still a duplicate), and `flask callbacks prune`
deletes its old rows in batches as before, then drops it; whole months are dropped. A DEFAULT
partition takes a row whose month has no partition (the worker makes them three months ahead; a
timestamp beyond that, or long past, or none), is pruned row by row, and keeps the failed rows of
the months prune drops, for replay.

Ids stay unique across partitions: one sequence, `callback_inbox_id_seq`, continued from the old
identity (`callback_facts.inbox_id` refers to them).
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

LEGACY = "callback_inbox_legacy"
SENTINEL = "1970-01-01"
MONTHS_AHEAD = 3  # as services.inbox.ensure_partitions: the worker keeps it so

COLUMNS = """
    id bigint NOT NULL DEFAULT nextval('callback_inbox_id_seq'::regclass),
    received_at timestamptz NOT NULL DEFAULT now(),
    endpoint text NOT NULL,
    method text NOT NULL,
    content_type text,
    params jsonb NOT NULL,
    nonce text,
    dedupe_key text NOT NULL,
    event_name text,
    session_uuid text,
    status text NOT NULL,
    error text,
    attempts integer NOT NULL DEFAULT 1,
    event_month date NOT NULL DEFAULT (date_trunc('month', timezone('UTC', now())))::date,
    CONSTRAINT ck_callback_inbox_endpoint CHECK (endpoint IN ('session', 'recording')),
    CONSTRAINT ck_callback_inbox_status CHECK (status IN ('recorded', 'ignored', 'failed'))"""


def _month(day: date, offset: int) -> date:
    index = day.year * 12 + day.month - 1 + offset
    return date(index // 12, index % 12 + 1, 1)


def upgrade() -> None:
    # 1. The partition key on the stored rows: one constant, so no rewrite; its CHECK, validated
    #    while callbacks flow (a scan, no lock that stops writers).
    op.execute(f"ALTER TABLE callback_inbox ADD COLUMN event_month date NOT NULL DEFAULT DATE '{SENTINEL}'")
    op.execute(f"ALTER TABLE callback_inbox ADD CONSTRAINT ck_callback_inbox_legacy_month"
               f" CHECK (event_month = DATE '{SENTINEL}') NOT VALID")
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE callback_inbox VALIDATE CONSTRAINT ck_callback_inbox_legacy_month")
        # The keys the partitioned table needs, built without stopping writers.
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ix_callback_inbox_legacy_pkey"
                   " ON callback_inbox (id, event_month)")
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ix_callback_inbox_legacy_key"
                   " ON callback_inbox (dedupe_key, event_month)")
    # 2. The swap, in one short transaction.
    identity = op.get_bind().exec_driver_sql("SELECT pg_get_serial_sequence('callback_inbox', 'id')").scalar()
    op.execute(f"""
        ALTER TABLE callback_inbox RENAME TO {LEGACY};
        ALTER TABLE {LEGACY} DROP CONSTRAINT pk_callback_inbox;
        ALTER TABLE {LEGACY} ADD CONSTRAINT pk_{LEGACY} PRIMARY KEY USING INDEX ix_callback_inbox_legacy_pkey;
        ALTER TABLE {LEGACY} DROP CONSTRAINT uq_callback_inbox_dedupe_key;
        ALTER TABLE {LEGACY} ADD CONSTRAINT uq_{LEGACY}_dedupe_key UNIQUE USING INDEX ix_callback_inbox_legacy_key;
        ALTER INDEX ix_callback_inbox_failed RENAME TO ix_{LEGACY}_failed;
        ALTER INDEX ix_callback_inbox_received_at RENAME TO ix_{LEGACY}_received_at;
        ALTER TABLE {LEGACY} ALTER COLUMN event_month DROP DEFAULT;
        CREATE SEQUENCE callback_inbox_id_new_seq;
        SELECT setval('callback_inbox_id_new_seq', greatest(
            (SELECT last_value FROM {identity}), (SELECT coalesce(max(id), 0) FROM {LEGACY}), 1));
        ALTER TABLE {LEGACY} ALTER COLUMN id DROP IDENTITY;
        ALTER SEQUENCE callback_inbox_id_new_seq RENAME TO callback_inbox_id_seq;
        CREATE TABLE callback_inbox ({COLUMNS},
            CONSTRAINT pk_callback_inbox PRIMARY KEY (id, event_month),
            CONSTRAINT uq_callback_inbox_dedupe_key UNIQUE (dedupe_key, event_month)
        ) PARTITION BY RANGE (event_month);
        ALTER SEQUENCE callback_inbox_id_seq OWNED BY callback_inbox.id;
        CREATE INDEX ix_callback_inbox_received_at ON callback_inbox USING brin (received_at);
        CREATE INDEX ix_callback_inbox_failed ON callback_inbox (id) WHERE status = 'failed';
        ALTER TABLE callback_inbox ATTACH PARTITION {LEGACY} FOR VALUES FROM ('1970-01-01') TO ('1970-01-02');
        CREATE TABLE callback_inbox_default PARTITION OF callback_inbox DEFAULT;
    """)
    this_month = datetime.now(UTC).date().replace(day=1)
    for offset in range(-1, MONTHS_AHEAD + 1):
        start, end = _month(this_month, offset), _month(this_month, offset + 1)
        op.execute(f"CREATE TABLE callback_inbox_p{start:%Y_%m} PARTITION OF callback_inbox"
                   f" FOR VALUES FROM ('{start}') TO ('{end}')")


def downgrade() -> None:
    # Every row back into one plain table (a copy: for development databases, not a live downgrade).
    op.execute("""
        ALTER TABLE callback_inbox RENAME TO callback_inbox_partitioned;
        ALTER TABLE callback_inbox_partitioned RENAME CONSTRAINT pk_callback_inbox TO pk_callback_inbox_partitioned;
        ALTER TABLE callback_inbox_partitioned RENAME CONSTRAINT uq_callback_inbox_dedupe_key
            TO uq_callback_inbox_partitioned_dedupe_key;
        ALTER INDEX ix_callback_inbox_failed RENAME TO ix_callback_inbox_partitioned_failed;
        ALTER INDEX ix_callback_inbox_received_at RENAME TO ix_callback_inbox_partitioned_received_at;
        CREATE TABLE callback_inbox (
            id bigint GENERATED BY DEFAULT AS IDENTITY,
            received_at timestamptz NOT NULL DEFAULT now(),
            endpoint text NOT NULL,
            method text NOT NULL,
            content_type text,
            params jsonb NOT NULL,
            nonce text,
            dedupe_key text NOT NULL,
            event_name text,
            session_uuid text,
            status text NOT NULL,
            error text,
            attempts integer NOT NULL DEFAULT 1,
            CONSTRAINT pk_callback_inbox PRIMARY KEY (id),
            CONSTRAINT uq_callback_inbox_dedupe_key UNIQUE (dedupe_key),
            CONSTRAINT ck_callback_inbox_endpoint CHECK (endpoint IN ('session', 'recording')),
            CONSTRAINT ck_callback_inbox_status CHECK (status IN ('recorded', 'ignored', 'failed'))
        );
        INSERT INTO callback_inbox (id, received_at, endpoint, method, content_type, params, nonce, dedupe_key,
                                    event_name, session_uuid, status, error, attempts)
        SELECT DISTINCT ON (dedupe_key) id, received_at, endpoint, method, content_type, params, nonce, dedupe_key,
               event_name, session_uuid, status, error, attempts
          FROM callback_inbox_partitioned ORDER BY dedupe_key, id;
        SELECT setval(pg_get_serial_sequence('callback_inbox', 'id'),
                      greatest((SELECT last_value FROM callback_inbox_id_seq), 1));
        DROP TABLE callback_inbox_partitioned;
        DO $$ BEGIN
            EXECUTE format('ALTER SEQUENCE %s RENAME TO callback_inbox_id_seq',
                           pg_get_serial_sequence('callback_inbox', 'id'));
        END $$;
        CREATE INDEX ix_callback_inbox_received_at ON callback_inbox USING brin (received_at);
        CREATE INDEX ix_callback_inbox_failed ON callback_inbox (id) WHERE status = 'failed';
    """)
