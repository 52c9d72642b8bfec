"""Validation of Masking Session API parameters, with Plivo's error wording (reference §3–§5, §7).

Plivo does not publish the numeric ranges it enforces (reference §14.1); the sandbox picks these and
reports them with Plivo's "is outside the allowed range" wording:

* session_expiry 60..86400 s, call_time_limit 60..14400 s, ring_timeout 15..120 s;
* generate_pin_length 4..15, pin_retry 0..5, pin_retry_wait 5..10, virtual_number_cooloff_period 0..3600.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

PHONE_RE = re.compile(r"\+?(\d{8,15})")
PIN_RE = re.compile(r"\d{4,15}")
MAX_URL_LENGTH = 1000  # "should be under 1000 characters" (reference §7)

INT_RANGES: dict[str, tuple[int, int]] = {
    "session_expiry": (60, 86400),
    "call_time_limit": (60, 14400),
    "ring_timeout": (15, 120),
    "generate_pin_length": (4, 15),
    "pin_retry": (0, 5),
    "pin_retry_wait": (5, 10),
    "virtual_number_cooloff_period": (0, 3600),
}
BOOLS = frozenset(
    {
        "initiate_call_to_first_party",
        "record",
        "geomatch",
        "is_pin_authentication_required",
        "generate_pin",
        "force_pin_authentication",
        "create_session_with_single_party",
    }
)
URLS = frozenset(
    {
        "callback_url",
        "recording_callback_url",
        "first_party_play_url",
        "second_party_play_url",
        "pin_prompt_play",
        "incorrect_pin_play",
        "unknown_caller_play",
    }
)
METHODS = frozenset({"callback_method", "recording_callback_method"})
PHONES = ("first_party", "second_party")
PINS = ("first_party_pin", "second_party_pin")
CREATE_PARAMS = (
    BOOLS | URLS | METHODS | set(INT_RANGES) | set(PHONES) | set(PINS) | {"record_file_format", "subaccount"}
)
UPDATABLE = frozenset(
    {
        "session_expiry",
        "call_time_limit",
        "ring_timeout",
        "callback_url",
        "callback_method",
        "record",
        "record_file_format",
        "recording_callback_url",
        "recording_callback_method",
        "first_party_play_url",
        "second_party_play_url",
        "first_party",
        "second_party",
    }
)
PIN_ONLY = ("generate_pin", "first_party_pin", "second_party_pin", "force_pin_authentication")

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
    if name in BOOLS:
        if not isinstance(value, bool):  # JSON true/false only: "true" and 1 are rejected
            raise invalid(f"{name} allowed values are true or false")
        return value
    if name in INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"{name} should be an integer")
        low, high = INT_RANGES[name]
        if not low <= value <= high:
            raise invalid(f"{name} is outside the allowed range")
        return value
    if name in URLS:
        if value == "":  # an empty URL means "none", as the session object shows it
            return ""
        try:
            parts = urlsplit(value) if isinstance(value, str) else None
        except ValueError:  # e.g. an unbalanced "[" in an IPv6 host
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid(f"{name} should be a valid URL")
        if len(value) >= MAX_URL_LENGTH:
            raise invalid(f"{name} should be under {MAX_URL_LENGTH} characters")
        return value
    if name in METHODS:
        if not isinstance(value, str) or value.upper() not in ("GET", "POST"):
            raise invalid(f"{name} allowed values are GET or POST")
        return value.upper()
    if name == "record_file_format":
        if value not in ("mp3", "wav"):
            raise invalid("record_file_format allowed values are mp3 or wav")
        return value
    if name in PINS:
        # The FAQ's cURL sends PINs as JSON numbers, so accept those too (reference §3).
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not PIN_RE.fullmatch(text):
            raise invalid(f"{name} should be 4 to 15 digits")
        return text
    if name == "subaccount":
        if not isinstance(value, str) or not value:
            raise invalid("subaccount should be a subaccount auth ID")
        return value
    raise invalid(f"{name} is not a valid parameter")


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
    single = values.get("create_session_with_single_party", False)
    if single:
        if not values.get("first_party") and not values.get("second_party"):
            raise ApiError(400, "Mandatory parameter missing. first_party or second_party must be present")
    else:
        for name in PHONES:
            if name not in values:
                raise ApiError(400, f"Mandatory parameter missing. {name} must be present")
    if values.get("first_party") and values.get("first_party") == values.get("second_party"):
        raise invalid("first_party and second_party must be different")
    pin_auth = values.get("is_pin_authentication_required", False)
    if not pin_auth:
        for name in (*PIN_ONLY, "pin_prompt_play"):
            if name in values:
                raise invalid(f"{name} is allowed only when is_pin_authentication_required is true")
    else:
        if "pin_prompt_play" not in values:
            raise ApiError(400, "Mandatory parameter missing. pin_prompt_play must be present")
        if not values.get("generate_pin"):
            for name in PINS:
                if name not in values:
                    raise ApiError(400, f"Mandatory parameter missing. {name} must be present")
            if values["first_party_pin"] == values["second_party_pin"]:
                raise invalid("first_party_pin and second_party_pin must be different")
    if "generate_pin_length" in values and not values.get("generate_pin"):
        raise invalid("generate_pin_length is allowed only when generate_pin is true")
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
    if "subaccount" in args:
        filters.append(("subaccount", "", args["subaccount"]))
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
