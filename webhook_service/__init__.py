"""Plivo masking-session service: the Flask application factory.

Importing the package imports little (Flask and the log formatter): gunicorn's master imports
`webhook_service.logs` for its own JSON log lines (gunicorn.conf.py), and must not import psycopg,
which a gevent worker has to import after patching. `create_app` imports the rest.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

import click
from flask import Flask, g, request

from .logs import configure_logging

if TYPE_CHECKING:
    from .settings import Settings

access_log = logging.getLogger("webhook_service.access")

# A caller's X-Request-Id is echoed and logged only if it is 1 to 128 characters, each an ASCII letter,
# digit, ".", "_", ":" or "-": enough for UUIDs (with or without dashes), ULIDs, nginx's $request_id
# and W3C trace ids, and nothing that could carry markup, quotes, spaces, control characters or a
# payload (the review sent 8000 bytes). Any other value is replaced by a new id (uuid4 hex), as if
# none had been sent.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(sent: str | None) -> str:
    """The request's id: the caller's X-Request-Id if it is well formed (REQUEST_ID), else a new one."""
    if sent and REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app. `test_config` may carry `settings`, `database_url` and Flask options."""
    import threading

    from .context import Context
    from .persistence.db import Database
    from .plivo.client import PlivoClient
    from .services.projector import BackgroundProjector, Projector
    from .settings import Settings
    from .web.errors import register_body_framing, register_error_handlers

    config = dict(test_config or {})
    # Loaded by the `flask` command (its click context is current): to run one of ours, or to list them.
    command_line = click.get_current_context(silent=True) is not None
    # A command (or --help) with a bad setting: the one line naming it, exit code 2, no traceback.
    settings: Settings = config.pop("settings", None) or (
        Settings.for_command() if command_line else Settings.from_env())
    # A command prints its result: its logs are warnings and errors only, unless LOG_LEVEL asks for more
    # (the `worker` command, a service, logs at LOG_LEVEL).
    configure_logging(settings.log_level if settings.log_level_given or not command_line else "WARNING")
    app = Flask(__name__)
    app.config.update(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=1024 * 1024)
    app.config.update(config)

    database_url = config.get("database_url") or settings.database_url
    if database_url is None:
        from .devdb import embedded_database_url

        database_url = embedded_database_url()
    db = Database.connect(database_url, settings)
    plivo = PlivoClient(
        settings.plivo_api_base_url,
        settings.plivo_auth_id,
        settings.plivo_auth_token,
        connect_timeout=settings.plivo_connect_timeout,
        read_timeout=settings.plivo_read_timeout,
        max_retries=settings.plivo_max_retries,
    )
    projector = Projector(db)
    app.extensions["webhook_service"] = Context(
        db=db, plivo=plivo, settings=settings, projector=projector,
        background=BackgroundProjector(projector) if settings.project_in_web else None,
        plivo_slots=threading.BoundedSemaphore(settings.plivo_max_concurrency),
    )

    register_error_handlers(app)
    _register_request_logging(app)
    register_body_framing(app)  # after the request id is set: its 400 is logged with one

    from .web.health import bp as health_bp
    from .web.openapi import bp as openapi_bp
    from .web.sessions import bp as sessions_bp
    from .web.webhooks import bp as webhooks_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(sessions_bp)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(openapi_bp)

    from .cli import register_cli

    register_cli(app)
    if settings.sandbox and not command_line:  # said by the commands that call Plivo (`worker`), not by --help
        app.logger.warning(
            "SANDBOX MODE: no PLIVO_AUTH_ID set; Plivo calls go to the local sandbox at %s",
            settings.plivo_api_base_url,
        )
    return app


def _register_request_logging(app: Flask) -> None:
    import time

    from . import metrics
    from .web.clients import TrustedProxies

    proxies = TrustedProxies(app.extensions["webhook_service"].settings.forwarded_allow_ips)

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        g.request_id = request_id(request.headers.get("X-Request-Id"))

    @app.after_request
    def _finish(response):
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        route = request.url_rule.rule if request.url_rule else "unmatched"
        response.headers["X-Request-Id"] = g.get("request_id", "")
        metrics.REQUEST_LATENCY.labels(route, f"{response.status_code // 100}xx").observe(elapsed)
        if response.status_code == 413:
            metrics.REQUESTS_TOO_LARGE.labels(route).inc()
        if not access_log.isEnabledFor(logging.INFO):  # the hot path skips building a line nobody reads
            return response
        access_log.info(
            "%s %s %s", request.method, route, response.status_code,
            extra={
                "request_id": g.get("request_id"),
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "latency_ms": round(elapsed * 1000, 2),
                "session_uuid": g.get("session_uuid"),
                # The proxy's X-Forwarded-For only if the peer is a trusted proxy (web/clients.py).
                "client": proxies.client(request.remote_addr, request.headers.get("X-Forwarded-For")),
            },
        )
        return response
