"""One JSON error shape for every 4xx and 5xx: {"error", "message", "details"}; never HTML."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .db import is_database_unavailable
from .plivo.client import (
    PlivoAuthError,
    PlivoError,
    PlivoNotFound,
    PlivoRateLimited,
    PlivoRejected,
    PlivoTimeout,
    PlivoUnavailable,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API reports to its caller as JSON."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, status: int | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class ServiceUnavailable(ApiError):
    status, code = 503, "database_unavailable"


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None):
    body = {"error": code, "message": message, "details": details or {}}
    response = jsonify(body)
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def plivo_error_to_api(exc: PlivoError) -> ApiError:
    """Translate a Plivo failure into what our caller sees (the message is passed on)."""
    details = {"plivo_status": exc.status} if exc.status else {}
    if isinstance(exc, PlivoNotFound):
        return ApiError(f"Plivo: {exc.message}", status=404, code="not_found", details=details)
    if isinstance(exc, PlivoAuthError):
        return ApiError("Plivo refused our credentials", status=502, code="plivo_auth_failed", details=details)
    if isinstance(exc, PlivoRateLimited):
        return ApiError(f"Plivo rate limit: {exc.message}", status=503, code="plivo_rate_limited",
                        details=details, headers={"Retry-After": "5"})
    if isinstance(exc, PlivoRejected):
        return ApiError(f"Plivo: {exc.message}", status=422, code="plivo_rejected", details=details)
    if isinstance(exc, PlivoTimeout):
        return ApiError(exc.message, status=504, code="plivo_timeout", details=details)
    if isinstance(exc, PlivoUnavailable):
        return ApiError(exc.message, status=502, code="plivo_unavailable", details=details)
    return ApiError(f"Plivo error: {exc.message}", status=502, code="plivo_error", details=details)


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
