"""The OpenAPI 3.0.3 document of the internal API (`/v1/*`), served at `GET /openapi.json`.

The request-body schemas are derived from the validation tables: Plivo's parameters from the table
the service shares with its sandbox (`domain/plivo_parameters.py`: kind, range, enum, default), the
service's own fields (`domain/requests.py`: `OWN_CREATE_FIELDS`, `LIST_PARAMS`) by reading each
field's check (`_choice(...)` an enum, `_text(n)` a string of at most n characters). A new kind of
parameter or check, or a new list filter, without a schema here fails `build_document()` (and the
tests) instead of silently drifting. The enums of
responses come from the model's tuples (`SESSION_STATUSES`, ...). `tests/test_openapi.py` checks
the document against the Flask routes and runs schemathesis against the running service.

Plivo's callbacks (`/webhooks/plivo/*`) are not part of the internal API: they are described in
`info.description` and in the `x-webhooks` extension, so API clients and fuzzers leave them alone.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flask import Blueprint, Response

from ..domain import plivo_parameters as plivo
from ..domain import requests as v
from ..domain.vocabulary import LEG_END_EVENTS, PARTIES, RECORDING_STATUSES, SESSION_ORIGINS, SESSION_STATUSES

bp = Blueprint("openapi", __name__)

ERROR = {"$ref": "#/components/schemas/Error"}
PHONE = {
    "type": "string",
    "format": "phone",
    "description": "A phone number in any common format, with or without `+` (e.g. `14155550100`, "
                   "`+1 415 555 0100`), or without a country code (`(415) 555-0100`) where the service sets "
                   "DEFAULT_PHONE_REGION; it must be a valid number, and is stored and returned in E.164.",
    "example": "+14155550100",
}
TIMESTAMP = {"type": "string", "format": "date-time", "nullable": True}
DECIMAL = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$", "description": "A decimal amount, as a string."}
URL_PATTERN = r"^$|^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s]+"


def _check_schema(check: v.Check) -> dict[str, Any]:
    """The JSON schema of the values one of the service's own checks accepts (None is handled by the caller)."""
    if check is v.phone:
        return dict(PHONE)
    if check is v._metadata:
        return {"type": "object", "additionalProperties": True,
                "description": "Free-form JSON object, at most 16 KiB when serialised; returned as given."}
    factory = check.__qualname__.split(".")[0]
    bound = inspect.getclosurevars(check).nonlocals
    if factory == "_choice":
        return {"type": "string", "enum": list(bound["allowed"])}
    if factory == "_text":
        return _text_schema(bound["max_len"])
    raise LookupError(f"openapi: no schema for the validation check {check.__qualname__}; add one")


def _text_schema(max_length: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": r"\S",
            "description": f"Non-blank text, at most {max_length} characters (surrounding spaces are trimmed)."}


def _parameter_schema(name: str, parameter: plivo.Parameter) -> dict[str, Any]:
    """The JSON schema of a Plivo parameter, from the table shared with the sandbox."""
    kind = parameter.kind
    if kind == "phone":
        schema = dict(PHONE)
    elif kind == "bool":
        schema = {"type": "boolean"}
    elif kind == "int":
        schema = {"type": "integer", "minimum": parameter.low, "maximum": parameter.high}
    elif kind == "choice":
        schema = {"type": "string", "enum": list(parameter.choices)}
    elif kind == "url":
        schema = {"type": "string", "maxLength": plivo.MAX_URL_LENGTH - 1, "pattern": URL_PATTERN,
                  "description": f"An http or https URL, under {plivo.MAX_URL_LENGTH} characters (Plivo fetches "
                                 "it), or \"\" for none."}
    elif kind == "pin":
        schema = {"description": "4 to 15 digits, as a string (kept as given, leading zeros included) or a number.",
                  "anyOf": [{"type": "string", "pattern": "^[0-9]{4,15}$"},
                            {"type": "integer", "minimum": 1000, "maximum": 10**15 - 1}]}
    elif kind == "text":
        schema = _text_schema(parameter.max_length or 0)
    else:
        raise LookupError(f"openapi: no schema for Plivo parameters of kind {kind!r} ({name}); add one")
    notes = []
    if parameter.default not in (None, ""):
        notes.append(f"Plivo's default: `{json.dumps(parameter.default)}`.")
    if parameter.needs:
        notes.append(f"Only with `{parameter.needs}` true.")
    if notes and "anyOf" not in schema:
        schema["description"] = " ".join([schema.get("description", ""), *notes]).strip()
    elif notes:
        schema["description"] += " " + " ".join(notes)
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "anyOf" in schema:  # in 3.0.x `nullable` needs a `type` next to it: mark every branch
        return schema | {"anyOf": [branch | {"nullable": True} for branch in schema["anyOf"]]}
    return schema | {"nullable": True}


