"""Alembic environment: URL from the settings module, timeouts so a migration never blocks traffic."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from webhook_service.persistence.db import sqlalchemy_url
from webhook_service.persistence.models import Base
from webhook_service.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from webhook_service.migrate import database_url_from_env

    return database_url_from_env()


def _include_name(name, type_, parent_names) -> bool:
    """The inbox's partitions (callback_inbox_p2026_11, _legacy, _default) are made by migration 0011
    and the worker, month by month, not declared in the models: not for autogenerate to compare."""
    return not (type_ == "table" and name and name.startswith("callback_inbox_"))


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_name=_include_name,
        compare_type=True,
        compare_server_default=True,
        transaction_per_migration=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=sqlalchemy_url(_url()), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(_url()), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Online migrations must not queue behind (or in front of) live callbacks for long: a
        # callback that needs the table waits behind a migration waiting for its lock. Give up after
        # MIGRATION_LOCK_TIMEOUT_MS (default 2 s, within a callback's DB_STATEMENT_TIMEOUT_MS); `release`
        # (webhook_service.migrate) then tries again.
        lock_timeout = f"{Settings.from_env().migration_lock_timeout_ms}ms"
        connection.execute(text("SELECT set_config('lock_timeout', :value, false)"), {"value": lock_timeout})
        connection.execute(text("SET statement_timeout = '15min'"))
        connection.commit()
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
