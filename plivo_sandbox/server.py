"""Serve the sandbox over real HTTP from a background thread (for tests and `make run`)."""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from urllib.parse import urlsplit

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from plivo_sandbox.app import create_sandbox_app
from plivo_sandbox.state import DEFAULT_POOL_SIZE, SandboxState
from webhook_service.settings import SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN

log = logging.getLogger(__name__)


class QuietRequestHandler(WSGIRequestHandler):
    """Werkzeug's handler, but the access log omits query strings (list filters hold phone numbers)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.log("info", '"%s %s" %s', self.command, urlsplit(self.path).path, code)


class SandboxServer:
    """The sandbox on 127.0.0.1 (port 0 picks a free port), served by a daemon thread.

    Use as a context manager, or call `start()` and `stop()`. `url` is its base URL and `state` its
    `SandboxState`, for inspecting sessions or setting faults in-process.
    """

    def __init__(
        self,
        auth_id: str = SANDBOX_AUTH_ID,
        auth_token: str = SANDBOX_AUTH_TOKEN,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pool: list[str] | None = None,
        subaccounts: dict[str, str] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        expiry_poll: float | None = 1.0,
    ) -> None:
        self.app = create_sandbox_app(auth_id, auth_token, pool=pool, subaccounts=subaccounts, pool_size=pool_size)
        self.state: SandboxState = self.app.extensions["sandbox"]
        self._host, self._port = host, port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        # Every `expiry_poll` seconds, sessions that ran out on the wall clock get their SessionTimeout
        # (None: only when the clock is advanced).
        self._expiry_poll = expiry_poll
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:54321` (only once started)."""
        if self._server is None:
            raise RuntimeError("the sandbox server is not running")
        return f"http://{self._host}:{self._server.server_port}"

    def start(self) -> SandboxServer:
        """Bind and serve in a background thread; return self."""
        if self._server is None:
            self._server = make_server(
                self._host, self._port, self.app, threaded=True, request_handler=QuietRequestHandler
            )
            # A short poll interval makes stop() quick (the default waits up to 0.5 s).
            self._thread = threading.Thread(
                target=self._server.serve_forever, args=(0.05,), name="plivo-sandbox", daemon=True
            )
            self._thread.start()
            if self._expiry_poll:
                self._stopping.clear()
                self._sweeper = threading.Thread(target=self._sweep, name="plivo-sandbox-expiry", daemon=True)
                self._sweeper.start()
        return self

    def _sweep(self) -> None:
        while not self._stopping.wait(self._expiry_poll):
            try:
                self.state.expire_due()
            except Exception:  # noqa: BLE001 - a development server keeps sweeping; the next sweep retries
                log.exception("sandbox: sending SessionTimeout failed")

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._stopping.set()
        if self._sweeper is not None:
            self._sweeper.join()
            self._sweeper = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
