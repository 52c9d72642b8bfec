"""One JSON error shape for every 4xx and 5xx: {"error", "message", "details"}; never HTML."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app, jsonify, request
from gunicorn.http import errors as http_errors
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


# Under gunicorn a request body is read as the view asks for it, so a body whose framing is broken (a
# chunk size of `0x3` or `-3`, LF-only line ends, a trailer such as `Content-Length`) raises gunicorn's
# parse error inside the view. That is the caller's fault: a 400, and one log line without a traceback.
# (werkzeug's own server reads chunks leniently or raises OSError, which werkzeug answers 400 itself.)
BODY_FRAMING_PROBLEMS = {
    "InvalidChunkSize": "a chunk size is not a hexadecimal number followed by CRLF",
    "ChunkMissingTerminator": "a chunk does not end with CRLF",
    "InvalidChunkExtension": "a chunk extension is malformed",
    "InvalidHeader": "a trailer field is malformed or not allowed",
    "InvalidHeaderName": "a trailer field is malformed or not allowed",
    "ObsoleteFolding": "a trailer field is folded over lines",
    "LimitRequestHeaders": "the trailer section is too large",
}
# Parse errors that are not about the request: the app's own response headers, gunicorn's configuration.
NOT_THE_CALLERS = (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName,
                   http_errors.ConfigurationProblem)


def register_body_framing(app: Flask) -> None:
    """Read a chunked body before anything answers the request, so broken framing is our JSON 400.

    A view that answers without reading the body (a 401, a 403 for a missing signature, a 404) leaves
    it to gunicorn, which drains it to reuse the connection; on broken framing gunicorn then writes a
    second answer, an HTML 400, on the same connection. A body with a Content-Length cannot be broken
    that way, so only chunked ones are read here, up to the route's size limit (werkzeug cuts a chunked
    body there, so one over it cannot parse or verify).
    """

    @app.before_request
    def _read_chunked_body_first() -> None:
        if request.content_length is not None or not request.environ.get("wsgi.input_terminated"):
            return
        if request.blueprint == "webhooks":
            request.max_content_length = current_app.extensions["webhook_service"].settings.webhook_max_body_bytes
        request.get_data(cache=True)


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

    @app.errorhandler(http_errors.ParseException)
    def _malformed_body(exc: http_errors.ParseException):
        if isinstance(exc, NOT_THE_CALLERS):
            return _unexpected(exc)
        problem = BODY_FRAMING_PROBLEMS.get(type(exc).__name__, "its framing is malformed")
        log.warning("request body refused: %s (%s)", problem, type(exc).__name__)
        return error_response(400, "invalid_body", f"The request body cannot be read: {problem}",
                              {"problem": problem})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if is_database_unavailable(exc):
            log.warning("database unavailable: %s", type(exc).__name__)
            return error_response(503, "database_unavailable", "The database is unavailable; try again shortly",
                                  headers={"Retry-After": "1"})
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Internal error; it has been logged")
