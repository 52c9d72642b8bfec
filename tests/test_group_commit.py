"""The webhook path's group commit (persistence.group_commit) on the real database: concurrent
callers share transactions, each gets its own statement's row, and one bad statement fails alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from webhook_service import metrics
from webhook_service.persistence.db import Database
from webhook_service.persistence.group_commit import GroupCommit
from webhook_service.settings import Settings

INSERT = "INSERT INTO group_commit_probe (k) VALUES (%(k)s::int) ON CONFLICT DO NOTHING RETURNING k"
# The first caller's statement holds its batch's transaction open, so the others gather meanwhile.
SLOW_INSERT = ("INSERT INTO group_commit_probe (k) SELECT %(k)s::int FROM pg_sleep(0.3)"
               " ON CONFLICT DO NOTHING RETURNING k")


@pytest.fixture
def database(database_url):
    db = Database.connect(database_url, Settings.from_env({}))
    with db.pg() as pg:
        pg.execute("CREATE TABLE IF NOT EXISTS group_commit_probe (k int PRIMARY KEY)")
        pg.execute("TRUNCATE group_commit_probe")
    yield db
    with db.pg() as pg:
        pg.execute("DROP TABLE group_commit_probe")
    db.dispose()


def stored(db: Database) -> list[int]:
    with db.pg() as pg:
        return [k for (k,) in pg.execute("SELECT k FROM group_commit_probe ORDER BY k")]


def batches() -> tuple[float, float]:
    """(batches committed, callers in them) so far, from the webhook_store_batch_size histogram."""
    samples = {s.name: s.value for s in metrics.STORE_BATCH.collect()[0].samples}
    return samples["webhook_store_batch_size_count"], samples["webhook_store_batch_size_sum"]


def test_concurrent_callers_share_commits_and_each_gets_its_own_row(database):
    group = GroupCommit(database)
    first_in = threading.Event()

    def slow_first() -> tuple | None:
        first_in.set()
        return group.execute(SLOW_INSERT, {"k": 1000})

    count, callers = batches()
    with ThreadPoolExecutor(41) as pool:
        leader = pool.submit(slow_first)
        first_in.wait()
        # 40 callers, keys 0..19 twice: each key's row goes to exactly one of its two callers.
        keys = [i % 20 for i in range(40)]
        rows = list(pool.map(lambda k: group.execute(INSERT, {"k": k}), keys))
    assert leader.result() == (1000,)
    for key in range(20):
        assert sorted(rows[i] is not None for i, k in enumerate(keys) if k == key) == [False, True]
    assert stored(database) == [*range(20), 1000]
    count_after, callers_after = batches()
    assert callers_after - callers == 41
    # Fewer commits than callers: the 40 that came while the first was being committed went together.
    assert count_after - count < 41 / 2


def test_one_bad_statement_in_a_batch_fails_alone(database):
    group = GroupCommit(database)
    first_in = threading.Event()

    def call(k):
        if k == 1000:
            first_in.set()
            return group.execute(SLOW_INSERT, {"k": k})
        first_in.wait()
        try:
            return group.execute(INSERT, {"k": "not a number" if k == 5 else k})
        except psycopg.errors.InvalidTextRepresentation:
            return "refused"

    count, callers = batches()
    with ThreadPoolExecutor(11) as pool:
        results = list(pool.map(call, [1000, *range(10)]))
    count_after, callers_after = batches()
    assert callers_after - callers == 11 and count_after - count < 11  # the ten went as one batch, then alone
    assert results == [(1000,), *[(k,) if k != 5 else "refused" for k in range(10)]]
    assert stored(database) == [k for k in range(10) if k != 5] + [1000]


def test_a_caller_alone_is_not_held_back(database):
    group = GroupCommit(database)
    count, callers = batches()
    assert [group.execute(INSERT, {"k": k}) for k in (1, 1, 2)] == [(1,), None, (2,)]
    assert batches() == (count + 3, callers + 3)  # each its own batch of one
    assert stored(database) == [1, 2]
