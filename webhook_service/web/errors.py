"""One JSON error shape for every 4xx and 5xx: {"error", "message", "details"}; never HTML."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import ApiError
from ..persistence.db import is_database_unavailable
from ..plivo.client import PlivoError
from ..services.sessions import plivo_error_to_api

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None):
    body = {"error": code, "message": message, "details": details or {}}
    response = jsonify(body)
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.errorhandler(PlivoError)
    def _plivo_error(exc: PlivoError):
        return _api_error(plivo_error_to_api(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        headers = {}
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return error_response(exc.code or 500, code, exc.description or exc.name, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if is_database_unavailable(exc):
            log.warning("database unavailable: %s", type(exc).__name__)
            return error_response(503, "database_unavailable", "The database is unavailable; try again shortly",
                                  headers={"Retry-After": "1"})
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Internal error; it has been logged")
