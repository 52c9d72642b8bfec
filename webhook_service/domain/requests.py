"""Validation of the sessions API's input: every error names its field, nothing is guessed."""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import phonenumbers

from ..errors import ApiError
from . import jsonbody
from .vocabulary import SESSION_STATUSES

Check = Callable[[str, Any], Any]


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _int(lo: int, hi: int) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return check


def _choice(*allowed: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            raise ValueError("must be one of " + ", ".join(allowed))
        return value

    return check


def _text(max_len: int) -> Check:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a non-empty string")
        if len(value) > max_len:
            raise ValueError(f"must be at most {max_len} characters")
        found = jsonbody.text_problem(value)
        if found:
            raise ValueError(found)
        return value.strip()

    return check


def _url(name: str, value: Any) -> str:
    # Plivo fetches these (play prompts); it takes http(s) URLs under 1000 characters.
    if not isinstance(value, str):
        raise ValueError("must be a URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http or https URL")
    if len(value) >= 1000:
        raise ValueError("must be under 1000 characters")
    return value


def _pin(name: str, value: Any) -> str:
    # Plivo's FAQ sends PINs as JSON numbers; accept both but keep them as digit strings, so a
    # leading zero is not lost.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    # ASCII digits only: str.isdigit() is also true of "²" and of other scripts' digits.
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()) or not 4 <= len(value) <= 15:
        raise ValueError("must be 4 to 15 digits")
    return value


