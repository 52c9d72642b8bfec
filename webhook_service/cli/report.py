"""`flask report`: the `reporting.*` views (docs/reporting.md) from the command line."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
from flask import current_app
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..domain.values import session_uuid_as_stored
from .output import Commands, as_text, format_table, to_json

report_cli = Commands("report", help="Reports read from the reporting.* views.")

DAY = click.DateTime(formats=["%Y-%m-%d"])
# Shown above the leg table of `report session`, where the session's own columns would repeat.
SESSION_COLUMNS = ("session_uuid", "external_ref", "virtual_number")


def _connect() -> Connection:
    # One snapshot for every query of a command, so a session's totals and its legs agree even
    # while callbacks are being applied.
    engine = current_app.extensions["webhook_service"].db.engine
    return engine.connect().execution_options(isolation_level="REPEATABLE READ")


def format_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([as_text(value) for value in row] for row in rows)
    return out.getvalue().rstrip("\n")


@report_cli.command("daily")
@click.option("--since", type=DAY, required=True, help="First UTC day, YYYY-MM-DD.")
@click.option("--until", type=DAY, help="Last UTC day, included (default: the latest day with activity).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def report_daily(since: datetime, until: datetime | None, fmt: str) -> None:
    """Sessions created and call activity per UTC day, oldest first (reporting.call_activity_daily)."""
    if until is not None and until < since:
        raise click.BadParameter("must not be before --since", param_hint="--until")
    query = "SELECT * FROM reporting.call_activity_daily WHERE day >= :since"
    params = {"since": since.date()}
    if until is not None:
        query += " AND day <= :until"
        params["until"] = until.date()
    with _connect() as conn:
        result = conn.execute(text(query + " ORDER BY day"), params)
        columns, rows = list(result.keys()), result.all()
    if fmt == "json":
        click.echo(to_json([dict(zip(columns, row, strict=True)) for row in rows]))
    elif not rows and fmt == "table":
        click.echo(f"No sessions created and no calls from {since.date()}"
                   + (f" to {until.date()}." if until is not None else " on."))
    elif fmt == "csv":
        click.echo(format_csv(columns, rows))
    else:
        click.echo(format_table(columns, rows))


@report_cli.command("session")
@click.argument("session_uuid")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def report_session(session_uuid: str, fmt: str) -> None:
    """One session's totals (reporting.session_summary) and its call legs (reporting.call_legs)."""
    session_uuid = session_uuid_as_stored(session_uuid)
    with _connect() as conn:
        summary = conn.execute(text("SELECT * FROM reporting.session_summary WHERE session_uuid = :uuid"),
                               {"uuid": session_uuid}).mappings().first()
        if summary is None:
            raise click.ClickException(f"no session {session_uuid} (not in reporting.session_summary)")
        legs = conn.execute(text("""
            SELECT * FROM reporting.call_legs WHERE session_uuid = :uuid
             ORDER BY least(initiated_at, ringing_at, answered_at, ended_at), party
        """), {"uuid": session_uuid})
        leg_columns, leg_rows = list(legs.keys()), legs.all()
    if fmt == "json":
        click.echo(to_json({"session": dict(summary),
                          "call_legs": [dict(zip(leg_columns, row, strict=True)) for row in leg_rows]}))
        return
    width = max(len(name) for name in summary)
    click.echo("\n".join(f"{name.ljust(width)}  {as_text(value)}".rstrip() for name, value in summary.items()))
    keep = [i for i, name in enumerate(leg_columns) if name not in SESSION_COLUMNS]
    click.echo(f"\ncall legs ({len(leg_rows)})")
    click.echo(format_table([leg_columns[i] for i in keep], [[row[i] for i in keep] for row in leg_rows]))
