"""A thin client for Plivo's five Masking Session calls, with safe retries and typed errors.

Why not Plivo's SDK: it hard-codes api.plivo.com, keeps per-request retry state on a shared
client, and retries POST create on 5xx, which can create a duplicate paid session (see the
reference §12). Here: one pooled `requests.Session` per process, explicit connect/read timeouts,
reads and expires retried with backoff on 5xx, 429 (honouring Retry-After) and dropped
connections within a total time budget, and creates never retried.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import requests

from .. import metrics
from ..domain.values import normalise_number, parse_time, to_decimal, to_int

log = logging.getLogger(__name__)


class PlivoError(Exception):
    """Base class: Plivo could not do what was asked, or its answer is unknown."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None, api_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        self.api_id = api_id  # Plivo's `api_id` of the call, when its answer carried one (for Plivo's support)


class PlivoRejected(PlivoError):
    """Plivo answered 4xx: the request was refused and nothing happened."""


class PlivoNotFound(PlivoRejected):
    """Plivo answered 404."""


class PlivoAuthError(PlivoRejected):
    """Plivo answered 401: our credentials are wrong (an operator problem, not the caller's)."""


class PlivoForbidden(PlivoRejected):
    """Plivo answered 403: it refused this request. Plivo's SDKs read a 403 on create as a geo-permission
    refusal (the account may not call that country), not as bad credentials (reference §7)."""


class PlivoRateLimited(PlivoError):
    """Plivo kept answering 429 after our retries."""


class PlivoServerError(PlivoError):
    """Plivo answered 5xx (after retries, where retrying is safe)."""


class PlivoUnavailable(PlivoError):
    """Plivo could not be reached; the request was certainly not processed."""


class PlivoTimeout(PlivoError):
    """Plivo did not answer in time. `sent` is True when the request may have been processed."""

    def __init__(self, message: str, *, sent: bool):
        super().__init__(message)
        self.sent = sent


class PlivoBadResponse(PlivoError):
    """Plivo answered 2xx with a body we cannot read: it did something, we cannot tell what."""


def plivo_time(value: datetime) -> str:
    """Format a datetime for Plivo's list filters (`YYYY-MM-DD HH:MM:SS`, UTC)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class PlivoSession:
    """A session object as Plivo returns it, with numbers, times and money parsed."""

    session_uuid: str
    status: str | None
    first_party: str | None
    second_party: str | None
    virtual_number: str | None
    created_time: datetime | None
    modified_time: datetime | None
    expiry_time: datetime | None
    last_interaction_time: datetime | None
    amount: Decimal | None
    total_call_count: int | None
    total_call_billed_duration: int | None
    total_call_amount: Decimal | None
    interactions: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    api_id: str | None = None  # the `api_id` of the call that returned it

    @property
    def subaccount(self) -> str | None:
        """The subaccount's auth ID, when the session object shows one (newer fixtures sometimes do)."""
        value = self.raw.get("subaccount")
        return value[:64] if isinstance(value, str) and value else None

    def expired_by(self, read_at: datetime) -> datetime | None:
        """When the session expired, as this answer (read at `read_at`) reports it: by its expiry time,
        or by the time it was read at the latest; None if it does not say the session expired."""
        if self.status != "expired":
            return None
        return min(self.expiry_time or read_at, read_at)

    @property
    def pins(self) -> tuple[str | None, str | None]:
        """The parties' PINs as the session object shows them (Plivo's generated ones with generate_pin)."""
        return _pin(self.raw.get("first_party_pin")), _pin(self.raw.get("second_party_pin"))

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, virtual_number: Any = None, api_id: Any = None) -> PlivoSession:
        if not isinstance(obj, Mapping) or not obj.get("session_uuid"):
            raise PlivoBadResponse("Plivo's session object has no session_uuid", body=obj, api_id=_api_id(api_id))
        return cls(
            session_uuid=str(obj["session_uuid"]),
            status=obj.get("status") or None,
            first_party=normalise_number(obj.get("first_party")),
            second_party=normalise_number(obj.get("second_party")),
            virtual_number=normalise_number(obj.get("virtual_number") or virtual_number),
            created_time=parse_time(obj.get("created_time")),
            modified_time=parse_time(obj.get("modified_time")),
            expiry_time=parse_time(obj.get("expiry_time")),
            last_interaction_time=parse_time(obj.get("last_interaction_time")),
            amount=to_decimal(obj.get("amount")),
            total_call_count=to_int(obj.get("total_call_count")),
            total_call_billed_duration=to_int(obj.get("total_call_billed_duration")),
            total_call_amount=to_decimal(obj.get("total_call_amount")),
            interactions=[i for i in (obj.get("interaction") or []) if isinstance(i, Mapping)],
            raw=dict(obj),
            api_id=_api_id(api_id),
        )


