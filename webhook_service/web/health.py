"""Operational endpoints: /healthz (process alive), /readyz (database and schema), /metrics."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from .. import metrics
from ..proxy import NginxCollector
from ..services import operations

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
    ready, details = operations.readiness(current_app.extensions["webhook_service"])
    return jsonify(details), 200 if ready else 503


@bp.get("/metrics")
def metrics_endpoint():
    ctx = current_app.extensions["webhook_service"]
    operations.refresh_gauges(ctx)
    nginx = current_app.extensions.get("webhook_service.nginx")
    if nginx is None and (ctx.settings.nginx_status_url or ctx.settings.nginx_refused_log):
        nginx = current_app.extensions["webhook_service.nginx"] = NginxCollector(
            ctx.settings.nginx_status_url, ctx.settings.nginx_refused_log)
    body, content_type = metrics.render(*([nginx] if nginx else []))
    return Response(body, content_type=content_type)
