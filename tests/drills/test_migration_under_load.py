"""Drill: `release` migrates while callbacks flow.

A test-only migration (written here, chained after the repository's head) adds a column to
`callback_facts`, which every callback writes, and builds an index on it `CONCURRENTLY`. It is
applied by `release` (`webhook_service.migrate.release`, with migrations/env.py as in production)
while a steady load of signed callbacks runs, and while an analyst's long transaction holds the
table: the `ALTER TABLE` must wait for that transaction, and every callback that comes meanwhile
queues behind the `ALTER`. The migration gives up after MIGRATION_LOCK_TIMEOUT_MS, rolls back, and
`release` tries again once the long transaction is over.

No callback may wait longer than the lock timeout (plus a margin for the machine), every one is
answered 2xx, and the record is exactly the plan's; the column and a valid index are there.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from webhook_service.services.operations import schema_head

from ..helpers import environ_without_settings, wait_for_lock
from .harness import (
    PYTHON,
    ROOT,
    check_exact,
    create_sessions,
    percentile,
    plan_calls,
    service_env,
    shuffled_load,
    tally,
)

SESSIONS = 10
CALLS = 4
SENDERS = 4
PACE = 0.1
LOCK_TIMEOUT_MS = 1000
HELD_PAST_THE_TIMEOUT = 0.3  # seconds the analyst's transaction outlasts the first attempt's lock timeout

MIGRATION = '''"""Drill only: a column and an index on callback_facts, added online."""

import sqlalchemy as sa
from alembic import op

revision = "drill_online"
down_revision = "{head}"


def upgrade() -> None:
    op.add_column("callback_facts", sa.Column("drill_note", sa.Text()))
    with op.get_context().autocommit_block():
        op.create_index("ix_callback_facts_drill_note", "callback_facts", ["drill_note"],
                        postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_callback_facts_drill_note", "callback_facts")
    op.drop_column("callback_facts", "drill_note")
'''

RELEASE = """
import sys
from webhook_service import migrate
config = migrate.alembic_config(sys.argv[1])
config.set_main_option("version_locations", f"{migrate.MIGRATIONS_DIR / 'versions'} {sys.argv[2]}")
print("attempts", migrate.release(config, pause=0.5), flush=True)
"""


@pytest.mark.slow
def test_release_migrates_while_callbacks_flow_and_none_waits_past_the_lock_timeout(
        drill_db, drill_engine, drill_sandbox, start_service, tmp_path: Path, drill_report):
    extra = tmp_path / "drill_versions"
    extra.mkdir()
    (extra / "drill_online.py").write_text(MIGRATION.format(head=schema_head()))
    env = service_env(drill_db, drill_sandbox.url)
    service = start_service(env)
    uuids = create_sessions(service.url, SESSIONS)
    callbacks, expected = plan_calls(drill_sandbox, uuids, CALLS)
    drill_report.phase("setup")

    load = shuffled_load(callbacks, SENDERS, seed=3, pace=PACE)
    load.wait_for(0.2)
    analyst = drill_engine.connect()
    analyst.begin()
    analyst.execute(text("SELECT count(*) FROM callback_facts"))  # holds ACCESS SHARE until it ends
    release_env = environ_without_settings() | {"DATABASE_URL": drill_db,
                                                "MIGRATION_LOCK_TIMEOUT_MS": str(LOCK_TIMEOUT_MS)}
    started = time.monotonic()
    released = subprocess.Popen([str(PYTHON if PYTHON.exists() else sys.executable), "-c", RELEASE, drill_db,
                                 str(extra)], cwd=ROOT, env=release_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        # Once the ALTER waits for it, the report goes on a little longer than the lock timeout, so
        # the first attempt gives up; then it ends (its transaction rolls back).
        wait_for_lock(drill_engine, "%ADD COLUMN drill_note%", timeout=60)
        time.sleep(LOCK_TIMEOUT_MS / 1000 + HELD_PAST_THE_TIMEOUT)
    finally:
        analyst.close()
    output, _ = released.communicate(timeout=60)
    release_seconds = time.monotonic() - started
    assert released.returncode == 0, output
    attempts = int(output.split("attempts")[-1].split()[0])
    answers = load.join()
    drill_report.phase("load and release")

    latencies = [a.latency for a in answers]
    drill_report.update({
        "callbacks": tally(answers), "release attempts": attempts, "release seconds": round(release_seconds, 1),
        "latency p50 / p99 / max, s": tuple(round(v, 3) for v in (percentile(latencies, 0.5),
                                                                  percentile(latencies, 0.99), max(latencies))),
        "lock timeout, s": LOCK_TIMEOUT_MS / 1000,
    })
    assert attempts >= 2, "the migration never had to wait for the long transaction: the drill tested nothing"
    assert all(a.kind == "2xx" for a in answers), tally(answers)
    # Queued behind the ALTER for at most the lock timeout; 0.5 s for a 2-core machine's scheduling.
    assert max(latencies) < LOCK_TIMEOUT_MS / 1000 + 0.5, drill_report
    with drill_engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "drill_online"
        assert conn.execute(text(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_callback_facts_drill_note'::regclass")).scalar()
    problems = check_exact(drill_engine, env, callbacks, expected)
    assert not problems, "\n".join(problems)
    drill_report.phase("verify")
