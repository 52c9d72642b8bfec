"""The app under gunicorn, as production serves it: what only gunicorn's own HTTP parser can show.

Raw bytes over a socket, so that the request is exactly what an attacker (or a broken client) sends.
The same bytes go to werkzeug's server (the `live` fixture, which most tests use) to show that its
path answers in the JSON shape too.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from .drills.harness import API_HEADERS, GunicornService, service_env

SIGNED = {"Content-Type": "application/x-www-form-urlencoded", "X-Plivo-Signature-V3": "bm90LWl0",
          "X-Plivo-Signature-V3-Nonce": "1"}
# The view reads these bodies (signed callback, authorised API call) or answers before reading them
# (unsigned callback, 403; no token, 401; unknown route, 404): either way the answer is one JSON 400.
REQUESTS = {
    "signed callback": ("/webhooks/plivo/session", SIGNED),
    "unsigned callback": ("/webhooks/plivo/recording", {"Content-Type": "application/x-www-form-urlencoded"}),
    "api": ("/v1/sessions", API_HEADERS | {"Content-Type": "application/json"}),
    "api without a token": ("/v1/sessions", {"Content-Type": "application/json"}),
    "unknown route": ("/nowhere", {"Content-Type": "application/json"}),
}
# Chunked bodies gunicorn's reader refuses, with what the answer says about each.
MALFORMED = {
    "size 0x3": (b"0x3\r\nabc\r\n0\r\n\r\n", "a chunk size is not a hexadecimal number followed by CRLF"),
    "size -3": (b"-3\r\nabc\r\n0\r\n\r\n", "a chunk size is not a hexadecimal number followed by CRLF"),
    "LF-only size line": (b"3\nabc\n0\r\n\r\n", "a chunk size is not a hexadecimal number followed by CRLF"),
    "LF after the data": (b"3\r\nabc\n0\r\n\r\n", "a chunk does not end with CRLF"),
    "Content-Length trailer": (b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n",
                               "a trailer field is malformed or not allowed"),
    "bad extension": (b"3;\x01\r\nabc\r\n0\r\n\r\n", "a chunk extension is malformed"),
}


@pytest.fixture(scope="module")
def service(database_url, sandbox_server, tmp_path_factory) -> Iterator[GunicornService]:
    """The service under gunicorn (gunicorn.conf.py, one worker) on the suite's database."""
    env = service_env(database_url, sandbox_server.url, WEB_CONCURRENCY="1", GUNICORN_THREADS="2")
    service = GunicornService(tmp_path_factory.mktemp("gunicorn"), env).start()
    yield service
    service.stop()


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw`, read until the server closes the connection; the status, headers and everything after them."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):  # a timeout here: the server kept the connection open
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, rest


def chunked(path: str, headers: dict[str, str], body: bytes, *, close: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked"]
    lines += [f"{name}: {value}" for name, value in headers.items()] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_error(headers: dict[str, str], rest: bytes) -> dict:
    """The one JSON error answer, and nothing after it on the connection."""
    assert headers["content-type"] == "application/json"
    length = int(headers["content-length"])
    assert len(rest) == length, f"more than one answer on the connection: {rest!r}"
    body = json.loads(rest)
    assert set(body) == {"error", "message", "details"}
    return body


def test_malformed_chunked_bodies_are_one_json_400_and_one_log_line_under_gunicorn(service):
    logged_before = service.log_path.read_text().count("\n")
    for label, (path, headers) in REQUESTS.items():
        for case, (body, problem) in MALFORMED.items():
            # No `Connection: close`: the server must close it itself, since where the next request
            # would start is unknown.
            status, answer_headers, rest = exchange(service.port, chunked(path, headers, body))
            assert status == 400, f"{label}, {case}: {status} {rest[:300]!r}"
            answer = json_error(answer_headers, rest)
            assert answer == {"error": "invalid_body", "message": f"The request body cannot be read: {problem}",
                              "details": {"problem": problem}}, (label, case)
            assert len(answer_headers["x-request-id"]) == 32
    lines = service.log_path.read_text().splitlines()[logged_before:]
    assert not [line for line in lines if "Traceback" in line or "unhandled error" in line], "\n".join(lines)
    refused = [json.loads(line) for line in lines if "request body refused" in line]
    assert len(refused) == len(lines) == len(REQUESTS) * len(MALFORMED)  # one line each, and nothing else
    assert {entry["level"] for entry in refused} == {"warning"}


def test_a_well_formed_chunked_callback_is_still_read_under_gunicorn(service):
    # The body is read before anything answers it: a good one still reaches the signature check.
    form = b"EventName=SessionTimeout&SessionUUID=x"
    status, headers, rest = exchange(service.port, chunked(
        "/webhooks/plivo/session", SIGNED, b"%x\r\n%s\r\n0\r\n\r\n" % (len(form), form), close=True))
    assert status == 403 and json_error(headers, rest)["error"] == "signature_invalid"


def test_werkzeugs_server_answers_the_same_bodies_in_the_json_shape(live):
    # werkzeug reads chunks leniently (`0x3` is 3, LF-only lines pass, trailers are ignored) or
    # raises OSError, which it answers 400 itself: a 4xx in the JSON shape either way, never a 500.
    port = int(live.url.rsplit(":", 1)[1])
    for label, (path, headers) in REQUESTS.items():
        for case, (body, _) in MALFORMED.items():
            status, answer_headers, rest = exchange(port, chunked(path, headers, body, close=True))
            assert 400 <= status < 500, f"{label}, {case}: {status} {rest[:300]!r}"
            json_error(answer_headers, rest)


def test_gunicorns_request_limits_are_the_configured_ones(service):
    # gunicorn refuses these itself, with an HTML page the app never sees (docs/deploy.md: the proxy in
    # front refuses them first, in the JSON shape). The limits are gunicorn.conf.py's.
    def get(line_length: int = 0, headers: int = 0, header_size: int = 0) -> int:
        lines = [f"GET /healthz?{'x' * line_length} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"X-Filler-{n}: 1" for n in range(headers)] + ([f"X-Big: {'b' * header_size}"] if header_size else [])
        return exchange(service.port, ("\r\n".join(lines) + "\r\n\r\n").encode())[0]

    assert get(line_length=4000) == 200 and get(line_length=4100) == 414  # limit_request_line 4094
    assert get(headers=45) == 200 and get(headers=60) == 431  # limit_request_fields 50
    assert get(header_size=4000) == 200 and get(header_size=5000) == 431  # limit_request_field_size 4096


def _serve_once(tmp_path, database_url: str, sandbox_url: str) -> tuple[list[str], list[str]]:
    """gunicorn started as the Procfile starts it (no PROMETHEUS_MULTIPROC_DIR, TMPDIR a folder of the
    test's), asked one request, then stopped with SIGTERM: its output lines, and the temp folder's
    contents while it served."""
    import signal
    import subprocess
    import sys
    import time

    import requests

    from .drills.harness import ROOT
    from .helpers import environ_without_settings, free_port, wait_until

    port = free_port()
    env = environ_without_settings() | service_env(database_url, sandbox_url) | {
        "GUNICORN_BIND": f"127.0.0.1:{port}", "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "INFO", "TMPDIR": str(tmp_path)}
    log = tmp_path / "gunicorn.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                                 "webhook_service:create_app()"], cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        def ready() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        assert wait_until(ready, timeout=60, alive=lambda: proc.poll() is None), log.read_text()
        while_serving = sorted(p.name for p in tmp_path.iterdir() if p.name != "gunicorn.log")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text().splitlines(), while_serving


def test_gunicorn_removes_its_temporary_metrics_folder_when_it_exits(database_url, sandbox_server, tmp_path):
    _, while_serving = _serve_once(tmp_path, database_url, sandbox_server.url)
    assert len(while_serving) == 1 and while_serving[0].startswith("webhook-service-metrics-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gunicorn.log"]


def test_every_line_gunicorn_writes_is_one_json_record_its_own_included(database_url, sandbox_server, tmp_path):
    lines, _ = _serve_once(tmp_path, database_url, sandbox_server.url)
    records = [json.loads(line) for line in lines]  # each line one JSON object: nothing else was written
    gunicorns = [r["message"] for r in records if r["logger"] == "gunicorn.error"]
    assert gunicorns[0].startswith("Starting gunicorn") and gunicorns[-1] == "Shutting down: Master", gunicorns
    assert any(m.startswith("Booting worker with pid") for m in gunicorns)
    assert any(r["logger"] == "webhook_service.access" and r["route"] == "/readyz" for r in records)
    assert not [r for r in records if r["logger"] == "gunicorn.access"]  # the app's access line is the only one
    assert {"time", "level", "logger", "message"} <= set(records[0])
