"""Plivo's callbacks: /webhooks/plivo/session and /webhooks/plivo/recording.

Order of checks: size (413), signature headers present (403), body parsed (400), signature valid
(403), then store and apply. Nothing is stored before the signature is verified.
"""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, g, jsonify, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from .. import metrics
from ..domain import jsonbody
from ..errors import ApiError
from ..persistence.db import is_database_unavailable
from ..plivo.signature import NONCE_HEADER, SIGNATURE_HEADER, verify_signature
from ..services import inbox
from .errors import error_response

log = logging.getLogger(__name__)
bp = Blueprint("webhooks", __name__, url_prefix="/webhooks/plivo")


def _flatten(values: MultiDict) -> dict[str, object]:
    # One value per key as Plivo sends them; a repeated key keeps all its values (signed as a list).
    return {k: (v[0] if len(v) == 1 else v) for k, v in values.lists()}


# Plivo's callback parameters are flat; a little nesting is tolerated, no more.
MAX_JSON_DEPTH = 8


def _params() -> tuple[dict[str, object], str | None]:
    content_type = request.mimetype or None
    if request.method == "GET" or not request.is_json:
        params = _flatten(request.args if request.method == "GET" else request.form)
        found = jsonbody.problem(params, MAX_JSON_DEPTH)
        if found:
            raise ApiError(f"The callback's parameters: a value {found}", code="invalid_body")
        return params, content_type
    try:
        body = jsonbody.loads(request.get_data(cache=True) or b"null", max_depth=MAX_JSON_DEPTH)
    except jsonbody.JsonError as exc:
        raise ApiError(f"The callback body {exc}", code="invalid_body") from None
    if not isinstance(body, dict):
        raise ApiError("The callback body must be a JSON object", code="invalid_body")
    return body, content_type


def _reject(kind: str, status: int, code: str, message: str):
    metrics.CALLBACKS.labels(kind, "rejected" if status == 403 else code).inc()
    if status == 403:
        metrics.SIGNATURE_FAILURES.inc()
    log.warning("callback refused", extra={"endpoint": kind, "reason": code})
    return error_response(status, code, message)


@bp.route("/<any(session, recording):kind>", methods=["POST", "GET"])
def receive(kind: str):
    ctx = current_app.extensions["webhook_service"]
    limit = ctx.settings.webhook_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _reject(kind, 413, "too_large", f"Callback bodies are limited to {limit} bytes")
    request.max_content_length = limit  # also caps chunked bodies that announce no length
    signature = request.headers.get(SIGNATURE_HEADER)
    nonce = request.headers.get(NONCE_HEADER)
    if not signature or not nonce:
        return _reject(kind, 403, "signature_missing", f"{SIGNATURE_HEADER} and {NONCE_HEADER} are required")
    try:
        params, content_type = _params()
    except ApiError as exc:
        return _reject(kind, 400, exc.code, exc.message)
    except RequestEntityTooLarge:
        return _reject(kind, 413, "too_large", f"Callback bodies are limited to {limit} bytes")
    # Plivo signs the URL it called: our public origin plus the path, whatever proxies changed.
    url = ctx.settings.public_base_url + request.path
    if not verify_signature(request.method, url, params, nonce, signature, ctx.settings.plivo_auth_tokens):
        return _reject(kind, 403, "signature_invalid", "The callback signature does not verify")
    session_uuid = params.get("SessionUUID")
    g.session_uuid = session_uuid if isinstance(session_uuid, str) else None
    try:
        outcome = inbox.receive(ctx.db, kind, request.method, content_type, params, nonce)
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        # Nothing was stored; a 503 tells Plivo (and our metrics) that this one was not taken.
        metrics.CALLBACKS.labels(kind, "unavailable").inc()
        return error_response(503, "database_unavailable", "The database is unavailable; try again shortly",
                              headers={"Retry-After": "1"})
    return jsonify({"status": outcome})
