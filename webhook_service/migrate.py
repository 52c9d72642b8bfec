"""Schema migrations: Alembic, configured from the settings module (`python -m webhook_service.migrate`)."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

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
    if settings.database_url:
        return settings.database_url
    from .devdb import embedded_database_url

    return embedded_database_url()


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url or database_url_from_env()), revision)


def main() -> int:
    """`python -m webhook_service.migrate` (the Procfile's `release`): a bad setting is one line, exit code 2."""
    from .logs import configure_logging
    from .settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)  # Alembic's lines too, as JSON
    upgrade()
    return 0


if __name__ == "__main__":
    sys.exit(main())
