"""A local stand-in for Plivo's Masking Session API, plus `/sandbox/` control endpoints.

`create_sandbox_app(auth_id, auth_token)` builds the Flask app; serve it with `SandboxServer` (tests)
or `python -m plivo_sandbox` (`make run`). All state is a `SandboxState` on
`app.extensions["sandbox"]`. The control API (no auth, not part of Plivo):

* `POST /sandbox/sessions/<uuid>/calls`, `.../timeout`, `.../replace-number`: play events, answer
  `{"callbacks": [...], "session": {...}}`;
* `GET|POST|DELETE /sandbox/faults`: fault rules for API requests (first match wins);
* `POST /sandbox/faults/release`: end the delay of every request a fault holds now;
* `GET|DELETE /sandbox/requests`: the log of API requests;
* `POST /sandbox/clock` `{"advance": seconds}` (sessions that run out get their SessionTimeout, as
  they do on the wall clock: `SandboxServer` sends them every second), `POST /sandbox/reset`,
  `GET /sandbox/healthz`.
"""

from __future__ import annotations

import hmac
import socket
import struct
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode
from uuid import uuid4

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from plivo_sandbox.models import go_time
from plivo_sandbox.state import DEFAULT_POOL_SIZE, SandboxState
from plivo_sandbox.validation import ApiError

# Plivo documents the path without a trailing slash; the Python, Node and PHP SDKs add one (§1).
SESSIONS = "/v1/Account/<account>/Masking/Session/"
SESSION = SESSIONS + "<session_uuid>/"