def phone(name: str, value: Any) -> str:
    """Parse a phone number (with or without `+`) and return it in E.164."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a phone number in E.164 form, e.g. +14155550100")
    raw = value.strip()
    candidate = raw if raw.startswith("+") else "+" + raw
    try:
        parsed = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException:
        raise ValueError("is not a valid phone number") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError("is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _metadata(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    found = jsonbody.problem(value, max_depth=8)
    if found:
        raise ValueError(found)
    if len(json.dumps(value)) > 16 * 1024:
        raise ValueError("must be at most 16 KiB when serialised")
    return value


# Plivo's optional create parameters (reference §3), each with its check.
PLIVO_CREATE_FIELDS: dict[str, Check] = {
    "session_expiry": _int(1, 31 * 86400),
    "call_time_limit": _int(1, 86400),
    "ring_timeout": _int(1, 3600),
    "initiate_call_to_first_party": _bool,
    "record": _bool,
    "record_file_format": _choice("mp3", "wav"),
    "first_party_play_url": _url,
    "second_party_play_url": _url,
    "geomatch": _bool,
    "subaccount": _text(64),
    "is_pin_authentication_required": _bool,
    "generate_pin": _bool,
    "generate_pin_length": _int(4, 15),
    "first_party_pin": _pin,
    "second_party_pin": _pin,
    "pin_prompt_play": _url,
    "pin_retry": _int(0, 5),
    "pin_retry_wait": _int(5, 10),
    "incorrect_pin_play": _url,
    "unknown_caller_play": _url,
    "force_pin_authentication": _bool,
    "virtual_number_cooloff_period": _int(0, 3600),
    "create_session_with_single_party": _bool,
}
OWN_CREATE_FIELDS: dict[str, Check] = {"external_ref": _text(255), "metadata": _metadata}
SERVICE_SET_FIELDS = ("callback_url", "callback_method", "recording_callback_url", "recording_callback_method")
# What Plivo lets an existing session change (reference §4); parties only in single-party mode.
UPDATE_FIELDS: dict[str, Check] = {
    name: PLIVO_CREATE_FIELDS[name]
    for name in ("session_expiry", "call_time_limit", "ring_timeout", "record", "record_file_format",
                 "first_party_play_url", "second_party_play_url")
} | {"first_party": phone, "second_party": phone}


@dataclass(frozen=True)
class CreateRequest:
    plivo_params: dict[str, Any]  # what Plivo gets, before the service adds its callback URLs
    external_ref: str | None
    metadata: dict[str, Any]

    @property
    def canonical(self) -> dict[str, Any]:
        """The request as validated, for idempotency comparisons (key order and number form ignored)."""
        return {"plivo": self.plivo_params, "external_ref": self.external_ref, "metadata": self.metadata}


def _json_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ApiError("The request body must be a JSON object")
    return body


# An error answer lists at most this many fields, each name cut at MAX_NAME_SHOWN characters: a body
# of 90 000 unknown fields (or one field named with 900 KB) gets a short answer, not megabytes.
# `details.fields_not_listed` counts the fields left out.
MAX_FIELDS_LISTED = 20
MAX_NAME_SHOWN = 100


def _shown(name: str) -> str:
    return name if len(name) <= MAX_NAME_SHOWN else name[:MAX_NAME_SHOWN] + "…"


def _fail(errors: dict[str, str]) -> ApiError:
    first = next(iter(errors.items()))
    if len(errors) == 1:
        summary = f"{_shown(first[0])} {first[1]}"
    elif len(errors) <= MAX_FIELDS_LISTED:
        summary = f"{len(errors)} fields are invalid"
    else:
        summary = f"{len(errors)} fields are invalid; the first {MAX_FIELDS_LISTED} are listed"
    listed = dict(itertools.islice(((_shown(name), problem) for name, problem in errors.items()), MAX_FIELDS_LISTED))
    details: dict[str, Any] = {"fields": listed}
    if len(errors) > MAX_FIELDS_LISTED:
        details["fields_not_listed"] = len(errors) - MAX_FIELDS_LISTED
    return ApiError(summary, details=details)


def validate_create(body: Any) -> CreateRequest:
    body = _json_object(body)
    errors: dict[str, str] = {}
    params: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for name, value in body.items():
        if name in SERVICE_SET_FIELDS:
            errors[name] = "is set by this service and cannot be given"
        elif name in ("first_party", "second_party"):
            if value is None:
                continue
            try:
                params[name] = phone(name, value)
            except ValueError as exc:
                errors[name] = str(exc)
        elif name in PLIVO_CREATE_FIELDS or name in OWN_CREATE_FIELDS:
            if value is None:
                continue
            check = PLIVO_CREATE_FIELDS.get(name) or OWN_CREATE_FIELDS[name]
            try:
                (params if name in PLIVO_CREATE_FIELDS else own)[name] = check(name, value)
            except ValueError as exc:
                errors[name] = str(exc)
        else:
            errors[name] = "is not a known field"
    single = params.get("create_session_with_single_party") is True
    if single:
        if "first_party" not in params and "second_party" not in params and not (
            errors.keys() & {"first_party", "second_party"}
        ):
            errors["first_party"] = "or second_party is required"
    else:
        for name in ("first_party", "second_party"):
            if name not in params and name not in errors:
                errors[name] = "is required"
    if ("first_party" in params and params.get("first_party") == params.get("second_party")
            and "second_party" not in errors):
        errors["second_party"] = "must differ from first_party"
    pins = params.get("first_party_pin"), params.get("second_party_pin")
    if pins[0] and pins[0] == pins[1]:
        errors["second_party_pin"] = "must differ from first_party_pin"
    if errors:
        raise _fail(errors)
    return CreateRequest(plivo_params=params, external_ref=own.get("external_ref"),
                         metadata=own.get("metadata", {}))


def validate_update(body: Any, *, single_party: bool) -> dict[str, Any]:
    body = _json_object(body)
    errors: dict[str, str] = {}
    params: dict[str, Any] = {}
    for name, value in body.items():
        if name in SERVICE_SET_FIELDS:
            errors[name] = "is set by this service and cannot be changed"
        elif name not in UPDATE_FIELDS:
            known = name in PLIVO_CREATE_FIELDS or name in OWN_CREATE_FIELDS
            errors[name] = "cannot be changed on an existing session" if known else "is not a known field"
        elif name in ("first_party", "second_party") and not single_party:
            errors[name] = "can be changed only on a session created with create_session_with_single_party"
        else:
            try:
                params[name] = UPDATE_FIELDS[name](name, value)
            except ValueError as exc:
                errors[name] = str(exc)
    if errors:
        raise _fail(errors)
    if not params:
        raise ApiError("Give at least one field to change", details={"allowed": sorted(UPDATE_FIELDS)})
    return params


@dataclass(frozen=True)
class ListQuery:
    status: str | None = None
    external_ref: str | None = None
    first_party: str | None = None
    second_party: str | None = None
    virtual_number: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int = 20
    cursor: tuple[datetime, int] | None = None


LIST_PARAMS = ("status", "external_ref", "first_party", "second_party", "virtual_number",
               "created_after", "created_before", "limit", "cursor")


def _timestamp(name: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("must be an ISO 8601 time, e.g. 2026-11-01T00:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def encode_cursor(created_at: datetime, row_id: int) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_ROW_ID = 2**63 - 1  # Postgres bigint: a larger id in a query is an error there, not "no rows"


def _cursor(name: str, value: str) -> tuple[datetime, int]:
    """`encode_cursor`'s output read back: a time with its UTC offset and a row id from 1 to 2^63 − 1.
    Anything else (a forged or damaged cursor) is refused here, before it reaches Postgres."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        stamp, row_id = raw.rsplit("|", 1)
        created_at = datetime.fromisoformat(stamp)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("is not a cursor this API returned") from None
    if created_at.tzinfo is None or created_at.utcoffset() is None:
        raise ValueError("is not a cursor this API returned: its time has no UTC offset")
    # ASCII digits only (int() also reads " 7", "+7", "7_0" and other scripts' digits), at most 19 of them.
    if not (row_id.isascii() and row_id.isdigit() and len(row_id) <= 19 and 1 <= int(row_id) <= MAX_ROW_ID):
        raise ValueError(f"is not a cursor this API returned: its id must be a whole number from 1 to {MAX_ROW_ID}")
    return created_at, int(row_id)


def validate_list(args: Mapping[str, str]) -> ListQuery:
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name in args:
        if name not in LIST_PARAMS:
            errors[name] = "is not a known filter"
    for name in LIST_PARAMS:
        raw = args.get(name)
        if raw is None or raw == "":
            continue
        try:
            if name == "status":
                values[name] = _choice(*SESSION_STATUSES)(name, raw)
            elif name in ("first_party", "second_party", "virtual_number"):
                values[name] = phone(name, raw)
            elif name in ("created_after", "created_before"):
                values[name] = _timestamp(name, raw)
            elif name == "limit":
                # ASCII digits only: int() also reads "²", "١٠" or " 5", and would say so in Python's words.
                if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and 1 <= int(raw) <= 100):
                    raise ValueError("must be a whole number from 1 to 100")
                values[name] = int(raw)
            elif name == "cursor":
                values[name] = _cursor(name, raw)
            else:
                values[name] = _text(255)(name, raw)
        except ValueError as exc:
            errors[name] = str(exc)
    if errors:
        raise _fail(errors)
    return ListQuery(**values)