def create_request_schema() -> dict[str, Any]:
    """POST /v1/sessions: the parties, every optional Plivo create parameter, and our own fields."""
    properties: dict[str, Any] = {
        "first_party": _nullable(dict(PHONE)),
        "second_party": _nullable(PHONE | {"example": "+14155550123"}),
    }
    for name, parameter in v.PLIVO_CREATE_FIELDS.items():
        properties[name] = _nullable(_parameter_schema(name, parameter))  # null means "not given"
    for name, check in v.OWN_CREATE_FIELDS.items():
        properties[name] = _nullable(_check_schema(check))
    party = {"type": "string", "format": "phone"}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        # Both parties, or at least one of them on a single-party session.
        "anyOf": [
            {"required": ["first_party", "second_party"],
             "properties": {"first_party": party, "second_party": party}},
            {"required": ["create_session_with_single_party", "first_party"],
             "properties": {"create_session_with_single_party": {"type": "boolean", "enum": [True]},
                            "first_party": party}},
            {"required": ["create_session_with_single_party", "second_party"],
             "properties": {"create_session_with_single_party": {"type": "boolean", "enum": [True]},
                            "second_party": party}},
        ],
        "description": "`first_party` and `second_party` are required (and must differ) unless "
                       "`create_session_with_single_party` is true, when one of them is enough. A field given as "
                       "null counts as not given. Plivo's create parameters are passed to Plivo; `external_ref` "
                       "and `metadata` are this service's own. The callback fields ("
                       + ", ".join(f"`{f}`" for f in v.SERVICE_SET_FIELDS)
                       + ") are set by the service and refused; any other field is refused (400). Ranges, enums "
                       "and defaults are those of the table the service shares with its sandbox "
                       "(`domain/plivo_parameters.py`). PIN authentication: its fields only with "
                       "`is_pin_authentication_required` true (`generate_pin_length` only with `generate_pin`); "
                       "with it, `pin_prompt_play`, and `first_party_pin` and `second_party_pin` (which must "
                       "differ) unless `generate_pin` is true. Each broken rule is named in `details.fields`.",
    }


def update_request_schema() -> dict[str, Any]:
    """PATCH /v1/sessions/{uuid}: what Plivo lets an existing session change."""
    return {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {name: _parameter_schema(name, parameter) for name, parameter in v.UPDATE_FIELDS.items()},
        "description": "At least one field. `first_party` and `second_party` can be changed only on a session "
                       "created with `create_session_with_single_party`; any other field is refused (400).",
    }


