"""Helpers shared by the tests (constants, settings, a live server)."""

from __future__ import annotations

import socket
import threading

from werkzeug.serving import make_server

from webhook_service.settings import SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN, Settings

API_TOKEN = "test-api-token-1"
FIRST = "+14155550100"
SECOND = "+14155550123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(sandbox_url: str, public_base_url: str = "http://127.0.0.1:9", **overrides) -> Settings:
    env = {
        "PLIVO_AUTH_ID": SANDBOX_AUTH_ID,
        "PLIVO_AUTH_TOKEN": SANDBOX_AUTH_TOKEN,
        "PLIVO_API_BASE_URL": sandbox_url,
        "PUBLIC_BASE_URL": public_base_url,
        "API_TOKENS": f"{API_TOKEN},second-token-2",
        "PLIVO_READ_TIMEOUT": "2",
        "PLIVO_CONNECT_TIMEOUT": "1",
        "LOG_LEVEL": "WARNING",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return Settings.from_env(env)


class LiveServer:
    """The real app served over HTTP from a thread, so the sandbox can call it back."""

    def __init__(self, app, port: int):
        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.app.extensions["webhook_service"].db.dispose()


def unavailable_database_url() -> str:
    """A URL where nothing listens: what the service sees while Postgres is down."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
