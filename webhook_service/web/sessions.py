"""The internal sessions API under /v1: parse, call one service function, shape the response."""

from __future__ import annotations

import hmac

from flask import Blueprint, current_app, g, jsonify, request

from ..context import Context
from ..domain import jsonbody
from ..domain.callbacks import MAX_SESSION_UUID
from ..domain.callers import token_id
from ..domain.requests import validate_create, validate_list
from ..domain.values import session_uuid_as_stored
from ..errors import ApiError, NotFound, Unauthorized
from ..services import reconcile
from ..services import sessions as service

bp = Blueprint("sessions", __name__, url_prefix="/v1")


def ctx() -> Context:
    return current_app.extensions["webhook_service"]


@bp.before_request
def require_bearer_token() -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
    given = token.strip().encode()
    ok = False
    for accepted in ctx().settings.api_tokens:
        ok |= hmac.compare_digest(given, accepted.encode())  # no early exit: constant time
    if not ok:
        raise Unauthorized("The bearer token is not valid",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    # Which caller this is (the token itself is never passed on or stored): its idempotency keys are its own.
    g.token_id = token_id(token.strip())


def _json_body():
    if not request.is_json:
        raise ApiError("Send a JSON body with Content-Type: application/json")
    try:
        return jsonbody.loads(request.get_data(cache=True), max_depth=32)
    except jsonbody.JsonError as exc:
        raise ApiError(f"The request body {exc}") from None


def _session_uuid(value: str) -> str:
    # No stored session has such an id; answering here keeps NUL characters away from Postgres.
    if len(value) > MAX_SESSION_UUID or jsonbody.text_problem(value):
        raise NotFound("No such session")
    value = session_uuid_as_stored(value)
    g.session_uuid = value
    return value


@bp.post("/sessions")
def create_session():
    req = validate_create(_json_body(), region=ctx().settings.default_phone_region)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key.strip()) <= 255:
        raise ApiError("Idempotency-Key must be 1 to 255 characters")
    with ctx().plivo_slot():
        result = service.create_session(ctx(), req, key.strip() if key else None, token_id=g.token_id)
    if result.status == 201:
        g.session_uuid = result.body.get("session_uuid")
    response = jsonify(result.body)
    response.status_code = result.status
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("/sessions")
def list_sessions():
    query = validate_list(request.args, region=ctx().settings.default_phone_region)
    return jsonify(service.list_sessions(ctx(), query))


@bp.get("/sessions/<session_uuid>")
def get_session(session_uuid: str):
    return jsonify(service.session_details(ctx(), _session_uuid(session_uuid)))


@bp.patch("/sessions/<session_uuid>")
def update_session(session_uuid: str):
    session_uuid = _session_uuid(session_uuid)
    body = _json_body()
    with ctx().plivo_slot():
        return jsonify(service.update_session(ctx(), session_uuid, body))


@bp.delete("/sessions/<session_uuid>")
def expire_session(session_uuid: str):
    session_uuid = _session_uuid(session_uuid)
    with ctx().plivo_slot():
        return jsonify(service.expire_session(ctx(), session_uuid))


@bp.post("/sessions/<session_uuid>/refresh")
def refresh_session(session_uuid: str):
    session_uuid = _session_uuid(session_uuid)
    with ctx().plivo_slot():
        return jsonify(reconcile.refresh_session(ctx(), session_uuid))