def _api_id(value: Any) -> str | None:
    return value[:100] if isinstance(value, str) and value else None


def _pin(value: Any) -> str | None:
    # Plivo's FAQ shows PINs as JSON numbers (reference §3): keep them as digit strings either way.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class PlivoPage:
    sessions: list[PlivoSession]
    total_count: int | None
    next: str | None


class PlivoClient:
    """Plivo's Masking Session API over one pooled HTTP session (one client per process)."""

    def __init__(
        self,
        base_url: str,
        auth_id: str,
        auth_token: str,
        *,
        connect_timeout: float = 3.05,
        read_timeout: float = 10.0,
        max_retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.base = f"{base_url.rstrip('/')}/v1/Account/{auth_id}/Masking/Session"
        self.timeout = (connect_timeout, read_timeout)
        # Every call, retries included, ends within this many seconds: well inside gunicorn's
        # 30 s worker timeout with the default timeouts (2 × (3.05 + 10) ≈ 26 s).
        self.budget = 2 * (connect_timeout + read_timeout)
        self.max_retries = max_retries
        self._sleep = sleep
        self.http = requests.Session()
        self.http.auth = (auth_id, auth_token)
        self.http.headers.update({"Accept": "application/json", "User-Agent": "webhook-service/0.1"})
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)

    # The five calls ------------------------------------------------------------------------

    def create_session(self, params: Mapping[str, Any]) -> PlivoSession:
        """POST …/Masking/Session. Never retried: a retry after a lost answer could double-book."""
        body = self._call("create", "POST", self.base + "/", json=dict(params), retry=False)
        return PlivoSession.from_json(body.get("session") or body, virtual_number=body.get("virtual_number"),
                                      api_id=body.get("api_id"))

    def get_session(self, session_uuid: str) -> PlivoSession:
        body = self._call("get", "GET", f"{self.base}/{session_uuid}/", retry=True)
        return PlivoSession.from_json(body.get("response") or {}, api_id=body.get("api_id"))

    def update_session(self, session_uuid: str, params: Mapping[str, Any]) -> PlivoSession:
        body = self._call("update", "POST", f"{self.base}/{session_uuid}/", json=dict(params), retry=False)
        return PlivoSession.from_json(body.get("session") or {}, api_id=body.get("api_id"))

    def expire_session(self, session_uuid: str) -> None:
        """DELETE …/Session/{uuid}: Plivo marks it expired (nothing is deleted). Safe to retry."""
        self._call("expire", "DELETE", f"{self.base}/{session_uuid}/", retry=True)

    def list_sessions(self, filters: Mapping[str, Any]) -> PlivoPage:
        body = self._call("list", "GET", self.base + "/", params=dict(filters), retry=True)
        response = body.get("response") or {}
        meta = response.get("meta") or {}
        objects = response.get("objects") or []
        return PlivoPage(
            sessions=[PlivoSession.from_json(o) for o in objects],
            total_count=to_int(meta.get("total_count")),
            next=meta.get("next") or None,
        )

    # Transport -----------------------------------------------------------------------------

    def _call(self, op: str, method: str, url: str, *, retry: bool, **kwargs: Any) -> dict[str, Any]:
        """One Plivo call with its retries, all within `budget` seconds (2 × connect + read timeout).

        Retried (reads and expires only): 5xx, 429 (after Retry-After) and connections refused,
        reset or not accepted in time. Not retried: read timeouts, since a Plivo too slow once will not answer the same
        request faster within the caller's patience; the next request or reconciliation run will.
        """
        attempts = 1 + (self.max_retries if retry else 0)
        deadline = time.monotonic() + self.budget
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            remaining = deadline - time.monotonic()
            timeout = (min(self.timeout[0], remaining), min(self.timeout[1], remaining))
            retryable = False
            try:
                response = self.http.request(method, url, timeout=timeout, **kwargs)
            except requests.ConnectTimeout as exc:
                error: PlivoError = PlivoUnavailable(f"Plivo did not accept a connection in time ({op})")
                cause: Exception | None = exc
                retryable = True
            except requests.ReadTimeout as exc:
                error, cause = PlivoTimeout(f"Plivo did not answer in time ({op})", sent=True), exc
            except requests.ConnectionError as exc:
                # Refused or reset. A reset may come after Plivo read the request, so for a
                # non-retried call (create) the outcome is unknown, like a read timeout.
                refused = "refused" in str(exc).lower() or "NewConnectionError" in repr(exc)
                if refused:
                    error = PlivoUnavailable(f"Plivo could not be reached ({op})")
                else:
                    error = PlivoTimeout(f"Plivo dropped the connection ({op})", sent=True)
                cause, retryable = exc, True
            else:
                metrics.PLIVO_LATENCY.labels(op).observe(time.perf_counter() - started)
                if response.status_code < 400:
                    metrics.PLIVO_CALLS.labels(op, "ok").inc()
                    return self._json(response, op)
                error, cause = self._http_error(response, op), None
                retryable = response.status_code == 429 or response.status_code >= 500
                wait = self._backoff(attempt, response.headers.get("Retry-After"))
                if retry and retryable and attempt < attempts and self._fits(deadline, wait):
                    metrics.PLIVO_CALLS.labels(op, f"retry_{response.status_code}").inc()
                    self._sleep(wait)
                    continue
                metrics.PLIVO_CALLS.labels(op, f"http_{response.status_code}").inc()
                raise error
            metrics.PLIVO_LATENCY.labels(op).observe(time.perf_counter() - started)
            wait = self._backoff(attempt, None)
            if retry and retryable and attempt < attempts and self._fits(deadline, wait):
                metrics.PLIVO_CALLS.labels(op, "retry_network").inc()
                self._sleep(wait)
                continue
            metrics.PLIVO_CALLS.labels(op, type(error).__name__).inc()
            raise error from cause
        raise AssertionError("unreachable")  # pragma: no cover

    def _fits(self, deadline: float, wait: float) -> bool:
        """Is there time for a wait and one more full attempt before the deadline?"""
        return time.monotonic() + wait + sum(self.timeout) <= deadline

    @staticmethod
    def _json(response: requests.Response, op: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise PlivoBadResponse(f"Plivo's answer to {op} is not JSON", status=response.status_code) from exc
        if not isinstance(body, dict):
            raise PlivoBadResponse(f"Plivo's answer to {op} is not a JSON object", status=response.status_code)
        return body

    @staticmethod
    def _http_error(response: requests.Response, op: str) -> PlivoError:
        try:
            body = response.json()
        except ValueError:
            body = None
        message = None
        if isinstance(body, dict):
            message = body.get("error") or body.get("message")
            if isinstance(message, dict):  # some Plivo errors nest {"error": {"field": "reason"}}
                message = "; ".join(f"{k}: {v}" for k, v in message.items())
        status = response.status_code
        message = str(message or f"Plivo answered HTTP {status} to {op}")
        kind: type[PlivoError] = PlivoRejected
        if status == 404:
            kind = PlivoNotFound
        elif status == 401:
            kind = PlivoAuthError
        elif status == 403:
            kind = PlivoForbidden
        elif status == 429:
            kind = PlivoRateLimited
        elif status >= 500:
            kind = PlivoServerError
        return kind(message, status=status, body=body, api_id=_api_id(body.get("api_id") if isinstance(body, dict)
                                                                         else None))

    @staticmethod
    def _backoff(attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), 10.0)
            except ValueError:
                pass
        # Exponential with full jitter: 0–0.25 s, 0–0.5 s, 0–1 s, … capped at 4 s.
        return random.uniform(0, min(4.0, 0.25 * 2 ** (attempt - 1)))
