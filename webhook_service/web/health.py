"""Operational endpoints: /healthz (process alive), /readyz (database and schema), /metrics."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from .. import metrics

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    settings = current_app.extensions["webhook_service"].settings
    return jsonify({
        "status": "ok",
        "mode": "sandbox" if settings.sandbox else "production",
        "plivo_api_base_url": settings.plivo_api_base_url,
    })


@bp.get("/readyz")
def readyz():
    from alembic.script import ScriptDirectory

    from ..migrate import alembic_config

    ctx = current_app.extensions["webhook_service"]
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    try:
        with ctx.db.engine.connect() as conn:
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as exc:  # noqa: BLE001 - any failure here means "not ready"
        return jsonify({"status": "unavailable", "database": "unreachable", "error": type(exc).__name__}), 503
    if current != head:
        return jsonify({"status": "unavailable", "database": "ok", "migration": current, "head": head}), 503
    return jsonify({"status": "ok", "database": "ok", "migration": current})


@bp.get("/metrics")
def metrics_endpoint():
    from ..services.inbox import failed_count

    try:  # an index-only count (partial index on unfinished rows); metrics still render without a DB
        metrics.INBOX_FAILED.set(failed_count(current_app.extensions["webhook_service"].db))
    except Exception as exc:  # noqa: BLE001
        current_app.logger.warning("metrics: could not count failed callbacks: %s", type(exc).__name__)
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
