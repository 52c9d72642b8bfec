"""Plivo's values as this service reads them: times, phone numbers, counts and money.

Pure functions, no I/O: the callbacks' parser and the Plivo client both read Plivo's strings
through them, so a value means the same wherever it came from.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

# A session UUID as Plivo writes it: hex in lower case (its API and callbacks never use upper case).
_SESSION_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)")


def parse_time(value: Any) -> datetime | None:
    """Read any of Plivo's timestamp styles as an aware UTC datetime; None for empty values.

    Seen: "2023-07-12 15:52:14.772699 +0000 UTC", "2024-01-25 12:00:00 +0000 +0000",
    "2024-01-25 12:00:00" (callbacks, UTC) and ISO 8601. Every Plivo timestamp is UTC.
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    match = _TIME_RE.match(str(value).strip())
    if not match:
        return None
    day, clock = match.groups()
    if clock.count(":") == 1:
        clock += ":00"
    try:
        return datetime.fromisoformat(f"{day}T{clock}").replace(tzinfo=UTC)
    except ValueError:
        return None


def session_uuid_as_stored(value: str) -> str:
    """A session UUID given in any case (`5A1C…`, copied from a ticket) as Plivo writes and we store it:
    lower case. Anything that is not a UUID is left as given (it matches nothing, or an id of our tests)."""
    return value.lower() if _SESSION_UUID_RE.fullmatch(value) else value


def normalise_number(value: Any) -> str | None:
    """Plivo writes numbers with and without `+` (`+14155550100`, `14155550100`): make E.164."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    digits = text[1:] if text.startswith("+") else text
    return "+" + digits if digits.isdigit() else text


def to_decimal(value: Any) -> Decimal | None:
    """An amount charged (or a number to read as a count): a finite decimal from 0 to under 10**9,
    or None for anything else ("NaN", "Infinity", "-0.5", "", garbage). No charge is negative."""
    if value is None or value == "":
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() and 0 <= number < Decimal("1e9") else None


def to_int(value: Any) -> int | None:
    """A count or a number of seconds: a whole number from 0 to 2**31 - 1, or None.

    A fraction ("60.5") is not a count: it is dropped like any other value out of range, never
    truncated ("60", "60.0" and "6E1" are the same whole number).
    """
    number = to_decimal(value)
    if number is None or not 0 <= number <= 2**31 - 1:
        return None
    if number != number.to_integral_value():
        return None
    return int(number)


def text_or_none(value: str | None) -> str | None:
    """A text value as sent; an empty one (Plivo sends every listed field, empty when unknown) is None."""
    return value if value else None
