"""What operators read: readiness (database, schema, projection lag) and the gauges set at scrape."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

from sqlalchemy import text

from .. import metrics
from ..context import Context
from .inbox import failed_callbacks

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def schema_head() -> str | None:
    """The newest migration this code knows (read once per process)."""
    return _script().get_current_head()


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    """Every migration this code knows."""
    return frozenset(script.revision for script in _script().walk_revisions())


def _script():
    from alembic.script import ScriptDirectory

    from ..migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config())


def readiness(ctx: Context) -> tuple[bool, dict[str, Any]]:
    """(ready, details): not draining, the database answers, and its schema is this code's head or newer.

    Draining: while the file DRAIN_FILE names exists, the node answers 503 `draining` here and
    nothing else changes (it still serves what it is sent): the load balancer takes it out of the
    rotation, and the node can then be stopped without a request in flight.

    A schema newer than this code's head (a revision it does not know: `release` of the next
    version ran first, as it does during a rolling upgrade) is ready; the migrations are written to
    be compatible with the code before them (docs/deploy.md). A schema older than the head is not.

    The projection lag (the oldest fact not yet projected) is reported, never a reason to fail:
    a node whose projections lag still stores every callback it is sent.
    """
    drain = ctx.settings.drain_file
    if drain and os.path.exists(drain):
        return False, {"status": "draining", "drain_file": drain}
    head = schema_head()
    try:
        with ctx.db.engine.connect() as conn:
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if current != head and (current is None or current in known_revisions()):
            return False, {"status": "unavailable", "database": "ok", "migration": current, "head": head}
        lag = ctx.projector.oldest_due_seconds()
    except Exception as exc:  # noqa: BLE001 - any failure here means "not ready"
        return False, {"status": "unavailable", "database": "unreachable", "error": type(exc).__name__}
    details = {"status": "ok", "database": "ok", "migration": current, "projection_lag_seconds": round(lag, 3)}
    if current != head:
        details["head"] = head  # the schema is ahead of this code
    return True, details


def refresh_gauges(ctx: Context) -> None:
    """Set the gauges read from the database (failed callbacks, projection backlog) for a scrape."""
    try:  # index-only reads; metrics still render without a database
        metrics.INBOX_FAILED.set(failed_callbacks(ctx.db))
        metrics.PROJECTION_BACKLOG_AGE.set(ctx.projector.oldest_due_seconds())
    except Exception as exc:  # noqa: BLE001
        log.warning("metrics: could not read the database's gauges: %s", type(exc).__name__)
