"""Database access: the engine, sessions with explicit transactions, and "database down" detection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..settings import Settings


def sqlalchemy_url(url: str) -> str:
    """Use psycopg 3 whatever driver the URL names (Heroku-style `postgres://` included)."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def connect_arguments(settings: Settings) -> dict[str, object]:
    """psycopg's connection arguments: a short connect timeout, and the session's settings.

    Straight to PostgreSQL, the session's settings go in the startup packet (`options`). Through a
    transaction pooler (DB_TRANSACTION_POOLER: PgBouncer's pool_mode = transaction), a connection is
    a different server session at every transaction, so nothing may rely on session state:
    * no `options`: PgBouncer refuses the startup parameter (and would not keep it); the timeouts
      and TimeZone are then the role's (`ALTER ROLE … SET`, docs/deploy.md);
    * no server-side prepared statements (psycopg prepares a query it ran 5 times): the statement
      would be prepared on one server session and executed on another.
    """
    arguments: dict[str, object] = {"connect_timeout": settings.db_connect_timeout,
                                    "application_name": "webhook_service"}
    if settings.db_transaction_pooler:
        arguments["prepare_threshold"] = None
    else:
        # TimeZone=UTC: psycopg then returns times with datetime.timezone.utc, not a ZoneInfo
        # (the server's default may be 'Etc/UTC'), whose every comparison costs a lookup.
        arguments["options"] = (f"-c statement_timeout={settings.db_statement_timeout_ms}"
                                f" -c lock_timeout={settings.db_statement_timeout_ms} -c TimeZone=UTC")
    return arguments


def build_engine(url: str, settings: Settings, **overrides) -> Engine:
    """An engine whose connections fail fast: short connect timeout, per-statement timeout."""
    options = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_pool_size,
        "pool_timeout": settings.db_connect_timeout,
        # A restarted Postgres leaves dead connections in the pool; test each one on checkout.
        "pool_pre_ping": True,
        "connect_args": connect_arguments(settings),
    }
    options.update(overrides)
    return create_engine(sqlalchemy_url(url), **options)


class Database:
    """The engine plus a session factory; services open transactions with `db.transaction()`.

    `fast` is a second pool of autocommit connections for the webhook path, which drives psycopg
    directly (pipelines, explicit BEGIN/COMMIT) to need one round trip per step; see `pg()`.
    """

    def __init__(self, engine: Engine, fast: Engine, *, connect_timeout: int = 3, direct_url: str | None = None,
                 pooled: bool = False):
        self.engine = engine
        self.fast = fast
        self.connect_timeout = connect_timeout
        self.direct_url = direct_url  # straight to PostgreSQL, when `engine` goes through a pooler
        self.pooled = pooled  # through a transaction pooler: no session state survives a transaction
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def connect(cls, url: str, settings: Settings) -> Database:
        """Both pools on `url`, with the settings' timeouts and pool size. The webhook path's pool
        has no pre-ping round trip: a dead connection is detected by its first statement, and
        `pg()` then replaces the whole pool."""
        return cls(build_engine(url, settings), build_engine(url, settings, pool_pre_ping=False),
                   connect_timeout=settings.db_connect_timeout, direct_url=settings.database_direct_url,
                   pooled=settings.db_transaction_pooler)

    @property
    def holds_session_locks(self) -> bool:
        """Can a dedicated connection keep a session-level advisory lock? Not through a transaction
        pooler, unless DATABASE_DIRECT_URL gives a way around it."""
        return not self.pooled or self.direct_url is not None

    @contextmanager
    def pg(self) -> Iterator[psycopg.Connection]:
        """A pooled psycopg connection in autocommit mode (the caller writes BEGIN/COMMIT).

        A connection found broken is thrown away with its whole pool: after a database restart
        every pooled connection is dead, and the next request should not meet another one.
        """
        raw = self.fast.raw_connection()
        pg: psycopg.Connection = raw.driver_connection  # type: ignore[assignment]
        if not pg.autocommit:  # a raw connection does not get the engine's isolation level
            pg.autocommit = True
        try:
            yield pg
        except BaseException:
            if pg.closed or pg.broken:
                raw.invalidate()
                self.fast.pool.dispose()
            elif pg.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                pg.rollback()
            raise
        finally:
            raw.close()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def dedicated_connection(self) -> psycopg.Connection:
        """A connection of its own, outside the pools, in autocommit (for a session-level lock);
        straight to PostgreSQL when DATABASE_DIRECT_URL is set."""
        url = (make_url(sqlalchemy_url(self.direct_url)) if self.direct_url else self.fast.url)
        return psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False),
                               autocommit=True, connect_timeout=self.connect_timeout,
                               application_name="webhook_service")

    def dispose(self) -> None:
        self.engine.dispose()
        self.fast.dispose()


def is_database_unavailable(exc: BaseException) -> bool:
    """True when the error means Postgres cannot be reached (not a bug in a query)."""
    if isinstance(exc, OperationalError | InterfaceError | psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    # The pool's own timeout (all connections busy or connecting) is also "unavailable".
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return isinstance(exc, PoolTimeout)
