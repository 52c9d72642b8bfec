"""`make run`: the service on http://127.0.0.1:8000 with everything a newcomer needs.

Starts the embedded Postgres when DATABASE_URL is unset, applies migrations, starts the sandbox
Plivo on 127.0.0.1:8001 when no Plivo credentials are set, then runs gunicorn in the foreground.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from .logs import configure_logging
from .migrate import upgrade
from .settings import Settings

log = logging.getLogger("webhook_service.devserver")


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def main() -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    env = dict(os.environ)
    if not settings.database_url:
        from .devdb import embedded_database_url

        env["DATABASE_URL"] = embedded_database_url()
        log.info("DATABASE_URL is unset: using the embedded PostgreSQL under .pgdata/")
    upgrade(env.get("DATABASE_URL"))
    log.info("migrations applied")

    sandbox = None
    if settings.sandbox:
        target = urlsplit(settings.plivo_api_base_url)
        host, port = target.hostname or "127.0.0.1", target.port or 80
        if not _listening(host, port):
            sandbox = subprocess.Popen(
                [sys.executable, "-m", "webhook_service.sandbox", "--host", host, "--port", str(port)], env=env
            )
            for _ in range(50):
                if _listening(host, port):
                    break
                time.sleep(0.1)
        log.warning("SANDBOX MODE: no PLIVO_AUTH_ID set; the fake Plivo runs at %s", settings.plivo_api_base_url)

    env.setdefault("GUNICORN_BIND", "127.0.0.1:8000")
    env.setdefault("WEB_CONCURRENCY", "2")
    command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "webhook_service:create_app()"]
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0
    finally:
        if sandbox is not None:
            sandbox.terminate()
            sandbox.wait(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
