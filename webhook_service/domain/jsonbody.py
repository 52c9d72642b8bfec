"""Untrusted JSON made safe to store: bounded nesting, finite numbers, text Postgres accepts.

Postgres refuses NUL characters in text and jsonb, jsonb refuses NaN and infinities, and UTF-8
has no lone surrogates; Python's json module lets all of these through (and recurses without
bound). Every JSON body this service reads goes through `loads`, so such input is a 400, never
a 500 on the way to the database.
"""

from __future__ import annotations

import json
import math
from typing import Any


class JsonError(ValueError):
    """The body is not JSON this service can accept; the message says why."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError("numbers must be finite")
    return value


def _constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


def text_problem(value: str) -> str | None:
    """Why Postgres could not store this text, or None."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate"
    return None


def problem(value: Any, max_depth: int) -> str | None:
    """The first reason `value` cannot be stored, or None (walked iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                return f"is nested more than {max_depth} levels deep"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
        elif isinstance(item, str):
            found = text_problem(item)
            if found:
                return found
    return None


def loads(data: bytes | str, *, max_depth: int) -> Any:
    """Parse a JSON body, refusing what could not be stored or what nests past `max_depth`."""
    try:
        value = json.loads(data, parse_float=_finite, parse_constant=_constant)
    except RecursionError:
        raise JsonError(f"is nested more than {max_depth} levels deep") from None
    except JsonError:
        raise
    except ValueError as exc:  # includes UnicodeDecodeError
        raise JsonError("is not valid JSON") from exc
    found = problem(value, max_depth)
    if found:
        raise JsonError(found)
    return value
