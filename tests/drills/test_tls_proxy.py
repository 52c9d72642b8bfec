"""Drills: the public https URL. Debian's nginx, running the repository's site (deploy/nginx/) with a
throwaway certificate the drill makes, terminates TLS on loopback and forwards to gunicorn.

* Callbacks signed for `https://masking.drill.test/...` (the public URL Plivo calls) verify and are
  stored exactly once whatever the request carries on the way: the public host, nginx's own address
  or a stranger's in `Host`, invented `X-Forwarded-Host`, `-Proto`, `-Prefix`, `-For` and `Forwarded`
  headers; and under a path prefix, whether nginx strips it or keeps it and names it in `SCRIPT_NAME`
  (`PUBLIC_BASE_URL` then carries the prefix). Nothing of the request's own address is signed.
* The request log names the client from `X-Forwarded-For` only when the peer is in
  FORWARDED_ALLOW_IPS; any other peer is logged as itself, whatever it claims.
* Only the callbacks are public: from an address outside the internal networks the site lists,
  the API, /metrics and /readyz are a JSON 403 from nginx, and callbacks are still taken.
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path

import pytest

from ..helpers import wait_until
from .harness import (
    API_HEADERS,
    GunicornService,
    Load,
    NginxProxy,
    check_exact,
    create_sessions,
    plan_calls,
    self_signed_certificate,
    service_env,
    split,
    tally,
)

PUBLIC_HOST = "masking.drill.test"
CALLBACK_PATH = "/webhooks/plivo/session"
SESSIONS = 4
CALLS = 3

# What a request may carry past nginx that a verifier must not sign: each callback gets one of these.
HEADER_VARIANTS = [
    {},
    {"Host": PUBLIC_HOST},
    {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http",
     "X-Forwarded-Prefix": "/elsewhere", "X-Forwarded-Port": "8443"},
    {"X-Forwarded-For": "198.51.100.7", "Forwarded": "for=192.0.2.1;proto=http;host=evil.example"},
]

# Mounted under /masking: nginx strips the prefix, or keeps it and tells gunicorn (SCRIPT_NAME is one
# of gunicorn's forwarder headers, believed from FORWARDED_ALLOW_IPS only).
PREFIXES = {
    "root": ("", ""),
    "prefix stripped by nginx": ("/masking", """
    location /masking/ {
        client_max_body_size 64k;
        rewrite ^/masking(/.*)$ $1 break;
        include /etc/nginx/masking-service-proxy.conf;
    }"""),
    "prefix kept, named in SCRIPT_NAME": ("/masking", """
    location /masking/ {
        client_max_body_size 64k;
        proxy_set_header SCRIPT_NAME /masking;
        include /etc/nginx/masking-service-proxy.conf;
    }"""),
}


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A throwaway certificate for the public host and 127.0.0.1, trusted by this process's requests."""
    cert, key = self_signed_certificate(tmp_path, PUBLIC_HOST)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    return cert, key


@pytest.mark.slow
@pytest.mark.parametrize("mount", list(PREFIXES))
def test_callbacks_signed_for_the_public_https_url_verify_whatever_the_proxy_sends(
        mount, certificate, drill_db, drill_engine, drill_sandbox, start_service, drill_report):
    prefix, locations = PREFIXES[mount]
    nginx = NginxProxy(tls=certificate, locations=locations)
    env = service_env(drill_db, drill_sandbox.url, f"https://{PUBLIC_HOST}{prefix}")
    try:
        service = start_service(env)
        nginx.start(service.port)
        uuids = create_sessions(nginx.url + prefix, SESSIONS)  # the API through the same door
        callbacks, expected = plan_calls(drill_sandbox, uuids, CALLS)
        assert all(c["url"].startswith(f"https://{PUBLIC_HOST}{prefix}/webhooks/plivo/") for c in callbacks)
        drill_report.phase("setup")

        jobs = [(i, dict(c, headers=c["headers"] | HEADER_VARIANTS[i % len(HEADER_VARIANTS)]), nginx.url)
                for i, c in enumerate(callbacks)]
        answers = Load(split(jobs, 4)).start().join()
        drill_report.update({"mount": mount, "callbacks": len(callbacks), "answers": tally(answers)})
        drill_report.phase("load")
        assert all(a.kind == "2xx" and a.outcome == "recorded" for a in answers), tally(answers)
        problems = check_exact(drill_engine, env, callbacks, expected)
        assert not problems, "\n".join(problems)
        drill_report.phase("verify")
    finally:
        nginx.stop()


