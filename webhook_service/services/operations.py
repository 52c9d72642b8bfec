"""What operators read: readiness (database, schema, projection lag) and the gauges set at scrape."""

from __future__ import annotations

import logging
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
    from alembic.script import ScriptDirectory

    from ..migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def readiness(ctx: Context) -> tuple[bool, dict[str, Any]]:
    """(ready, details): the database answers and its schema is at this code's head.

    The projection lag (the oldest fact not yet projected) is reported, never a reason to fail:
    a node whose projections lag still stores every callback it is sent.
    """
    head = schema_head()
    try:
        with ctx.db.engine.connect() as conn:
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if current != head:
            return False, {"status": "unavailable", "database": "ok", "migration": current, "head": head}
        lag = ctx.projector.oldest_due_seconds()
    except Exception as exc:  # noqa: BLE001 - any failure here means "not ready"
        return False, {"status": "unavailable", "database": "unreachable", "error": type(exc).__name__}
    return True, {"status": "ok", "database": "ok", "migration": current, "projection_lag_seconds": round(lag, 3)}


def refresh_gauges(ctx: Context) -> None:
    """Set the gauges read from the database (failed callbacks, projection backlog) for a scrape."""
    try:  # index-only reads; metrics still render without a database
        metrics.INBOX_FAILED.set(failed_callbacks(ctx.db))
        metrics.PROJECTION_BACKLOG_AGE.set(ctx.projector.oldest_due_seconds())
    except Exception as exc:  # noqa: BLE001
        log.warning("metrics: could not read the database's gauges: %s", type(exc).__name__)
