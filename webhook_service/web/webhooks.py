"""Plivo's callbacks: /webhooks/plivo/session and /webhooks/plivo/recording.

Order of checks: method (405), size (413), the nonce and a signature header (V3 or Ma-V3) present
(403), body parsed strictly (415 for a content type other than form or JSON, 400), signature valid
(403), then store. Nothing
is stored before the signature is verified, and the answer goes after the commit; nothing about
the session is derived here (`services.inbox`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from urllib.parse import unquote_plus

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import metrics
from ..context import Context
from ..domain import jsonbody
from ..domain.callbacks import plain_params
from ..errors import ApiError
from ..persistence.db import is_database_unavailable
from ..plivo.signature import MA_SIGNATURE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, string_to_sign, verify_callback
from ..services import inbox
from .errors import error_response

log = logging.getLogger(__name__)
bp = Blueprint("webhooks", __name__, url_prefix="/webhooks/plivo")

# Plivo's callback parameters are flat; a little nesting is tolerated by the parser (to answer a
# precise 400), no more.
MAX_JSON_DEPTH = 8
# Plivo posts callbacks form-encoded or as JSON (reference §8.3: which one is not documented).
FORM_TYPES = (None, "application/x-www-form-urlencoded")


def _params() -> tuple[dict[str, str], str | None]:
    """The callback's parameters, every value a string, or ApiError (400) saying what is wrong."""
    content_type = request.mimetype or None
    if request.method == "POST" and not request.is_json and content_type not in FORM_TYPES:
        raise ApiError(f"Callbacks are form-encoded or JSON, not {content_type}", status=415,
                       code="unsupported_media_type")
    if request.method == "GET" or not request.is_json:
        if request.method == "GET":
            pairs = request.args.items(multi=True)
        else:  # parsed here, not by werkzeug's form parser: one pass, and a repeated field is an error
            pairs = _form_pairs(request.get_data(cache=True).decode("utf-8", "replace"))
        params: dict[str, object] = {}
        for key, value in pairs:
            if key in params:
                raise ApiError(f"The callback's parameter {key!r} is repeated; Plivo sends each once",
                               code="invalid_body")
            params[key] = value
    else:
        try:  # refuses what Postgres could not store, or nests past the limit
            body = jsonbody.loads(request.get_data(cache=True) or b"null", max_depth=MAX_JSON_DEPTH)
        except jsonbody.JsonError as exc:
            raise ApiError(f"The callback body {exc}", code="invalid_body") from None
        if not isinstance(body, dict):
            raise ApiError("The callback body must be a JSON object", code="invalid_body")
        params = body
    try:
        return plain_params(params), content_type
    except ValueError as exc:
        raise ApiError(f"The callback's {exc}", code="invalid_body") from None


def _form_pairs(body: str) -> Iterator[tuple[str, str]]:
    """A form body's fields, as `urllib.parse.parse_qsl(body, keep_blank_values=True)` reads them,
    without decoding what has nothing to decode (this runs for every callback)."""
    for field in body.split("&"):
        if field:
            key, _, value = field.partition("=")
            yield (unquote_plus(key) if "%" in key or "+" in key else key,
                   unquote_plus(value) if "%" in value or "+" in value else value)


# The answers, encoded once: the hot path builds no JSON.
_ANSWERS = {outcome: json.dumps({"status": outcome}).encode() for outcome in ("recorded", "duplicate", "ignored",
                                                                                 "failed")}


def _reject(kind: str, status: int, code: str, message: str):
    metrics.CALLBACKS.labels(kind, "rejected" if status == 403 else code).inc()
    if status == 403:
        metrics.SIGNATURE_FAILURES.inc()
    log.warning("callback refused", extra={"endpoint": kind, "reason": code})
    return error_response(status, code, message)


@bp.route("/<any(session, recording):kind>", methods=["POST", "GET"])
def receive(kind: str):
    ctx: Context = current_app.extensions["webhook_service"]
    settings = ctx.settings
    # The method is part of what Plivo signs and of the callback's identity: only the one the
    # callback URLs were configured with is accepted (HEAD, which Flask adds to GET, never).
    if request.method != settings.callback_method:
        return error_response(405, "method_not_allowed", f"Callbacks are accepted by {settings.callback_method} only",
                              headers={"Allow": settings.callback_method})
    limit = settings.webhook_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _reject(kind, 413, "too_large", f"Callback bodies are limited to {limit} bytes")
    request.max_content_length = limit  # also caps chunked bodies that announce no length
    signature = request.headers.get(SIGNATURE_HEADER)
    ma_signature = request.headers.get(MA_SIGNATURE_HEADER)
    nonce = request.headers.get(NONCE_HEADER)
    if not (signature or ma_signature) or not nonce:
        return _reject(kind, 403, "signature_missing",
                       f"{NONCE_HEADER} and {SIGNATURE_HEADER} or {MA_SIGNATURE_HEADER} are required")
    try:
        params, content_type = _params()
    except ApiError as exc:
        return _reject(kind, exc.status, exc.code, exc.message)
    except RequestEntityTooLarge:
        return _reject(kind, 413, "too_large", f"Callback bodies are limited to {limit} bytes")
    # Plivo signs the URL it called: our public origin plus the path, whatever proxies changed.
    signed = string_to_sign(request.method, settings.public_base_url + request.path, params)
    # V3 is keyed with the token of the account owning the session (a subaccount's for a session
    # created with `subaccount`), Ma-V3 with the main account's: either one is enough.
    if not verify_callback(signed, nonce, signature, ma_signature, settings.plivo_auth_tokens,
                           settings.plivo_subaccount_tokens):
        return _reject(kind, 403, "signature_invalid", "The callback signature does not verify")
    g.session_uuid = params.get("SessionUUID")
    try:
        outcome = inbox.receive(ctx, kind, request.method, content_type, params, nonce, signed)
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        # Nothing was stored; a 503 tells Plivo (and our metrics) that this one was not taken.
        metrics.CALLBACKS.labels(kind, "unavailable").inc()
        return error_response(503, "database_unavailable", "The database is unavailable; try again shortly",
                              headers={"Retry-After": "1"})
    return Response(_ANSWERS[outcome], mimetype="application/json")