def get_from(source: str, port: int, path: str, headers: dict[str, str], *, tls: Path | None = None,
             method: str = "GET") -> int:
    """GET (or `method`) `path` on 127.0.0.1:`port` from the loopback address `source`; its status."""
    if tls:
        context = ssl.create_default_context(cafile=str(tls))
        conn = http.client.HTTPSConnection("127.0.0.1", port, source_address=(source, 0), context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(source, 0), timeout=10)
    try:
        conn.request(method, path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def logged_clients(service: GunicornService) -> dict[str, str]:
    """request id -> the client its access log line names."""
    clients = {}
    for line in service.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "webhook_service.access" and entry.get("request_id"):
            clients[entry["request_id"]] = entry.get("client")
    return clients


@pytest.mark.slow
def test_the_request_log_believes_x_forwarded_for_only_from_forwarded_allow_ips(
        certificate, drill_db, drill_sandbox, tmp_path, drill_report):
    """The test's client connects from 127.0.0.5 (all of 127/8 is loopback); nginx reaches gunicorn from
    127.0.0.1. Every request claims to come from 198.51.100.7."""
    cert, _ = certificate
    spoof = {"X-Forwarded-For": "198.51.100.7"}
    port = None
    nginx = NginxProxy(tls=certificate)
    seen = {}
    try:
        for trusted in ("127.0.0.1", "127.0.0.2"):  # nginx's address, then another one
            env = service_env(drill_db, drill_sandbox.url, f"https://{PUBLIC_HOST}", LOG_LEVEL="INFO",
                              FORWARDED_ALLOW_IPS=trusted, WEB_CONCURRENCY="1")
            service = GunicornService(tmp_path, env, name=f"trusting-{trusted}", port=port).start()
            port = service.port
            try:
                if nginx.proc is None:
                    nginx.start(service.port)
                # An unsigned callback (the only public route): refused 403 by the app, which logs it.
                sent = {  # request id -> status
                    f"via-nginx-{trusted}": get_from("127.0.0.5", nginx.port, CALLBACK_PATH, spoof | {
                        "X-Request-Id": f"via-nginx-{trusted}"}, tls=cert, method="POST"),
                    f"direct-{trusted}": get_from("127.0.0.5", service.port, CALLBACK_PATH, spoof | {
                        "X-Request-Id": f"direct-{trusted}"}, method="POST"),
                }
                assert set(sent.values()) == {403}, sent
                assert wait_until(lambda s=service, ids=set(sent): ids <= set(logged_clients(s)), timeout=10)
            finally:
                service.stop()
            seen |= {rid: client for rid, client in logged_clients(service).items() if rid in sent}
    finally:
        nginx.stop()
    drill_report.update({"clients logged, by FORWARDED_ALLOW_IPS": seen})
    # nginx trusted: through it, the address nginx saw (not the one the client forged); straight to
    # gunicorn, the peer itself. nginx not trusted: through it, nginx's own address.
    assert seen == {"via-nginx-127.0.0.1": "127.0.0.5", "direct-127.0.0.1": "127.0.0.5",
                    "via-nginx-127.0.0.2": "127.0.0.1", "direct-127.0.0.2": "127.0.0.5"}, seen


@pytest.mark.slow
def test_only_the_callbacks_are_public(certificate, drill_db, drill_engine, drill_sandbox, start_service,
                                       drill_report):
    cert, _ = certificate
    nginx = NginxProxy(tls=certificate)
    env = service_env(drill_db, drill_sandbox.url, f"https://{PUBLIC_HOST}")
    try:
        service = start_service(env)
        nginx.start(service.port)
        uuids = create_sessions(nginx.url, 1)  # from 127.0.0.1, an internal address the site lists
        callbacks, _ = plan_calls(drill_sandbox, uuids, 1)
        outside = "127.0.0.5"  # not listed: the internet, as far as the site knows
        statuses = {path: get_from(outside, nginx.port, path, API_HEADERS, tls=cert)
                    for path in ("/v1/sessions", f"/v1/sessions/{uuids[0]}", "/metrics", "/readyz", "/openapi.json")}
        drill_report.update({"from outside": statuses})
        assert set(statuses.values()) == {403}, statuses
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", nginx.port, source_address=(outside, 0), context=context,
                                           timeout=10)
        try:
            conn.request("GET", "/v1/sessions", headers=API_HEADERS)
            answer = conn.getresponse()
            assert json.loads(answer.read())["error"] == "forbidden"
        finally:
            conn.close()
        callback = callbacks[0]
        path = callback["url"].removeprefix(f"https://{PUBLIC_HOST}")
        conn = http.client.HTTPSConnection("127.0.0.1", nginx.port, source_address=(outside, 0), context=context,
                                           timeout=10)
        try:
            conn.request(callback["method"], path, body=callback["body"].encode() or None,
                         headers=callback["headers"])
            answer = conn.getresponse()
            assert (answer.status, json.loads(answer.read())) == (200, {"status": "recorded"})
        finally:
            conn.close()
    finally:
        nginx.stop()
