"""Group commit: the statements of concurrent requests in one transaction, one round trip, one commit.

A callback's answer waits for its statement's commit, and a commit waits for the WAL to reach the
disk. Alone, every callback pays a round trip and a commit of its own. `GroupCommit.execute` lets
the callbacks that arrive while one batch is being committed go together in the next: the first
caller with nothing in flight leads, takes every statement waiting (its own included), and sends
them in a pipeline inside one transaction; each caller gets its own statement's row, or its error.
With one caller at a time, a batch is one statement: nothing waits for company. The batches' sizes
are the histogram `webhook_store_batch_size` in `/metrics`.

A batch that fails for a reason other than the database being unreachable (a value Postgres
refuses in one statement) is sent again one statement at a time, so one bad callback fails alone.
The database being unreachable fails every caller of the batch: none of it was committed.

Leaders take turns through a condition variable, so it works alike with threads (gthread) and
greenlets (gevent patches `threading`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from .db import Database, is_database_unavailable


@dataclass(eq=False)
class _Call:
    statement: str
    params: dict[str, Any]
    row: tuple | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class GroupCommit:
    """Run single statements of concurrent callers in shared transactions (see the module docstring)."""

    def __init__(self, db: Database, max_batch: int = 64):
        self.db, self.max_batch = db, max_batch
        self._turn = threading.Condition()
        self._waiting: list[_Call] = []
        self._leading = False

    def execute(self, statement: str, params: dict[str, Any]) -> tuple | None:
        """Execute `statement` in a transaction, committed before this returns; its first row."""
        call = _Call(statement, params)
        with self._turn:
            self._waiting.append(call)
            while self._leading and not call.done:
                self._turn.wait()
            if not call.done:  # lead: this call and whoever waits with it
                self._leading = True
                index = self._waiting.index(call)
                start = max(0, min(index, len(self._waiting) - self.max_batch))
                batch = self._waiting[start:start + self.max_batch]
                del self._waiting[start:start + self.max_batch]
        if not call.done:
            try:
                self._run(batch)
                metrics.STORE_BATCH.observe(len(batch))
            finally:
                with self._turn:
                    # Interrupted mid-batch (a worker's timeout or shutdown under gevent): whether the batch
                    # committed is unknown, so its callers fail (a 500 Plivo retries; the dedupe key keeps a
                    # stored copy single) rather than wait for a turn that will never be theirs.
                    for other in batch:
                        if not other.done:
                            other.error, other.done = RuntimeError("the group commit was interrupted"), True
                    self._leading = False
                    self._turn.notify_all()
        if call.error is not None:
            raise call.error
        return call.row

    def _run(self, batch: list[_Call]) -> None:
        try:
            with self.db.pg() as pg:
                if len(batch) == 1:
                    batch[0].row = pg.execute(batch[0].statement, batch[0].params).fetchone()
                else:
                    with pg.pipeline(), pg.transaction():
                        cursors = [pg.execute(call.statement, call.params) for call in batch]
                    for call, cursor in zip(batch, cursors, strict=True):
                        call.row = cursor.fetchone()
        except Exception as exc:
            if len(batch) == 1 or is_database_unavailable(exc):
                for call in batch:
                    call.error, call.row = exc, None
            else:  # one statement failed the batch: each alone, so only that one fails
                for call in batch:
                    self._run([call])
        for call in batch:
            call.done = True
