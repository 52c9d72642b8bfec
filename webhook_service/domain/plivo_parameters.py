"""Plivo's Masking Session parameters: one table of kinds, ranges, enums and defaults (reference §3–§4).

The service's input validation (`domain.requests`) and the sandbox (`sandbox.validation`) both check
with this table and these rules, so they accept and refuse the same values. Each speaks its own
words: a broken rule carries the service's phrase (said after the field's name, in
`details.fields`) and Plivo's (the sandbox answers as Plivo would, after "Invalid parameter. " or as
"Mandatory parameter missing. … must be present").

Where Plivo leaves a fact open, the table records this project's choice:

* Ranges of `session_expiry`, `call_time_limit` and `ring_timeout` are not published (reference
  §14.1; Plivo answers "… is outside the allowed range" without saying which). Refusing what Plivo
  accepts would take a feature from the callers, while passing on what Plivo refuses costs one
  round trip and gives the caller Plivo's own words (a 400 `invalid_request`). So the bounds are
  wide, only tight enough to catch milliseconds given for seconds: `call_time_limit` up to 86 400
  (Plivo's Call API cuts any call at 24 hours, so a higher limit cannot take effect),
  `ring_timeout` up to 3 600, `session_expiry` up to 31 days.
* `session_expiry: 0` is accepted: Plivo's Go SDK sends it whenever its caller leaves the field
  unset (`SessionExpiry int json:"session_expiry"`, no omitempty), so Plivo takes it. What Plivo
  makes of it is not documented; the reading that lets the Go SDK's sessions work is "Plivo's
  default" (3 600 s), which the sandbox plays. The service never assumes it: a session's expiry is
  the `expiry_time` of Plivo's answer.
* `call_time_limit`'s default is 3 600 in the docs' table but 14 400 in every response shown
  (reference §3, CONFLICT); the table says 14 400, what Plivo's answers show. The service never
  sends a default itself, so only the sandbox's session object depends on it.
* Phone numbers are not checked here: the service reads any common format and sends E.164 (its own
  rule, in `domain.requests.phone`), while Plivo's check is not published (the sandbox asks for 8
  to 15 digits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .jsonbody import text_problem

PIN_AUTH = "is_pin_authentication_required"
MAX_URL_LENGTH = 1000  # "should be under 1000 characters" (reference §3, §7)


@dataclass(frozen=True)
class Parameter:
    """One create or update parameter: its kind, Plivo's default and what it accepts."""

    kind: str  # "phone", "int", "bool", "choice", "method" (GET/POST, any case), "url", "pin", "text"
    default: Any = None  # Plivo's default (None: none)
    low: int | None = None  # an "int"'s bounds, both included
    high: int | None = None
    choices: tuple[str, ...] = ()  # a "choice"'s or "method"'s values
    max_length: int | None = None  # a "text"'s
    updatable: bool = False  # Plivo lets an existing session change it (§4; parties in single-party mode only)
    needs: str | None = None  # it may be given (true, for a boolean) only when this boolean parameter is true


PARAMETERS: dict[str, Parameter] = {
    "first_party": Parameter("phone", updatable=True),
    "second_party": Parameter("phone", updatable=True),
    "session_expiry": Parameter("int", 3600, 0, 31 * 86400, updatable=True),
    "call_time_limit": Parameter("int", 14400, 1, 86400, updatable=True),
    "ring_timeout": Parameter("int", 120, 1, 3600, updatable=True),
    "initiate_call_to_first_party": Parameter("bool", False),
    "callback_url": Parameter("url", "", updatable=True),
    "callback_method": Parameter("method", "POST", choices=("GET", "POST"), updatable=True),
    "record": Parameter("bool", False, updatable=True),
    "record_file_format": Parameter("choice", "mp3", choices=("mp3", "wav"), updatable=True),
    "recording_callback_url": Parameter("url", "", updatable=True),
    "recording_callback_method": Parameter("method", "POST", choices=("GET", "POST"), updatable=True),
    "first_party_play_url": Parameter("url", "", updatable=True),
    "second_party_play_url": Parameter("url", "", updatable=True),
    "geomatch": Parameter("bool", True),
    "subaccount": Parameter("text", max_length=64),
    PIN_AUTH: Parameter("bool", False),
    "generate_pin": Parameter("bool", False, needs=PIN_AUTH),
    "generate_pin_length": Parameter("int", 4, 4, 15, needs="generate_pin"),
    "first_party_pin": Parameter("pin", needs=PIN_AUTH),
    "second_party_pin": Parameter("pin", needs=PIN_AUTH),
    "pin_prompt_play": Parameter("url", needs=PIN_AUTH),
    "pin_retry": Parameter("int", 1, 0, 5),
    "pin_retry_wait": Parameter("int", 5, 5, 10),
    "incorrect_pin_play": Parameter("url", ""),
    "unknown_caller_play": Parameter("url", ""),
    "force_pin_authentication": Parameter("bool", False, needs=PIN_AUTH),
    "create_session_with_single_party": Parameter("bool", False),
    "virtual_number_cooloff_period": Parameter("int", 0, 0, 3600),
}
PARTIES = ("first_party", "second_party")
PINS = ("first_party_pin", "second_party_pin")
UPDATABLE = tuple(name for name, parameter in PARAMETERS.items() if parameter.updatable)