def create_sandbox_app(auth_id: str, auth_token: str, *, pool: list[str] | None = None,
                       subaccounts: dict[str, str] | None = None, pool_size: int = DEFAULT_POOL_SIZE) -> Flask:
    """The sandbox app for one account; `pool` lists its virtual numbers (default: `pool_size` in each
    country of `state.POOL_COUNTRIES`), `subaccounts` its subaccounts' auth IDs and tokens (default:
    `state.SANDBOX_SUBACCOUNTS`)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    state = SandboxState(auth_id, auth_token, pool, subaccounts, pool_size)
    app.extensions["sandbox"] = state

    @app.before_request
    def gate_api_request() -> Response | None:
        """Log every API request, apply a matching fault rule, then check HTTP Basic auth."""
        if not request.path.startswith("/v1/"):
            return None
        entry = {
            "time": go_time(state.now()),
            "method": request.method,
            "path": request.path,
            "query": request.args.to_dict(),
            "body": request.get_json(silent=True),  # the parsed JSON body, None when there is none
            "status": None,
        }
        state.log_request(entry)
        g.log_entry = entry
        rule = state.take_fault(request.method, request.path)
        g.after_fault = rule if rule and rule["after_effect"] else None
        if rule and not rule["after_effect"]:
            state.hold(rule["delay"])
            if rule["reset"]:
                return _dropped()
            if rule["status"] is not None:
                return _fault_response(rule)
        credentials = request.authorization
        account = (request.view_args or {}).get("account", auth_id)
        if not (
            credentials is not None
            and credentials.type == "basic"
            and hmac.compare_digest((credentials.username or "").encode(), auth_id.encode())
            and hmac.compare_digest((credentials.password or "").encode(), auth_token.encode())
            and account == auth_id  # a valid login used on another account's path is refused too
        ):
            raise ApiError(401, "Authentication failed")
        return None

    @app.after_request
    def finish_api_request(response: Response) -> Response:
        """Apply an `after_effect` fault (the operation has happened) and log the final status."""
        entry = g.get("log_entry")
        if entry is None:
            return response
        rule = g.get("after_fault")
        if rule:
            state.hold(rule["delay"])
            if rule["reset"]:
                response = _dropped()
            elif rule["status"] is not None:
                response = _fault_response(rule)
        if not isinstance(response.response, _Dropped):  # a dropped connection keeps the status None
            state.set_request_status(entry, response.status_code)
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> tuple[Response, int]:
        return _error(error.status, error.message)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        return _error(error.code or 500, error.name.lower())

    # Masking Session API ------------------------------------------------------------------------

    @app.post(SESSIONS, strict_slashes=False)
    def create_session(account: str) -> tuple[Response, int]:
        """Create: 201 with the new session and its '+' virtual number; with initiate_call_to_first_party,
        Plivo's call to the first party starts once the answer is sent."""
        session = state.create(_json_body())
        response, status = _api(
            {
                "session_uuid": session["session_uuid"],
                "virtual_number": "+" + session["virtual_number"],  # '+' here, digits only inside `session`
                "message": "Session created",
                "session": session,
            },
            201,
        )
        if session["initiate_call_to_first_party"]:
            response.call_on_close(lambda: state.initiated_call(session["session_uuid"]))
        return response, status

    @app.get(SESSIONS, strict_slashes=False)
    def list_sessions(account: str) -> tuple[Response, int]:
        """List: filtered, newest first, paginated (limit 1-20)."""
        args = request.args.to_dict()
        total, objects, limit, offset = state.list(args)

        def page(at: int) -> str:
            return f"/v1/Account/{auth_id}/Masking/Session/?" + urlencode({**args, "limit": limit, "offset": at})

        meta = {
            "limit": limit,
            "next": page(offset + limit) if offset + limit < total else None,
            "offset": offset,
            "previous": page(max(offset - limit, 0)) if offset > 0 else None,
            "total_count": total,
        }
        # Unlike most Plivo list APIs, meta and objects are nested under "response" (§5).
        return _api({"response": {"meta": meta, "objects": objects}})

    @app.get(SESSION, strict_slashes=False)
    def get_session(account: str, session_uuid: str) -> tuple[Response, int]:
        """Get one session; its status reads "expired" once expiry_time has passed."""
        return _api({"response": state.get(session_uuid)})

    @app.post(SESSION, strict_slashes=False)
    def update_session(account: str, session_uuid: str) -> tuple[Response, int]:
        """Update the fields §4 allows."""
        session = state.update(session_uuid, _json_body())
        return _api({"message": "Session updated", "session": session})

    @app.delete(SESSION, strict_slashes=False)
    def expire_session(account: str, session_uuid: str) -> tuple[Response, int]:
        """Expire (Plivo's DELETE): the session is marked expired, not deleted."""
        # The Python SDK sends {"session_uuid": ...} as a DELETE body (§1): it is ignored.
        state.expire(session_uuid)
        return _api({"message": "Session expired"})

    # Control API ----------------------------------------------------------------------------------

    @app.post("/sandbox/sessions/<session_uuid>/calls")
    def play_call(session_uuid: str) -> dict[str, Any]:
        """Play one call through the session and send (or return) its signed callbacks."""
        return state.play_call(session_uuid, _control_body())

    @app.post("/sandbox/sessions/<session_uuid>/timeout")
    def timeout_session(session_uuid: str) -> dict[str, Any]:
        """Expire the session now and send SessionTimeout."""
        return state.timeout(session_uuid, _control_body())

    @app.post("/sandbox/sessions/<session_uuid>/replace-number")
    def replace_number(session_uuid: str) -> dict[str, Any]:
        """Move the session to another pool number and send SessionVirtualNumberReplaced."""
        return state.replace_number(session_uuid, _control_body())

    @app.get("/sandbox/faults")
    def list_faults() -> dict[str, Any]:
        """The fault rules in force."""
        return {"faults": state.faults()}

    @app.post("/sandbox/faults")
    def add_faults() -> dict[str, Any]:
        """Append fault rules (a JSON list)."""
        return {"faults": state.add_faults(request.get_json(silent=True))}

    @app.delete("/sandbox/faults")
    def clear_faults() -> dict[str, Any]:
        """Remove every fault rule."""
        state.clear_faults()
        return {"faults": []}

    @app.post("/sandbox/faults/release")
    def release_held() -> dict[str, Any]:
        """End the delay of every request a fault holds now."""
        return {"released": state.release_held()}

    @app.get("/sandbox/requests")
    def list_requests() -> dict[str, Any]:
        """The API requests received, oldest first."""
        return {"requests": state.request_log()}

    @app.delete("/sandbox/requests")
    def clear_requests() -> dict[str, Any]:
        """Empty the request log."""
        state.clear_requests()
        return {"requests": []}

    @app.post("/sandbox/clock")
    def advance_clock() -> dict[str, Any]:
        """Move the sandbox clock forward by `advance` seconds; the sessions that ran out meanwhile
        get their SessionTimeout (delivered before this answers)."""
        seconds = _control_body().get("advance")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ApiError(400, "advance must be a number of seconds >= 0")
        now = state.advance_clock(seconds)
        return {"now": go_time(now), "timed_out": state.expire_due()}

    @app.post("/sandbox/reset")
    def reset() -> dict[str, Any]:
        """Forget sessions, faults, logged requests and the clock offset."""
        state.reset()
        return {"status": "reset"}

    @app.get("/sandbox/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness."""
        return {"status": "ok"}

    return app


def _api(payload: dict[str, Any], status: int = 200) -> tuple[Response, int]:
    return jsonify({"api_id": str(uuid4()), **payload}), status


def _error(status: int, message: str) -> tuple[Response, int]:
    if request.path.startswith("/v1/"):
        return _api({"error": message}, status)  # Plivo's error shape: {"api_id", "error"} (§7)
    return jsonify({"error": message}), status


class _Dropped:
    """The body of a `reset` fault's answer: instead of a first byte, the connection is dropped.

    The socket is shut down and ConnectionResetError raised while the server iterates the body, so
    werkzeug's server sends nothing, reads no further request on the connection and closes it (with
    SO_LINGER 0: a TCP reset after the FIN). The client sees the connection closed with no answer.
    """

    def __init__(self, connection: socket.socket | None):
        self.connection = connection

    def __iter__(self) -> Iterator[bytes]:
        if self.connection is not None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)
        raise ConnectionResetError("sandbox fault: the connection is dropped without an answer")


def _dropped() -> Response:
    return Response(_Dropped(request.environ.get("werkzeug.socket")))


def _json_body() -> Any:
    """The JSON request body ({} when empty); Plivo accepts only JSON bodies (§1)."""
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "Invalid request body. Send a JSON object with Content-Type: application/json")
    return body


def _control_body() -> dict[str, Any]:
    body = _json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _fault_response(rule: dict[str, Any]) -> Response:
    body = rule["body"]
    if body is None:
        body = {"api_id": str(uuid4()), "error": f"Injected fault (HTTP {rule['status']})"}
    if isinstance(body, str):  # e.g. a proxy's HTML error page
        response = Response(body, rule["status"], mimetype="text/plain")
    else:
        response = jsonify(body)
        response.status_code = rule["status"]
    if rule["retry_after"] is not None:
        response.headers["Retry-After"] = rule["retry_after"]
    return response
