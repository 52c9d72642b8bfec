"""Run the Plivo sandbox: `python -m plivo_sandbox --host 127.0.0.1 --port 8001`.

Credentials default to PLIVO_AUTH_ID / PLIVO_AUTH_TOKEN, else the well-known sandbox ones from
`webhook_service.settings`. With a token list ("new,old") the first token signs callbacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading

from plivo_sandbox.server import SandboxServer
from plivo_sandbox.state import DEFAULT_POOL_SIZE
from webhook_service.logs import configure_logging
from webhook_service.settings import SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN

log = logging.getLogger("plivo_sandbox")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m plivo_sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--auth-id", default=os.environ.get("PLIVO_AUTH_ID") or SANDBOX_AUTH_ID)
    parser.add_argument("--auth-token", default=os.environ.get("PLIVO_AUTH_TOKEN") or SANDBOX_AUTH_TOKEN)
    parser.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE,
                        help="virtual numbers in each country of the default pool (default %(default)s)")
    parser.add_argument("--pool", default="",
                        help="the virtual numbers instead, comma-separated (grouped by their country code)")
    args = parser.parse_args(argv)
    # JSON lines like the service's; werkzeug's line per request (the sandbox's access log) included.
    configure_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
    logging.getLogger("werkzeug").setLevel(logging.INFO)

    pool = [n.strip() for n in args.pool.split(",") if n.strip()] or None
    server = SandboxServer(args.auth_id, args.auth_token.split(",")[0].strip(), host=args.host, port=args.port,
                           pool=pool, pool_size=args.pool_size)
    server.start()
    log.info(
        "Plivo sandbox (fake Masking Session API, not Plivo) listening on %s/v1/Account/%s.../Masking/Session",
        server.url,
        args.auth_id[:4],
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
