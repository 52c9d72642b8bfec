"""Schema migrations: Alembic, configured from the settings module (`python -m webhook_service.migrate`)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from alembic import command
from alembic.config import Config

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def database_url_from_env() -> str:
    from .settings import Settings

    settings = Settings.from_env()
    # Migrations set session state (lock_timeout) and take locks across statements: never through
    # a transaction pooler.
    if settings.database_direct_url or settings.database_url:
        return settings.database_direct_url or settings.database_url
    from .devdb import embedded_database_url

    return embedded_database_url()


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url or database_url_from_env()), revision)


def release(config: Config | None = None, *, attempts: int = 6, pause: float = 2.0) -> int:
    """The Procfile's `release`: upgrade to head, trying again when a migration gave up on a lock.

    Every migration waits at most `lock_timeout` (migrations/env.py, MIGRATION_LOCK_TIMEOUT_MS) for
    its lock, so callbacks never queue behind it for longer; a migration that gave up is rolled
    back whole (one transaction per migration) and tried again after `pause` seconds, when the long
    transaction in its way (a report, a replay) may be over. Returns the attempts it took.
    """
    from sqlalchemy.exc import OperationalError

    config = config or alembic_config(database_url_from_env())
    for attempt in range(1, attempts + 1):
        try:
            command.upgrade(config, "head")
            return attempt
        except OperationalError as exc:
            if not _gave_up_on_a_lock(exc) or attempt == attempts:
                raise
            log.warning("release: a migration gave up waiting for a lock (attempt %d of %d); trying again in %s s",
                        attempt, attempts, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _gave_up_on_a_lock(exc: Exception) -> bool:
    import psycopg

    return isinstance(getattr(exc, "orig", None), psycopg.errors.LockNotAvailable)


def main() -> int:
    """`python -m webhook_service.migrate` (the Procfile's `release`): a bad setting is one line, exit code 2."""
    from .logs import configure_logging
    from .settings import Settings

    settings = Settings.for_command()
    configure_logging(settings.log_level)  # Alembic's lines too, as JSON
    attempts_taken = release()
    log.info("release: schema at head after %d attempt(s)", attempts_taken)
    return 0


if __name__ == "__main__":
    sys.exit(main())
