"""The OpenAPI document of /v1: valid, in step with the routes and the validation, and honoured by the service.

The last test runs schemathesis against the real service over HTTP (the sandbox Plivo behind it):
hypothesis-generated requests for every operation must never get a 5xx, and every answer must be
one the document describes (status, content type, headers, body schema).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

from webhook_service import create_app
from webhook_service.domain import requests as validation
from webhook_service.domain.plivo_parameters import Parameter
from webhook_service.web import openapi
from webhook_service.web.openapi import build_document

from .helpers import API_TOKEN, FIRST, LiveServer, free_port, make_settings

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
# Per operation; 5 operations, each case one HTTP request (creates also reach the sandbox Plivo).
MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def live_module(database_url, sandbox_server) -> Iterator[LiveServer]:
    """The app on a real port for the whole module (conftest's `live` is per test)."""
    requests.post(sandbox_server.url + "/sandbox/reset", timeout=5).raise_for_status()
    port = free_port()
    settings_ = make_settings(sandbox_server.url, f"http://127.0.0.1:{port}")
    server = LiveServer(create_app({"TESTING": True, "settings": settings_, "database_url": database_url}), port)
    server.start()
    yield server
    server.stop()


# (a) A valid OpenAPI 3.0 document --------------------------------------------------------------


def _refs(node) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_the_document_is_valid_openapi_3_0():
    doc = build_document()
    assert doc["openapi"] == "3.0.3"
    OPENAPI_30_VALIDATOR.validate(doc)  # the OpenAPI 3.0 meta-schema, as shipped with schemathesis
    schemathesis.openapi.from_dict(doc).validate()
    for ref in _refs(doc):  # every reference resolves inside the document
        node = doc
        assert ref.startswith("#/"), ref
        for part in ref[2:].split("/"):
            assert part in node, ref
            node = node[part]
    ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids))


def test_every_error_status_answers_the_one_error_shape():
    doc = build_document()
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message", "details"] and error["additionalProperties"] is False
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            assert op.get("security", doc["security"]) == [{"bearerAuth": []}], (method, path)
            statuses = {int(s) for s in op["responses"]}
            assert {401, 503} <= statuses, (method, path)
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, (method, path, status)
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "One of the tokens in API_TOKENS."}
    create = doc["paths"]["/v1/sessions"]["post"]
    assert [p["name"] for p in create["parameters"] if p["in"] == "header"] == ["Idempotency-Key"]


def test_openapi_json_is_served_without_auth_and_is_the_document(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_json() == build_document()


def test_webhooks_are_described_but_not_operations():
    doc = build_document()
    assert set(doc["x-webhooks"]) == {"/webhooks/plivo/session", "/webhooks/plivo/recording"}
    assert "/webhooks/plivo/session" in doc["info"]["description"]
    assert all(path.startswith("/v1/") for path in doc["paths"])


# (b) The document and the code cannot drift ----------------------------------------------------


def _flask_v1_routes(app) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/v1/") or rule.rule == "/v1":
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    return routes


def test_every_v1_route_is_documented_with_its_methods_and_nothing_else(app):
    documented = {path: {m for m in item if m in METHODS} for path, item in build_document()["paths"].items()}
    assert documented == _flask_v1_routes(app)
    for path, item in build_document()["paths"].items():  # path parameters are declared
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{([^}]+)}", path))


def test_request_bodies_list_exactly_the_fields_validation_accepts():
    schemas = build_document()["components"]["schemas"]
    create = schemas["CreateSessionRequest"]
    assert set(create["properties"]) == (
        {"first_party", "second_party"} | set(validation.PLIVO_CREATE_FIELDS) | set(validation.OWN_CREATE_FIELDS))
    assert not set(create["properties"]) & set(validation.SERVICE_SET_FIELDS)
    assert create["additionalProperties"] is False
    update = schemas["UpdateSessionRequest"]
    assert set(update["properties"]) == set(validation.UPDATE_FIELDS)
    assert update["additionalProperties"] is False and update["minProperties"] == 1
    listing = build_document()["paths"]["/v1/sessions"]["get"]["parameters"]
    assert [p["name"] for p in listing] == list(validation.LIST_PARAMS)


def _first_violation(body: dict) -> dict:
    try:
        validation.validate_create(body)
    except validation.ApiError as exc:
        return exc.details["fields"]
    return {}


PIN_AUTH = {"is_pin_authentication_required": True, "pin_prompt_play": "https://example.com/pin.mp3",
            "generate_pin": True}


