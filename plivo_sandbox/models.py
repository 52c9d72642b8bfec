"""The sandbox's session record and the timestamp formats Plivo uses (reference §6.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import phonenumbers

from webhook_service.domain.plivo_parameters import PARAMETERS

DEFAULT_SESSION_EXPIRY = PARAMETERS["session_expiry"].default


def expiry_seconds(session_expiry: int | None) -> int:
    """Seconds a session lasts from its create (or update). 0 is what Plivo's Go SDK sends when its caller
    leaves the field unset; what Plivo makes of it is not documented, and the sandbox plays the reading
    that lets those sessions work: Plivo's default (`domain.plivo_parameters`)."""
    return session_expiry or DEFAULT_SESSION_EXPIRY

# Fields of the session object rendered from the create parameters (the parties, times and totals apart).
SHOWN = (
    "initiate_call_to_first_party", "callback_url", "callback_method", "call_time_limit", "ring_timeout",
    "first_party_play_url", "second_party_play_url", "record", "record_file_format", "recording_callback_url",
    "recording_callback_method", "unknown_caller_play", "is_pin_authentication_required", "generate_pin",
    "generate_pin_length", "first_party_pin", "second_party_pin", "pin_prompt_play", "pin_retry", "pin_retry_wait",
    "incorrect_pin_play", "force_pin_authentication", "create_session_with_single_party",
    "virtual_number_cooloff_period",
)
# The session object when a field is not given: the shared table's defaults (`domain.plivo_parameters`),
# except that with PIN authentication off its fields read null (Java SDK fixtures), and
# create_session_with_single_party reads null unless given (newer fixtures).
PIN_FIELDS = ("generate_pin", "generate_pin_length", "first_party_pin", "second_party_pin", "pin_prompt_play",
              "pin_retry", "pin_retry_wait", "incorrect_pin_play")
DEFAULTS: dict[str, Any] = {name: PARAMETERS[name].default for name in SHOWN} | dict.fromkeys(PIN_FIELDS) | {
    "create_session_with_single_party": None}
# With PIN authentication on, the PIN fields not given take the table's defaults (generate_pin_length only
# with generate_pin).
PIN_DEFAULTS: dict[str, Any] = {name: PARAMETERS[name].default
                                for name in ("generate_pin", "pin_retry", "pin_retry_wait", "incorrect_pin_play")}
SESSION_AMOUNT = 0  # the session-creation charge: every fixture shows 0


def country_code(digits: str) -> int | None:
    """The country calling code of a number's digits (1 for the US and Canada), or None if there is none."""
    try:
        return phonenumbers.parse("+" + digits, None).country_code if digits else None
    except phonenumbers.NumberParseException:
        return None


def go_time(moment: datetime) -> str:
    """Format like Go's `time.String()`, as Plivo does: `2023-07-12 15:52:14.77269 +0000 UTC`.

    Go trims trailing zeros of the fraction and drops it when zero (fixtures show both shapes).
    """
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + " +0000 UTC"


def event_time(moment: datetime) -> str:
    """Format a callback timestamp: `YYYY-MM-DD HH:MM:SS` (UTC)."""
    return moment.strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class Session:
    """One masking session as the sandbox stores it; `to_json` renders Plivo's session object."""

    session_uuid: str
    first_party: str  # digits without '+'; "" while missing in single-party mode
    second_party: str
    virtual_number: str
    created_time: datetime
    modified_time: datetime
    expiry_time: datetime  # an expired (DELETEd) session has expiry_time = the moment it was expired
    config: dict[str, Any]  # every other field of the session object, ready to render
    interaction: list[dict[str, Any]] = field(default_factory=list)
    total_call_count: int = 0  # call legs, not calls (a bridged call counts 2)
    total_call_billed_duration: int = 0
    total_call_amount: Decimal = Decimal(0)
    last_interaction_time: datetime | None = None
    sequence: int = 0  # last SequenceNumber sent; one counter per session across all callbacks
    geomatch: bool = True  # its number comes from its first party's country (Plivo's default)
    timeout_sent: bool = False  # its SessionTimeout is sent (or, expired by DELETE, never will be)

    def status(self, now: datetime) -> str:
        """ "active" until expiry_time, then "expired" (the sandbox never reports "in-progress")."""
        return "expired" if now >= self.expiry_time else "active"

    @property
    def country(self) -> int | None:
        """The country calling code its number is matched to: its first party's, else its second's."""
        return country_code(self.first_party or self.second_party)

    def parties(self) -> set[str]:
        """The parties' numbers that are set (one of them may be missing in single-party mode)."""
        return {p for p in (self.first_party, self.second_party) if p}

    def blocks_number_until(self) -> datetime:
        """Until when this session keeps its parties off its virtual number (expiry + cool-off)."""
        return self.expiry_time + timedelta(seconds=self.config["virtual_number_cooloff_period"])

    @property
    def duration(self) -> int:
        """Seconds from creation to expiry (reference §4: `duration` = expiry_time − created_time)."""
        return int((self.expiry_time - self.created_time).total_seconds())

    def next_sequence(self) -> str:
        """The next SequenceNumber, as the string Plivo sends."""
        self.sequence += 1
        return str(self.sequence)

    def to_json(self, now: datetime) -> dict[str, Any]:
        """Plivo's session object (amounts as JSON numbers, numbers as digits without '+')."""
        return {
            "first_party": self.first_party,
            "second_party": self.second_party,
            "virtual_number": self.virtual_number,
            "status": self.status(now),
            "session_uuid": self.session_uuid,
            "created_time": go_time(self.created_time),
            "modified_time": go_time(self.modified_time),
            "expiry_time": go_time(self.expiry_time),
            "duration": self.duration,
            "amount": SESSION_AMOUNT,
            **self.config,
            "interaction": [dict(i) for i in self.interaction] or None,
            "total_call_amount": _number(self.total_call_amount),
            "total_call_count": self.total_call_count,
            "total_call_billed_duration": self.total_call_billed_duration,
            "total_session_amount": _number(self.total_call_amount + SESSION_AMOUNT),
            "last_interaction_time": go_time(self.last_interaction_time) if self.last_interaction_time else "",
        }


def _number(amount: Decimal) -> int | float:
    return int(amount) if amount == amount.to_integral_value() else float(amount)
