"""Validation of Masking Session API parameters, with Plivo's error wording (reference §3–§5, §7).

The rules, ranges, enums and defaults are the service's own (`webhook_service.domain.plivo_parameters`,
one table for both): what the service lets through, the sandbox accepts, and what it refuses, the
sandbox refuses in Plivo's words. Plivo does not publish its ranges (reference §14.1); that module says
which it picked and why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from webhook_service.domain import plivo_parameters as plivo

PHONE_RE = re.compile(r"\+?(\d{8,15})")
CREATE_PARAMS = frozenset(plivo.PARAMETERS)
UPDATABLE = frozenset(plivo.UPDATABLE)
PHONES = plivo.PARTIES

TIME_FORMATS = ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f")
TIME_FILTERS = ("created_time", "expiry_time")
OPERATORS = ("", "__gt", "__gte", "__lt", "__lte")
LIST_PARAMS = frozenset(
    {"first_party", "second_party", "virtual_number", "status", "limit", "offset", "subaccount"}
    | {f"{name}{op}" for name in (*TIME_FILTERS, "duration") for op in OPERATORS}
)
DEFAULT_LIST_WINDOW = timedelta(days=7)  # "with no bounds the window is 7 days" (reference §5)


class ApiError(Exception):
    """An error answered as JSON `{"api_id", "error"}` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def invalid(message: str) -> ApiError:
    """A 400 with Plivo's "Invalid parameter." prefix."""
    return ApiError(400, f"Invalid parameter. {message}")


def phone(name: str, value: Any) -> str:
    """Digits of a phone number given with or without a leading '+' (8 to 15 digits)."""
    match = PHONE_RE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise invalid(f"{name} is not a valid phone number")
    return match.group(1)


def check_value(name: str, value: Any) -> Any:
    """Validate one create/update parameter and return it normalised."""
    if name in PHONES:
        return phone(name, value)
    try:
        return plivo.check(name, value)
    except plivo.Invalid as exc:
        raise invalid(exc.plivo) from None


def _refusal(problem: plivo.Invalid) -> ApiError:
    if problem.missing:
        return ApiError(400, f"Mandatory parameter missing. {problem.plivo} must be present")
    return invalid(problem.plivo)


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid request body. Expected a JSON object")
    # JSON null is read as "not given", like Plivo's SDKs, which never send None.
    return {k: v for k, v in body.items() if v is not None}


def validate_create(body: Any) -> dict[str, Any]:
    """Validated create parameters (only those given); raises ApiError(400) with Plivo's wording."""
    params = _json_object(body)
    for name in params:
        if name not in CREATE_PARAMS:
            raise invalid(f"{name} is not a valid parameter")
    values = {name: check_value(name, value) for name, value in params.items()}
    for _, problem in plivo.party_problems(values) + plivo.pin_problems(values):
        raise _refusal(problem)  # Plivo reports the first
    return values


def validate_update(body: Any, session_uuid: str, single_party: bool) -> dict[str, Any]:
    """Validated update parameters (§4): only the updatable ones; parties only in single-party mode."""
    params = _json_object(body)
    # The Python SDK repeats the session UUID in the body (reference §1): tolerate it.
    if params.pop("session_uuid", session_uuid) != session_uuid:
        raise invalid("session_uuid does not match the session in the URL")
    for name in params:
        if name not in UPDATABLE:
            raise invalid(f"{name} cannot be updated" if name in CREATE_PARAMS else f"{name} is not a valid parameter")
        if name in PHONES and not single_party:
            raise invalid(f"{name} can be updated only for sessions created with create_session_with_single_party")
    return {name: check_value(name, value) for name, value in params.items()}


def parse_time(name: str, raw: str) -> tuple[datetime, int]:
    """A filter time `YYYY-MM-DD HH:MM[:ss[.uuuuuu]]` (UTC) and its precision (index in TIME_FORMATS)."""
    for precision, fmt in enumerate(TIME_FORMATS):
        try:
            return datetime.strptime(raw, fmt).replace(tzinfo=UTC), precision
        except ValueError:
            continue
    raise invalid(f"{name} should be in the format YYYY-MM-DD HH:MM[:ss[.uuuuuu]]")


def _int_arg(name: str, raw: str, low: int, high: int | None) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(f"{name} should be an integer {bound}")
    return value


def list_filters(args: Mapping[str, str], now: datetime) -> tuple[list[tuple[str, str, Any]], int, int]:
    """Parse list query filters into (field, operator, value) triples, limit and offset."""
    for name in args:
        if name not in LIST_PARAMS:
            raise invalid(f"{name} is not a valid filter")
    filters: list[tuple[str, str, Any]] = []
    for name in ("first_party", "second_party", "virtual_number"):
        if name in args:
            phone(name, args[name])  # 400 for what is not a number at all
            # An exact match on what Plivo stores: digits without '+' (reference §5, §6.2). Whether Plivo
            # also finds "+14155550100" is not documented; the sandbox plays the strict reading (it finds
            # nothing), the one a client must survive.
            filters.append((name, "", args[name]))
    status = args.get("status", "all")
    if status not in ("active", "expired", "all"):
        raise invalid("status allowed values are active, expired or all")
    if status != "all":
        filters.append(("status", "", status))
    # Whether a list without `subaccount` shows the subaccounts' sessions too is not documented
    # (reference §5). The sandbox plays the strict reading, the one a client must survive: without
    # the filter, only the main account's own sessions.
    filters.append(("subaccount", "", args.get("subaccount")))
    for field in (*TIME_FILTERS, "duration"):
        for op in OPERATORS:
            name = field + op
            if name in args:
                value = _int_arg(name, args[name], 0, None) if field == "duration" else parse_time(name, args[name])
                filters.append((field, op, value))
    if not any(f == "created_time" for f, _, _ in filters):
        filters.append(("created_time", "__gte", (now - DEFAULT_LIST_WINDOW, 2)))
    limit = _int_arg("limit", args.get("limit", "20"), 1, 20)
    offset = _int_arg("offset", args.get("offset", "0"), 0, None)
    return filters, limit, offset
