"""The callback inbox's statements: store a callback with its fact, replay it, prune, count.

`STORE_RECORDED` is the webhook path's one statement (one round trip; committed alone or in a group): it inserts the
inbox row (a redelivery hits the unique dedupe key and stops there, returning no row), and only if
that row is new, the callback's fact and a row of the projection queue. Nothing in it reads or
locks the session, so concurrent callbacks of one session never wait on each other.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Text,
    and_,
    bindparam,
    column,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    table,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..domain.callbacks import FACT_FIELDS
from .models import CallbackFact, CallbackInbox, ProjectionQueue
from .sql import compiled

inbox = CallbackInbox.__table__
facts = CallbackFact.__table__
queue = ProjectionQueue.__table__

INBOX_FIELDS = ("endpoint", "method", "content_type", "params", "nonce", "dedupe_key", "event_name", "session_uuid",
                "status", "error")


def _fact_values() -> list[Any]:
    return [bindparam(f"fact_{name}", type_=facts.c[name].type) for name in FACT_FIELDS]


# The month of the rows stored before the inbox was partitioned (migration 0011): its one partition,
# `callback_inbox_legacy`, until prune has emptied and dropped it.
LEGACY_MONTH = "1970-01-01"


def _store(with_fact: bool) -> str:
    # The unique key is (dedupe_key, event_month): every copy of a callback has the same month (its
    # signed EventTimestamp's). A callback stored before the partitioning is in the legacy month:
    # looked up there too (one index probe; once that partition is dropped, the default one's).
    fields = (*INBOX_FIELDS, "event_month")
    stored_before = (select(literal_column("1")).select_from(inbox)
                     .where(inbox.c.dedupe_key == bindparam("dedupe_key", type_=Text),
                            inbox.c.event_month == literal_column(f"DATE '{LEGACY_MONTH}'")))
    values = (select(*[bindparam(name, type_=inbox.c[name].type) for name in fields])
              .where(~stored_before.exists()))
    stored = (pg_insert(inbox).from_select(list(fields), values)
              .on_conflict_do_nothing(index_elements=[inbox.c.dedupe_key, inbox.c.event_month])
              .returning(inbox.c.id).cte("stored"))
    statement = select(stored.c.id)
    if with_fact:
        fact = insert(facts).from_select(["inbox_id", *FACT_FIELDS], select(stored.c.id, *_fact_values())).cte("fact")
        due = insert(queue).from_select(
            ["session_uuid", "inbox_id"], select(bindparam("fact_session_uuid", type_=Text), stored.c.id)).cte("due")
        statement = statement.add_cte(fact, due)
    return compiled(statement)


# One callback with a fact: inbox row, fact, projection queue; returns the new inbox id, or no row.
STORE_RECORDED = _store(with_fact=True)
# One callback without a fact (ignored or failed): the inbox row alone.
STORE_OTHER = _store(with_fact=False)


_FACT_KEYS = tuple(f"fact_{name}" for name in FACT_FIELDS)


def fact_arguments(fact: Any) -> dict[str, Any]:
    """A fact's values (a `CallbackFact`) as the `fact_*` parameters of STORE_RECORDED and RECORD_FACT."""
    return dict(zip(_FACT_KEYS, fact, strict=True))


# Replay: the fact read again from a stored callback replaces the one recorded before, if any.
_replayed = pg_insert(facts).values({"inbox_id": bindparam("inbox_id", type_=BigInteger)}
                                    | {name: value for name, value in zip(FACT_FIELDS, _fact_values(), strict=True)})
RECORD_FACT = compiled(_replayed.on_conflict_do_update(
    index_elements=[facts.c.session_uuid, facts.c.inbox_id],
    set_={name: _replayed.excluded[name] for name in FACT_FIELDS}))
QUEUE_FACT = compiled(insert(queue).values(session_uuid=bindparam("session_uuid", type_=Text),
                                          inbox_id=bindparam("inbox_id", type_=BigInteger)))
MARK_READ = compiled(
    update(inbox).where(inbox.c.id == bindparam("inbox_id", type_=BigInteger))
    .values(status=bindparam("status", type_=Text), error=bindparam("error", type_=Text),
            attempts=inbox.c.attempts + literal_column("1")))


def replay_selection(*, ids: list[int], failed: bool, since: Any) -> Any:
    """The inbox rows a replay reads again (selectors combine; none: the failed ones)."""
    conditions = []
    if ids:
        conditions.append(inbox.c.id.in_(ids))
    if since is not None:
        conditions.append(inbox.c.received_at >= since)
    if failed or not conditions:
        conditions.append(inbox.c.status == "failed")
    return and_(*conditions)


def selection_count(condition: Any) -> Any:
    """How many rows a selection holds (a replay's length, for its progress bar)."""
    return select(func.count()).select_from(inbox).where(condition)


def known_ids(ids: list[int]) -> Any:
    return select(inbox.c.id).where(inbox.c.id.in_(ids))


def listing(*, failed: bool, session_uuid: str | None, since: Any, limit: int) -> Any:
    """The newest inbox rows first, as `flask callbacks list` shows them (failed ones by their partial index)."""
    conditions = []
    if failed:
        conditions.append(inbox.c.status == "failed")
    if session_uuid is not None:
        conditions.append(inbox.c.session_uuid == session_uuid)
    if since is not None:
        conditions.append(inbox.c.received_at >= since)
    return (select(inbox.c.id, inbox.c.received_at, inbox.c.endpoint, inbox.c.event_name, inbox.c.session_uuid,
                   inbox.c.status, inbox.c.error, inbox.c.attempts)
            .where(*conditions).order_by(inbox.c.id.desc()).limit(limit))


def replay_batch(condition: Any, after_id: int, limit: int) -> Any:
    return (select(inbox.c.id, inbox.c.endpoint, inbox.c.params).where(condition, inbox.c.id > after_id)
            .order_by(inbox.c.id).limit(limit))


def failed_count() -> Any:
    """An index-only count over the partial index of failed rows."""
    return select(func.count()).select_from(inbox).where(inbox.c.status == "failed")


def _prunable(target: Any, cutoff: Any) -> Any:
    return and_(target.c.received_at < cutoff, or_(target.c.status == "recorded", target.c.status == "ignored"))


def prune_count(cutoff: Any) -> Any:
    """How many rows a prune would delete now row by row (its progress bar's length)."""
    return select(func.count()).select_from(inbox).where(_prunable(inbox, cutoff))


def prune_batch(cutoff: Any, batch_size: int, *, partition: str | None = None) -> Any:
    """Delete up to `batch_size` recorded or ignored rows received before `cutoff`, oldest first,
    skipping rows another transaction holds (a replay), so live work never waits on the prune.

    `partition`: in that partition of the inbox only (the legacy or the default one)."""
    target = inbox if partition is None else table(partition, column("id"), column("received_at"), column("status"))
    oldest = (select(target.c.id).where(_prunable(target, cutoff))
              .order_by(target.c.id).limit(batch_size).with_for_update(skip_locked=True))
    return delete(target).where(target.c.id.in_(oldest.scalar_subquery()))
