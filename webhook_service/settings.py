"""Every setting, read once from the environment, typed, and validated at start.

A missing or malformed variable stops the start with a message that names it. With no Plivo
credentials the service runs in *sandbox mode*: it talks to the local fake Plivo
(`plivo_sandbox`) with well-known development credentials.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SANDBOX_AUTH_ID = "MASANDBOX00000000000"
SANDBOX_AUTH_TOKEN = "sandbox-auth-token"  # noqa: S105 - a public development credential, never used in production
SANDBOX_API_BASE_URL = "http://127.0.0.1:8001"
DEV_PUBLIC_BASE_URL = "http://127.0.0.1:8000"
DEV_API_TOKEN = "dev-token"  # noqa: S105 - sandbox mode only
LOG_LEVELS = ("INFO", "DEBUG", "WARNING", "ERROR", "CRITICAL")  # the first is the default


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """The service's configuration. Build it with `Settings.from_env()`."""

    database_url: str | None  # DATABASE_URL: None starts the embedded development Postgres
    plivo_auth_id: str  # PLIVO_AUTH_ID
    plivo_auth_tokens: tuple[str, ...] = field(repr=False)  # PLIVO_AUTH_TOKEN: one, or "new,old" while rotating
    # PLIVO_SUBACCOUNT_TOKENS: auth tokens of subaccounts whose sessions call back (comma-separated); they
    # verify X-Plivo-Signature-V3 only. Optional: Ma-V3, keyed with the main token, verifies those callbacks too.
    plivo_subaccount_tokens: tuple[str, ...] = field(default=(), repr=False)
    plivo_api_base_url: str = "https://api.plivo.com"  # PLIVO_API_BASE_URL
    public_base_url: str = DEV_PUBLIC_BASE_URL  # PUBLIC_BASE_URL: the origin Plivo calls back (https in production)
    # PUBLIC_BASE_URL_ALLOW_HTTP: lets production settings take an http PUBLIC_BASE_URL, for a local test rig
    # (callbacks to a service on the same machine); never set where Plivo calls over the internet.
    public_base_url_allow_http: bool = False
    api_tokens: tuple[str, ...] = field(default=(), repr=False)  # API_TOKENS: bearer tokens for /v1/*
    sandbox: bool = False  # derived: no PLIVO_AUTH_ID given
    plivo_connect_timeout: float = 3.05  # PLIVO_CONNECT_TIMEOUT (s)
    plivo_read_timeout: float = 10.0  # PLIVO_READ_TIMEOUT (s)
    plivo_max_retries: int = 3  # PLIVO_MAX_RETRIES: retries of reads/expires on 5xx, 429, connection errors
    # PLIVO_MAX_CONCURRENCY: API requests per worker process that may wait on Plivo at once; the
    # worker's other threads stay free for callbacks however slow Plivo gets.
    plivo_max_concurrency: int = 2
    db_statement_timeout_ms: int = 5000  # DB_STATEMENT_TIMEOUT_MS: no request waits longer on Postgres
    # MIGRATION_LOCK_TIMEOUT_MS: how long a migration of `release` waits for a lock before it gives up
    # (and `release` tries again): callbacks needing the table queue behind it that long at most.
    migration_lock_timeout_ms: int = 2000
    db_connect_timeout: int = 3  # DB_CONNECT_TIMEOUT (s): "database down" is answered quickly
    db_pool_size: int = 5  # DB_POOL_SIZE: per worker process
    # DB_TRANSACTION_POOLER: DATABASE_URL goes through a pooler in transaction mode (PgBouncer's
    # pool_mode = transaction): no server-side prepared statements, no session settings in the
    # startup packet, and the projector's leader lock only through DATABASE_DIRECT_URL.
    db_transaction_pooler: bool = False
    # DATABASE_DIRECT_URL: straight to PostgreSQL, past the pooler: the projector's leader lock (a
    # session advisory lock) and `release`'s migrations use it. Unset: they use DATABASE_URL (and
    # through a transaction pooler the projectors then run without a leader, polling).
    database_direct_url: str | None = field(default=None, repr=False)
    webhook_max_body_bytes: int = 64 * 1024  # WEBHOOK_MAX_BODY_BYTES
    # CALLBACK_METHOD: the method Plivo is told to call back with (callback_method and
    # recording_callback_method of every session created); callbacks by any other are refused.
    callback_method: str = "POST"
    # PROJECT_IN_WEB: web processes project the sessions of the callbacks they store, in a
    # background thread (on by default, so a deployment that runs only `web` stays current).
    project_in_web: bool = True
    log_level: str = "INFO"  # LOG_LEVEL: DEBUG, INFO, WARNING, ERROR or CRITICAL
    # Whether LOG_LEVEL was given: one-shot commands log only warnings unless it was (their results are printed).
    log_level_given: bool = False
    # DEFAULT_PHONE_REGION: the region (ISO 3166 code, e.g. US) of phone numbers given without a country
    # code, such as `(415) 555-0100`; unset, such numbers are refused as needing one.
    default_phone_region: str | None = None
    # NGINX_STATUS_URL: the stub_status of the nginx in front (deploy/nginx/), e.g.
    # http://127.0.0.1:8081/nginx_status; its connection counts are then in /metrics.
    nginx_status_url: str | None = None
    # NGINX_REFUSED_LOG: the log of requests nginx refused for slowness or size (deploy/nginx/), counted
    # in /metrics by status; for an nginx on the same machine.
    nginx_refused_log: str | None = None
    # FORWARDED_ALLOW_IPS: the proxies believed about the client (X-Forwarded-For, in the request log)
    # and the scheme (X-Forwarded-Proto, by gunicorn, which reads the same variable): `*`, or addresses
    # and networks separated by commas; default 127.0.0.1 (gunicorn's).
    forwarded_allow_ips: str = "127.0.0.1"
    # DRAIN_FILE: while this file exists, /readyz answers 503 "draining" so that the load balancer
    # takes the node out before it is stopped (docs/deploy.md, rolling restarts). Unset: never.
    drain_file: str | None = None

    @property
    def plivo_auth_token(self) -> str:
        """The current Plivo token (the first one), used for API calls."""
        return self.plivo_auth_tokens[0]

    @property
    def session_callback_url(self) -> str:
        return self.public_base_url + "/webhooks/plivo/session"

    @property
    def recording_callback_url(self) -> str:
        return self.public_base_url + "/webhooks/plivo/recording"

    @classmethod
    def for_command(cls) -> Settings:
        """The environment's settings for a command (`release`, `make run`, `flask …`): a bad one is
        the one line naming it on stderr and exit code 2, not a traceback."""
        try:
            return cls.from_env()
        except SettingsError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise SettingsError naming the first bad one."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        auth_id = get("PLIVO_AUTH_ID")
        sandbox = auth_id is None
        token_raw = get("PLIVO_AUTH_TOKEN")
        if sandbox:
            auth_id = SANDBOX_AUTH_ID
            token_raw = token_raw or SANDBOX_AUTH_TOKEN
        elif token_raw is None:
            raise SettingsError("PLIVO_AUTH_TOKEN is required when PLIVO_AUTH_ID is set")
        tokens = _csv(token_raw)
        if not tokens or len(tokens) > 2:
            raise SettingsError("PLIVO_AUTH_TOKEN must hold one token, or two separated by a comma while rotating")

        database_url = get("DATABASE_URL")
        public = get("PUBLIC_BASE_URL")
        allow_http = _flag(env, "PUBLIC_BASE_URL_ALLOW_HTTP", False)
        api_tokens = _csv(get("API_TOKENS") or "")
        if not sandbox:
            # Production never falls back to the embedded development database (it would start one
            # under the working directory and keep every session there).
            if database_url is None:
                raise SettingsError("DATABASE_URL is required when PLIVO_AUTH_ID is set (the embedded PostgreSQL"
                                    " is for development only)")
            if public is None:
                raise SettingsError("PUBLIC_BASE_URL is required when PLIVO_AUTH_ID is set")
            if not api_tokens:
                raise SettingsError("API_TOKENS is required when PLIVO_AUTH_ID is set")
        public = _origin("PUBLIC_BASE_URL", public or DEV_PUBLIC_BASE_URL)
        if not sandbox and urlsplit(public).scheme != "https" and not allow_http:
            # Plivo's callbacks carry the parties' numbers and recording links: never in the clear.
            raise SettingsError(f"PUBLIC_BASE_URL must be an https URL when PLIVO_AUTH_ID is set, got {public!r}"
                                " (PUBLIC_BASE_URL_ALLOW_HTTP=true allows http, for a local test rig only)")
        if not api_tokens:
            api_tokens = (DEV_API_TOKEN,)
        if any(len(t) < 8 for t in api_tokens):
            raise SettingsError("API_TOKENS: every token must be at least 8 characters long")

        base = get("PLIVO_API_BASE_URL") or (SANDBOX_API_BASE_URL if sandbox else "https://api.plivo.com")
        base = _origin("PLIVO_API_BASE_URL", base)

        return cls(
            database_url=database_url,
            plivo_auth_id=auth_id,
            plivo_auth_tokens=tokens,
            plivo_subaccount_tokens=_csv(get("PLIVO_SUBACCOUNT_TOKENS") or ""),
            plivo_api_base_url=base,
            public_base_url=public,
            public_base_url_allow_http=allow_http,
            api_tokens=api_tokens,
            sandbox=sandbox,
            plivo_connect_timeout=_number(env, "PLIVO_CONNECT_TIMEOUT", 3.05, float),
            plivo_read_timeout=_number(env, "PLIVO_READ_TIMEOUT", 10.0, float),
            plivo_max_retries=_number(env, "PLIVO_MAX_RETRIES", 3, int),
            plivo_max_concurrency=_number(env, "PLIVO_MAX_CONCURRENCY", 2, int),
            db_statement_timeout_ms=_number(env, "DB_STATEMENT_TIMEOUT_MS", 5000, int),
            migration_lock_timeout_ms=_number(env, "MIGRATION_LOCK_TIMEOUT_MS", 2000, int),
            db_connect_timeout=_number(env, "DB_CONNECT_TIMEOUT", 3, int),
            db_pool_size=_number(env, "DB_POOL_SIZE", 5, int),
            db_transaction_pooler=_flag(env, "DB_TRANSACTION_POOLER", False),
            database_direct_url=get("DATABASE_DIRECT_URL"),
            webhook_max_body_bytes=_number(env, "WEBHOOK_MAX_BODY_BYTES", 64 * 1024, int),
            callback_method=_choice(env, "CALLBACK_METHOD", ("POST", "GET")),
            project_in_web=_flag(env, "PROJECT_IN_WEB", True),
            log_level=_choice(env, "LOG_LEVEL", LOG_LEVELS),
            log_level_given=get("LOG_LEVEL") is not None,
            default_phone_region=_region(env, "DEFAULT_PHONE_REGION"),
            nginx_status_url=_http_url("NGINX_STATUS_URL", get("NGINX_STATUS_URL")),
            nginx_refused_log=get("NGINX_REFUSED_LOG"),
            drain_file=get("DRAIN_FILE"),
            forwarded_allow_ips=_proxies("FORWARDED_ALLOW_IPS", get("FORWARDED_ALLOW_IPS") or "127.0.0.1"),
        )


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _origin(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError(f"{name} must be an http(s) URL such as https://masking.example.com, got {value!r}")
    if parts.query or parts.fragment:
        raise SettingsError(f"{name} must not carry a query string or fragment")
    return value.rstrip("/")


def _proxies(name: str, value: str) -> str:
    try:
        for entry in _csv(value):
            if entry != "*":
                ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise SettingsError(f"{name} must be * or addresses and networks separated by commas, got {value!r}") from None
    return value


def _http_url(name: str, value: str | None) -> str | None:
    if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc):
        raise SettingsError(f"{name} must be an http(s) URL such as http://127.0.0.1:8081/nginx_status, got {value!r}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().upper() or choices[0]
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {env.get(name)!r}")
    return raw


def _region(env: Mapping[str, str], name: str) -> str | None:
    import phonenumbers

    raw = env.get(name, "").strip().upper()
    if raw and raw not in phonenumbers.SUPPORTED_REGIONS:
        raise SettingsError(f"{name} must be a region code such as US, GB or IN, got {env.get(name)!r}")
    return raw or None


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {env.get(name)!r}")


def _number(env: Mapping[str, str], name: str, default, kind):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {raw!r}")
    return value