def _list_param_schema(name: str) -> dict[str, Any]:
    if name == "status":
        return {"type": "string", "enum": list(SESSION_STATUSES)}
    if name in ("first_party", "second_party", "virtual_number"):
        return dict(PHONE)
    if name in ("created_after", "created_before", "expires_after", "expires_before"):
        return {"type": "string", "format": "date-time", "example": "2026-11-01T00:00:00Z",
                "description": "ISO 8601; without a zone it is UTC."}
    if name in ("duration_min", "duration_max"):
        return {"type": "integer", "minimum": 0, "maximum": v.MAX_DURATION}
    if name == "subaccount":
        return _parameter_schema(name, plivo.PARAMETERS[name])
    if name == "limit":
        return {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
    if name == "cursor":
        return {"type": "string", "description": "`next_cursor` from the previous page, as returned."}
    if name == "external_ref":
        return {"type": "string", "minLength": 1, "maxLength": 255}
    raise LookupError(f"openapi: no schema for the list filter {name!r}; add one")


LIST_DESCRIPTIONS = {
    "created_after": "Sessions created at or after this time.",
    "created_before": "Sessions created before this time.",
    "expires_after": "Sessions whose expiry time (Plivo's `expiry_time`, `expires_at`) is at or after this time.",
    "expires_before": "Sessions whose expiry time is before this time.",
    "duration_min": "Sessions that last at least this many seconds (Plivo's `duration`: from Plivo's creation "
                    "of the session, `plivo_created_at`, to its expiry, `expires_at`).",
    "duration_max": "Sessions that last at most this many seconds.",
    "subaccount": "Sessions created on this Plivo subaccount (its auth ID).",
    "cursor": "Continue after the last session of the previous page.",
    "limit": "Page size.",
}


def _response(description: str, schema: Mapping[str, Any], headers: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": dict(schema)}}}
    if headers:
        out["headers"] = dict(headers)
    return out


ERROR_RESPONSES: dict[str, dict[str, Any]] = {
    "400": _response("Invalid input (`invalid_request`, naming each bad field in `details.fields`: the first 20, "
                     "with `details.fields_not_listed` counting the rest), or Plivo "
                     "refused the input.", ERROR),
    "401": _response("Missing or invalid bearer token (`unauthorized`).", ERROR, {
        "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}),
    "404": _response("No such session (`not_found`).", ERROR),
    "409": _response("Idempotency-Key reused with another body, or still in progress; or the session has "
                     "expired (`conflict`, `idempotency_*`, `session_expired`).", ERROR),
    "413": _response("The request body is over 1 MiB.", ERROR),
    "422": _response("Plivo refused the request for a reason other than the input (`plivo_rejected`).", ERROR),
    "502": _response("Plivo unreachable, failing, or refusing our credentials (`plivo_*`). On a create, "
                     "`details.outcome` `unknown` means the session may exist; it will be resolved.", ERROR),
    "503": _response("Our database is unavailable, Plivo rate-limits us, or too many requests wait on Plivo "
                     "(`database_unavailable`, `plivo_rate_limited`, `plivo_busy`).", ERROR, {
                         "Retry-After": {"schema": {"type": "string"}}}),
    "504": _response("Plivo did not answer in time (`plivo_timeout`). On a create the outcome is unknown and is "
                     "resolved later, never retried blindly.", ERROR),
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _schemas() -> dict[str, Any]:
    session_properties: dict[str, Any] = {
        "session_uuid": {"type": "string"},
        "external_ref": {"type": "string", "nullable": True},
        "metadata": {"type": "object", "additionalProperties": True},
        "first_party": {"type": "string", "nullable": True},
        "second_party": {"type": "string", "nullable": True},
        "virtual_number": {"type": "string", "nullable": True},
        "status": {"type": "string", "enum": list(SESSION_STATUSES)},
        "origin": {"type": "string", "enum": list(SESSION_ORIGINS),
                   "description": "How the service learnt of the session."},
        "record": {"type": "boolean", "nullable": True},
        "session_expiry": {"type": "integer", "nullable": True},
        "parameters": {"type": "object", "additionalProperties": True,
                       "description": "The create parameters sent to Plivo (callback URLs left out)."},
        "call_count": {"type": "integer", "minimum": 0},
        "answered_call_count": {"type": "integer", "minimum": 0},
        "billed_duration": {"type": "integer", "minimum": 0, "description": "Seconds, summed over call legs."},
        "amount": DECIMAL | {"description": "Cost of the calls so far, summed over call legs."},
        "session_amount": DECIMAL | {"nullable": True, "description": "Plivo's charge for creating the session."},
        "recording_count": {"type": "integer", "minimum": 0},
        "last_interaction_at": TIMESTAMP,
        "expires_at": TIMESTAMP,
        "expired_at": TIMESTAMP,
        "plivo_created_at": TIMESTAMP,
        "first_party_pin": {"type": "string", "nullable": True, "description": (
            "The first party's PIN with PIN authentication: the caller's, or the one Plivo generated with "
            "`generate_pin`. Give it to that party; it is never logged.")},
        "second_party_pin": {"type": "string", "nullable": True, "description": "As first_party_pin."},
        "plivo_api_id": {"type": "string", "nullable": True, "description": (
            "Plivo's `api_id` of the last Plivo call that changed the session (create, update, refresh), "
            "to quote to Plivo's support.")},
        "subaccount": {"type": "string", "nullable": True, "description": (
            "The Plivo subaccount (auth ID) the session was created on; null for the main account's.")},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    }
    leg_properties = {
        "party": {"type": "string", "enum": list(PARTIES)},
        "call_uuid": {"type": "string", "nullable": True},
        "initiated_at": TIMESTAMP, "ringing_at": TIMESTAMP, "answered_at": TIMESTAMP, "ended_at": TIMESTAMP,
        "end_event": {"type": "string", "enum": list(LEG_END_EVENTS), "nullable": True},
        "duration": {"type": "integer", "nullable": True},
        "billed_duration": {"type": "integer", "nullable": True},
        "amount": DECIMAL | {"nullable": True},
        "hangup_cause": {"type": "string", "nullable": True},
        "hangup_cause_code": {"type": "integer", "nullable": True},
        "from_number": {"type": "string", "nullable": True},
        "to_number": {"type": "string", "nullable": True},
        "source": {"type": "string"},
    }
    recording_properties = {
        "recording_uuid": {"type": "string"},
        "status": {"type": "string", "enum": list(RECORDING_STATUSES)},
        "recording_url": {"type": "string", "nullable": True,
                          "description": "As Plivo sent it; stored, never fetched by this service."},
        "resource_url": {"type": "string", "nullable": True},
        "duration": {"type": "integer", "nullable": True},
        "format": {"type": "string", "nullable": True},
        "started_at": TIMESTAMP, "ended_at": TIMESTAMP,
    }

    details_properties = {
        "projection_pending": {"type": "boolean", "description": (
            "True when facts about the session could not be projected (an error the operator sees in "
            "the log and in the projection lag); the counters are then those of the last projection.")},
        "call_legs": {"type": "array", "items": {"$ref": "#/components/schemas/CallLeg"}},
        "recordings": {"type": "array", "items": {"$ref": "#/components/schemas/Recording"}},
        "virtual_number_history": {"type": "array",
                                   "items": {"$ref": "#/components/schemas/VirtualNumberAssignment"}},
    }

    def obj(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": list(properties),
                "properties": properties} | extra

    return {
        "Error": obj({
            "error": {"type": "string", "description": "A stable, machine-readable code."},
            "message": {"type": "string", "description": "For people; never a stack trace."},
            "details": {"type": "object", "additionalProperties": True},
        }, description="The one shape of every 4xx and 5xx answer."),
        "Session": obj(session_properties),
        "CallLeg": obj(leg_properties),
        "Recording": obj(recording_properties),
        "VirtualNumberAssignment": obj({"virtual_number": {"type": "string"},
                                        "assigned_at": {"type": "string", "format": "date-time"}}),
        "SessionDetails": obj(session_properties | details_properties),
        "RefreshedSession": obj(session_properties | details_properties | {
            "refresh": obj({
                "changed": {"type": "boolean", "description": (
                    "Plivo's record changed the session's counters or status.")},
                "drift": {"type": "boolean", "description": (
                    "Our totals (call count, billed duration, amount) still differ from Plivo's.")},
            }),
        }),
        "SessionPage": obj({
            "sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}, "maxItems": 100},
            "next_cursor": {"type": "string", "nullable": True,
                            "description": "Pass as `cursor` for the next page; null on the last page."},
        }),
        "CreateSessionRequest": create_request_schema(),
        "UpdateSessionRequest": update_request_schema(),
    }


SESSION = {"$ref": "#/components/schemas/Session"}
UUID_PARAM = {"name": "session_uuid", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "Plivo's session UUID."}

WEBHOOKS = {
    "/webhooks/plivo/session": {
        "methods": ["POST", "GET"],
        "description": "Plivo's session callbacks (both event vocabularies); form, JSON or GET query.",
    },
    "/webhooks/plivo/recording": {
        "methods": ["POST", "GET"],
        "description": "Plivo's recording callbacks; the recording URL is stored, never fetched.",
    },
}
WEBHOOK_RULES = (
    "Not for API clients: authenticated by `X-Plivo-Signature-V3-Nonce` and `X-Plivo-Signature-V3` (HMAC-SHA256 "
    "with the Plivo auth token, or a PLIVO_SUBACCOUNT_TOKENS one, over PUBLIC_BASE_URL + path and the "
    "parameters) or `X-Plivo-Signature-Ma-V3` (the same with the main account's token); during a token "
    "rotation either token verifies; never by a bearer token. "
    "Answers: 200 `{\"status\": \"applied\"|\"ignored\"|\"failed\"|"
    "\"duplicate\"|\"stored\"}`; 400 unparsable body; 403 signature missing or invalid; 413 body over "
    "WEBHOOK_MAX_BODY_BYTES (64 KiB); 503 database unavailable. Each callback is stored once (redeliveries are "
    "`duplicate`)."
)


def build_document() -> dict[str, Any]:
    list_parameters = [
        {"name": name, "in": "query", "required": False, "schema": _list_param_schema(name)}
        | ({"description": LIST_DESCRIPTIONS[name]} if name in LIST_DESCRIPTIONS else {})
        for name in v.LIST_PARAMS
    ]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Plivo masking-session service: internal API",
            "version": "1",
            "description": (
                "Start, read, list, change and expire Plivo masking sessions. Every `/v1` call needs "
                "`Authorization: Bearer <token>` (one of API_TOKENS). Every error is JSON "
                "`{\"error\", \"message\", \"details\"}`; an unknown field, filter or route is refused, never "
                "ignored.\n\nCallbacks from Plivo (not part of this API; see `x-webhooks`): "
                + "; ".join(f"{' | '.join(hook['methods'])} `{path}`" for path, hook in WEBHOOKS.items())
                + ". " + WEBHOOK_RULES
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "x-webhooks": {path: hook | {"authentication": "X-Plivo-Signature-V3"} for path, hook in WEBHOOKS.items()},
        "paths": {
            "/v1/sessions": {
                "post": {
                    "operationId": "createSession",
                    "summary": "Create a Plivo masking session",
                    "description": "Calls Plivo once. The service sets the callback URLs itself. With an "
                                   "`Idempotency-Key`, a repeat returns the first response (header "
                                   "`Idempotent-Replayed: true`), and a different body with the same key is 409. "
                                   "Keys are per bearer token: another token's identical key is another request.",
                    "parameters": [{
                        "name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        "description": "1 to 255 characters (after trimming spaces).",
                    }],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/CreateSessionRequest"}}}},
                    "responses": {
                        "201": _response("Created (or the replayed first response).", SESSION, {
                            "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}}}),
                    } | _errors(400, 401, 404, 409, 413, 422, 502, 503, 504),
                },
                "get": {
                    "operationId": "listSessions",
                    "summary": "List stored sessions, newest first",
                    "description": "Filters combine; an empty filter is ignored, an unknown one refused.",
                    "parameters": list_parameters,
                    "responses": {"200": _response("A page of sessions.", {"$ref": "#/components/schemas/SessionPage"})}
                    | _errors(400, 401, 503),
                },
            },
            "/v1/sessions/{session_uuid}": {
                "parameters": [UUID_PARAM],
                "get": {
                    "operationId": "getSession",
                    "summary": "A stored session with its call legs, recordings and number history",
                    "responses": {"200": _response("The session.", {"$ref": "#/components/schemas/SessionDetails"})}
                    | _errors(401, 404, 503),
                },
                "patch": {
                    "operationId": "updateSession",
                    "summary": "Change what Plivo lets an existing session change",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/UpdateSessionRequest"}}}},
                    "responses": {"200": _response("The updated session.", SESSION)}
                    | _errors(400, 401, 404, 409, 413, 422, 502, 503, 504),
                },
                "delete": {
                    "operationId": "expireSession",
                    "summary": "Expire the session on Plivo; the row is kept as `expired` (idempotent)",
                    "responses": {"200": _response("The expired session.", SESSION)}
                    | _errors(401, 404, 422, 502, 503, 504),
                },
            },
            "/v1/sessions/{session_uuid}/refresh": {
                "parameters": [UUID_PARAM],
                "post": {
                    "operationId": "refreshSession",
                    "summary": "Fetch the session from Plivo now and reconcile it, as the worker does every minute",
                    "description": "For support staff who cannot wait for the next reconciliation run: Plivo's "
                                   "record of the session (its calls, their call UUIDs and billing, its status "
                                   "and expiry, generated PINs the create could not fetch) is stored as facts "
                                   "and the session projected by the same code as the worker's. `plivo_api_id` "
                                   "becomes the `api_id` of this read. A session the service does not know is "
                                   "404 without calling Plivo; one Plivo does not know (older than its 90 days) "
                                   "is 404 with Plivo's message.",
                    "responses": {"200": _response("The session after the refresh.",
                                                   {"$ref": "#/components/schemas/RefreshedSession"})}
                    | _errors(401, 404, 422, 502, 503, 504),
                },
            },
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "One of the tokens in API_TOKENS."}},
            "schemas": _schemas(),
            "responses": {f"E{status}": response for status, response in ERROR_RESPONSES.items()},
        },
    }


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The document, built once per process (it depends only on code)."""
    return build_document()


@lru_cache(maxsize=1)
def _document_json() -> bytes:
    return json.dumps(document()).encode()


@bp.get("/openapi.json")
def openapi_json():
    # Served as bytes made once: a public route that anyone may fetch as often as they like.
    return Response(_document_json(), mimetype="application/json")
