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

import phonenumbers

from ..errors import ApiError
from . import jsonbody
from . import plivo_parameters as plivo
from .vocabulary import SESSION_STATUSES

Check = Callable[[str, Any], Any]


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


def phone(name: str, value: Any, region: str | None = None) -> str:
    """Parse a phone number and return it in E.164.

    With `+`, or without it but starting with the country code (`14155550100`), it is read in any
    country's plan. A national number (`4155550100`, `(415) 555-0100`) is read in `region`
    (DEFAULT_PHONE_REGION) when one is set; without one it is refused as needing a country code.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a phone number in E.164 form, e.g. +14155550100")
    raw = value.strip()
    # (text, region) readings, most likely first: the region's national form before the digits read as
    # if a '+' had been left off (with region US, `4155550100` is +1 415…, not a Swiss +41 number).
    readings = [(raw, None)] if raw.startswith("+") else [(raw, region)] * bool(region) + [("+" + raw, None)]
    for text, reading_region in readings:
        try:
            parsed = phonenumbers.parse(text, reading_region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if not raw.startswith("+") and region is None:
        raise ValueError("is not a valid phone number: give it with its country code, e.g. +14155550100")
    raise ValueError("is not a valid phone number")


def _metadata(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    found = jsonbody.problem(value, max_depth=8)
    if found:
        raise ValueError(found)
    if len(json.dumps(value)) > 16 * 1024:
        raise ValueError("must be at most 16 KiB when serialised")
    return value


SERVICE_SET_FIELDS = ("callback_url", "callback_method", "recording_callback_url", "recording_callback_method")
# Plivo's optional create parameters a caller may give (reference §3), each checked by its rule in the
# table shared with the sandbox (`domain.plivo_parameters`); the parties are read by `phone`.
PLIVO_CREATE_FIELDS: dict[str, plivo.Parameter] = {
    name: parameter for name, parameter in plivo.PARAMETERS.items()
    if name not in SERVICE_SET_FIELDS and name not in plivo.PARTIES
}
OWN_CREATE_FIELDS: dict[str, Check] = {"external_ref": _text(255), "metadata": _metadata}
# What Plivo lets an existing session change (reference §4); parties only in single-party mode.
UPDATE_FIELDS: dict[str, plivo.Parameter] = {
    name: plivo.PARAMETERS[name] for name in plivo.UPDATABLE if name not in SERVICE_SET_FIELDS
}


def _plivo_value(name: str, value: Any, region: str | None = None) -> Any:
    """A Plivo parameter's value as the service sends it; ValueError in the service's words.
    A party's number without its country code is read in `region` (DEFAULT_PHONE_REGION)."""
    if name in plivo.PARTIES:
        return phone(name, value, region)
    try:
        return plivo.check(name, value)
    except plivo.Invalid as exc:
        raise ValueError(exc.says) from None


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


def validate_create(body: Any, *, region: str | None = None) -> CreateRequest:
    """The create request, checked; phone numbers without a country code are read in `region`."""
    body = _json_object(body)
    errors: dict[str, str] = {}
    params: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for name, value in body.items():
        if name in SERVICE_SET_FIELDS:
            errors[name] = "is set by this service and cannot be given"
        elif name in plivo.PARTIES or name in PLIVO_CREATE_FIELDS or name in OWN_CREATE_FIELDS:
            if value is None:  # null is "not given"
                continue
            try:
                if name in OWN_CREATE_FIELDS:
                    own[name] = OWN_CREATE_FIELDS[name](name, value)
                else:
                    params[name] = _plivo_value(name, value, region)
            except ValueError as exc:
                errors[name] = str(exc)
        else:
            errors[name] = "is not a known field"
    # The rules joining several fields (parties, PIN authentication), on the values that passed their
    # own checks. A field already named keeps its first error; a rule about a field that was given but
    # invalid (a party, the switch a PIN field needs) would only add noise.
    for name, problem in plivo.party_problems(params) + plivo.pin_problems(params):
        noise = (problem.missing and name in plivo.PARTIES and errors.keys() & set(plivo.PARTIES)) or (
            plivo.PARAMETERS[name].needs in errors)
        if name not in errors and not noise:
            errors[name] = problem.says
    if errors:
        raise _fail(errors)
    return CreateRequest(plivo_params=params, external_ref=own.get("external_ref"),
                         metadata=own.get("metadata", {}))


def validate_update(body: Any, *, single_party: bool, region: str | None = None) -> dict[str, Any]:
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
                params[name] = _plivo_value(name, value, region)
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
    expires_after: datetime | None = None
    expires_before: datetime | None = None
    duration_min: int | None = None
    duration_max: int | None = None
    subaccount: str | None = None
    limit: int = 20
    cursor: tuple[datetime, int] | None = None


# Plivo's list filters by expiry time, duration and subaccount too (reference §5); so does this one.
LIST_PARAMS = ("status", "external_ref", "first_party", "second_party", "virtual_number",
               "created_after", "created_before", "expires_after", "expires_before", "duration_min",
               "duration_max", "subaccount", "limit", "cursor")
MAX_DURATION = 2**31 - 1


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


def validate_list(args: Mapping[str, str], *, region: str | None = None) -> ListQuery:
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
                values[name] = phone(name, raw, region)
            elif name in ("created_after", "created_before", "expires_after", "expires_before"):
                values[name] = _timestamp(name, raw)
            elif name in ("duration_min", "duration_max"):
                if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and int(raw) <= MAX_DURATION):
                    raise ValueError(f"must be a whole number of seconds from 0 to {MAX_DURATION}")
                values[name] = int(raw)
            elif name == "subaccount":
                values[name] = _plivo_value(name, raw)  # the create parameter's own rule
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
