"""The errors the API reports to its callers; `web.errors` turns them into the one JSON shape."""

from __future__ import annotations

from typing import Any


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
