"""How every command prints and fails: its result once on stdout, as a table (default) or JSON
(`--format json`), "nothing to do" in words, progress bars on a terminal only, and a failure as one
`Error: …` line with exit code 1.

Tables and JSON follow `flask report` (`format_table`, values as `as_text` writes them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

FORMATS = ("table", "json")


def format_option(*choices: str) -> Callable:
    """`--format table|json` (or the choices given), table by default."""
    return click.option("--format", "fmt", type=click.Choice(choices or FORMATS), default="table", show_default=True,
                        help="table: aligned columns for people; json: for scripts.")


def as_text(value: Any) -> str:
    """A value as it appears in tables, CSV and JSON: ISO dates, UTC times, exact decimals, NULL empty."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as aligned plain-text columns under a header; numeric columns right-aligned."""
    cells = [[as_text(value) for value in row] for row in rows]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(columns)]
    numeric = [any(_is_number(row[i]) for row in rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    lines = [line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells]
    return "\n".join(row.rstrip() for row in lines)


def format_pairs(values: Mapping[str, Any]) -> str:
    """One `name  value` line per item, the names aligned (a single record, such as a session)."""
    width = max((len(name) for name in values), default=0)
    return "\n".join(f"{name.ljust(width)}  {as_text(value)}".rstrip() for name, value in values.items())


def to_json(data: Any) -> str:
    # Money and ratios stay exact decimals, written as strings (as the HTTP API writes amounts).
    return json.dumps(data, indent=2, default=as_text)


def clip(text: str | None, width: int = 60) -> str | None:
    """Long text (an error) cut for a table column; `--format json` has it whole."""
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A `(done, total)` callback drawing click's progress bar on stderr when stderr is a terminal; on
    anything else (a log, a pipe, cron) it draws nothing, so logs stay quiet."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True).__enter__()
        bar.length = max(bar.length or 0, total)
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _one_line(invoke: Callable[[click.Context], Any], ctx: click.Context) -> Any:
    """Run a command; the service's own errors (no such session, no such callback) and an unreachable
    database become `Error: …` and exit code 1, not a traceback."""
    from ..errors import ApiError
    from ..persistence.db import is_database_unavailable

    try:
        return invoke(ctx)
    except ApiError as exc:
        raise click.ClickException(exc.message) from None
    except (click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        url = current_app.extensions["webhook_service"].db.engine.url
        where = f"{url.host}:{url.port}" if url.host else "of DATABASE_URL"
        raise click.ClickException(f"the database {where} cannot be reached ({type(exc).__name__}): is it running?"
                                   ) from None


class Commands(AppGroup):
    """A command group whose commands fail in one line (`_one_line`)."""

    def invoke(self, ctx: click.Context) -> Any:
        return _one_line(super().invoke, ctx)


class FailsInOneLine(click.Command):
    """A single command that fails in one line (`_one_line`)."""

    def invoke(self, ctx: click.Context) -> Any:
        return _one_line(super().invoke, ctx)