class Invalid(ValueError):
    """A value a rule refuses, in the service's words (`says`, after the field's name) and Plivo's
    (`plivo`, the whole sentence after "Invalid parameter. ", or the missing parameter's name)."""

    def __init__(self, says: str, plivo: str, *, missing: bool = False):
        super().__init__(says)
        self.says, self.plivo, self.missing = says, plivo, missing


def check(name: str, value: Any) -> Any:
    """The value of parameter `name` if its rule accepts it (normalised: a PIN as digits, a method in
    capitals); raises Invalid otherwise. Phone numbers are each caller's to check (module docstring)."""
    parameter = PARAMETERS[name]
    kind = parameter.kind
    if kind == "bool":
        if not isinstance(value, bool):  # JSON true/false only: "true" and 1 are refused
            raise Invalid("must be true or false", f"{name} allowed values are true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("must be an integer", f"{name} should be an integer")
        if not parameter.low <= value <= parameter.high:  # type: ignore[operator]
            raise Invalid(f"must be between {parameter.low} and {parameter.high}",
                          f"{name} is outside the allowed range")
        return value
    if kind in ("choice", "method"):
        text = value.upper() if kind == "method" and isinstance(value, str) else value
        if text not in parameter.choices:
            allowed = " or ".join(parameter.choices)
            raise Invalid("must be one of " + ", ".join(parameter.choices), f"{name} allowed values are {allowed}")
        return text
    if kind == "url":
        return _url(name, value)
    if kind == "pin":
        # Plivo's FAQ sends PINs as JSON numbers: accept those too, kept as digit strings (reference §3).
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        # ASCII digits only: str.isdigit() is also true of "²" and of other scripts' digits.
        if not isinstance(text, str) or not (text.isascii() and text.isdigit() and 4 <= len(text) <= 15):
            raise Invalid("must be 4 to 15 digits", f"{name} should be 4 to 15 digits")
        return text
    if kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise Invalid("must be a non-empty string", f"{name} should be a non-empty string")
        if len(value) > parameter.max_length:  # type: ignore[operator]
            raise Invalid(f"must be at most {parameter.max_length} characters",
                          f"{name} should be at most {parameter.max_length} characters")
        found = text_problem(value)
        if found:
            raise Invalid(found, f"{name} {found}")
        return value.strip()
    raise LookupError(f"no rule for parameters of kind {kind!r} ({name})")


def _url(name: str, value: Any) -> str:
    # Plivo fetches these (play prompts) or calls them; "" means none, as the session object shows an
    # unset URL (and an update can clear one with it).
    if value == "":
        return ""
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 host
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("must be an http or https URL", f"{name} should be a valid URL")
    if len(value) >= MAX_URL_LENGTH:
        raise Invalid(f"must be under {MAX_URL_LENGTH} characters",
                      f"{name} should be under {MAX_URL_LENGTH} characters")
    return value


def asks(name: str, value: Any) -> bool:
    """Whether a given value asks for something: a boolean true, or any other non-empty value.
    (`generate_pin: false` without PIN authentication asks for nothing, so it is not refused.)"""
    return value is True if PARAMETERS[name].kind == "bool" else value not in (None, "")


def party_problems(values: Mapping[str, Any]) -> list[tuple[str, Invalid]]:
    """The rules that join the parties, applied to values each already accepted: (field, what is wrong)
    for each broken rule, in a fixed order (Plivo reports the first)."""
    found: list[tuple[str, Invalid]] = []
    if values.get("create_session_with_single_party") is True:
        if not values.get("first_party") and not values.get("second_party"):
            found.append(("first_party", Invalid("or second_party is required", "first_party or second_party",
                                                 missing=True)))
    else:
        for name in PARTIES:
            if not values.get(name):
                found.append((name, Invalid("is required", name, missing=True)))
    if values.get("first_party") and values.get("first_party") == values.get("second_party"):
        found.append(("second_party", Invalid("must differ from first_party",
                                              "first_party and second_party must be different")))
    return found


def pin_problems(values: Mapping[str, Any]) -> list[tuple[str, Invalid]]:
    """The rules of PIN authentication (reference §3), as `party_problems`: its fields only with it on
    (and `generate_pin_length` only with `generate_pin`); with it on, a prompt, and the parties' PINs
    unless Plivo generates them; two different PINs."""
    found: list[tuple[str, Invalid]] = []
    for name, parameter in PARAMETERS.items():
        needed = parameter.needs
        if needed and asks(name, values.get(name)) and values.get(needed) is not True:
            found.append((name, Invalid(f"is allowed only when {needed} is true",
                                        f"{name} is allowed only when {needed} is true")))
    if values.get(PIN_AUTH) is True:
        required = ["pin_prompt_play"] + ([] if values.get("generate_pin") is True else list(PINS))
        for name in required:
            if not values.get(name):
                found.append((name, Invalid(f"is required when {PIN_AUTH} is true", name, missing=True)))
    if values.get(PINS[0]) and values.get(PINS[0]) == values.get(PINS[1]):
        found.append((PINS[1], Invalid("must differ from first_party_pin",
                                       "first_party_pin and second_party_pin must be different")))
    return found