def test_documented_ranges_and_enums_are_the_ones_validation_enforces():
    parties = {"first_party": FIRST, "second_party": "+14155550123"}
    properties = build_document()["components"]["schemas"]["CreateSessionRequest"]["properties"]
    checked = 0
    for name, schema in properties.items():
        # A PIN parameter is checked where PIN authentication is on (else it is refused for that).
        parameter = validation.PLIVO_CREATE_FIELDS.get(name)
        pin = name in PIN_AUTH or bool(parameter and parameter.needs)
        base = parties | (PIN_AUTH if pin else {})
        if schema.get("type") == "integer":
            lo, hi = schema["minimum"], schema["maximum"]
            assert _first_violation(base | {name: lo}) == {} and _first_violation(base | {name: hi}) == {}, name
            assert name in _first_violation(base | {name: lo - 1}), name
            assert name in _first_violation(base | {name: hi + 1}), name
            assert name in _first_violation(base | {name: str(lo)}), name
            checked += 1
        elif "enum" in schema:
            for value in schema["enum"]:
                assert _first_violation(base | {name: value}) == {}, (name, value)
            assert name in _first_violation(base | {name: "not-" + schema["enum"][0]}), name
            checked += 1
        elif schema.get("type") == "string" and "maxLength" in schema and not _is_url(name):
            assert _first_violation(base | {name: "x" * schema["maxLength"]}) == {}, name
            assert name in _first_violation(base | {name: "x" * (schema["maxLength"] + 1)}), name
            assert name in _first_violation(base | {name: "  "}), name
            checked += 1
        elif schema.get("type") == "boolean":
            assert _first_violation(base | {name: True}) == {} and name in _first_violation(base | {name: 1}), name
            checked += 1
    assert checked >= 15


def _is_url(name: str) -> bool:
    return name in validation.PLIVO_CREATE_FIELDS and validation.PLIVO_CREATE_FIELDS[name].kind == "url"


def test_a_validation_check_without_a_schema_stops_the_build():
    def new_kind_of_check(name, value):
        return value

    with pytest.raises(LookupError, match="new_kind_of_check"):
        openapi._check_schema(new_kind_of_check)
    with pytest.raises(LookupError, match="colour"):
        openapi._parameter_schema("paint", Parameter("colour"))


# (c) Schemathesis against the running service -------------------------------------------------


# Values for the document's `phone` format: valid numbers in the shapes callers use (garbage comes
# from the coverage phase and from other formats).
_local = st.integers(min_value=0, max_value=9999).map(lambda n: f"415555{n:04d}")
schemathesis.openapi.format("phone", st.one_of(
    _local.map(lambda d: "+1" + d),
    _local.map(lambda d: "1" + d),
    _local.map(lambda d: f"+1 ({d[:3]}) {d[3:6]}-{d[6:]}"),
    st.sampled_from(["+447700900123", "+33612345678", "+919876543210", "+61412345678"]),
))

# The document as the code builds it (the served one is the same: see above); requests go to
# the running service (`case.call(base_url=live_module.url)`).
schema = schemathesis.openapi.from_dict(build_document(), config=schemathesis.Config.from_dict({
    "generation": {
        "max-examples": MAX_EXAMPLES,
    },
    "phases": {"stateful": {"enabled": False}},
}))


@pytest.fixture(scope="module")
def real_sessions(live_module) -> list[str]:
    """Sessions that exist, so GET/PATCH/DELETE also reach their 200s, 409s and Plivo."""
    uuids = []
    for n in range(4):
        body = {"first_party": FIRST, "second_party": f"+1415555{n + 200:04d}", "record": n % 2 == 0}
        response = requests.post(live_module.url + "/v1/sessions", json=body, headers=AUTH, timeout=10)
        assert response.status_code == 201, response.text
        uuids.append(response.json()["session_uuid"])
    return uuids


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(case, live_module, real_sessions):
    uuid = (case.path_parameters or {}).get("session_uuid")
    if isinstance(uuid, str):
        # Half the cases hit a real session (chosen from the generated value, so a replay is the same).
        pick = zlib.crc32(uuid.encode("utf-8", "surrogatepass")) % (2 * len(real_sessions))
        if pick < len(real_sessions):
            case.path_parameters["session_uuid"] = real_sessions[pick]
    response = case.call(base_url=live_module.url, headers=AUTH, timeout=15)
    case.validate_response(response, checks=CHECKS)
