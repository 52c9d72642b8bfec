"""Operator commands (`flask --app webhook_service <group> <command>`); each calls one service.

What every command does alike (`output`): its result is printed once on stdout, a table by default
and JSON with `--format json`; "nothing to do" is said in words; long work draws a progress bar on a
terminal and nothing elsewhere; a failure is one `Error: …` line on stderr and exit code 1 (a bad
setting: exit code 2, see `webhook_service.create_app`); logs below WARNING are left out unless
LOG_LEVEL is set, since the result is printed (the `worker` logs at LOG_LEVEL, default INFO).
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from flask import Flask, current_app

from ..domain.values import session_uuid_as_stored
from ..errors import ApiError
from ..persistence.partitions import MONTHS_AHEAD
from .output import (
    Commands,
    FailsInOneLine,
    as_text,
    clip,
    format_option,
    format_pairs,
    format_table,
    progress,
    to_json,
)
from .report import report_cli

log = logging.getLogger(__name__)
DATE_OR_TIME = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


db_cli = Commands("db", help="Database schema.")
sessions_cli = Commands("sessions", help="Masking sessions.")
callbacks_cli = Commands("callbacks", help="Stored Plivo callbacks (the inbox).")


def _ctx():
    return current_app.extensions["webhook_service"]


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None else None


def _counts(fmt: str, counts: dict[str, int], column: str, nothing: str) -> None:
    """Outcome counts: a two-column table, or `nothing` when there are none; JSON as they are."""
    if fmt == "json":
        click.echo(to_json(counts))
    elif not counts:
        click.echo(nothing)
    else:
        click.echo(format_table(["outcome", column], sorted(counts.items())))


@db_cli.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from ..migrate import upgrade

    upgrade(_ctx().db.engine.url.render_as_string(hide_password=False), revision)
    click.echo(f"database at {revision}")


# Sessions ---------------------------------------------------------------------------------------


SESSION_COLUMNS = ("session_uuid", "status", "created", "virtual_number", "first_party", "second_party", "call_count",
                   "external_ref")


@sessions_cli.command("list")
@click.option("--status", help="active or expired.")
@click.option("--external-ref", help="The caller's reference given at create.")
@click.option("--first-party", help="A party's number (any format).")
@click.option("--second-party")
@click.option("--virtual-number")
@click.option("--created-after", help="ISO 8601 time, e.g. 2026-11-01T00:00:00Z.")
@click.option("--created-before")
@click.option("--limit", type=int, default=20, show_default=True, help="At most this many (100 at most).")
@click.option("--cursor", help="The next page: the cursor the previous page printed.")
@format_option()
def sessions_list(fmt: str, **filters: Any) -> None:
    """Stored sessions, newest first, filtered as GET /v1/sessions filters them (its data without curl)."""
    from ..domain.requests import validate_list
    from ..services.sessions import list_sessions

    args = {name: str(value) for name, value in filters.items() if value is not None}
    try:
        query = validate_list(args, region=_ctx().settings.default_phone_region)
    except ApiError as exc:
        problems = exc.details.get("fields", {})
        raise click.UsageError("; ".join(f"--{name.replace('_', '-')} {problem}" for name, problem in problems.items())
                               or exc.message) from None
    page = list_sessions(_ctx(), query)
    if fmt == "json":
        click.echo(to_json(page))
        return
    if not page["sessions"]:
        click.echo("No sessions match." if args.keys() - {"limit"} else "No sessions yet.")
        return
    rows = [[s["session_uuid"], s["status"], s["created_at"], s["virtual_number"], s["first_party"], s["second_party"],
             s["call_count"], s["external_ref"]] for s in page["sessions"]]
    click.echo(format_table(SESSION_COLUMNS, rows))
    if page["next_cursor"]:
        click.echo(f"\nmore: --cursor {page['next_cursor']}")


LEG_COLUMNS = ("party", "call_uuid", "answered_at", "ended_at", "end_event", "duration", "billed_duration", "amount",
               "hangup_cause")
RECORDING_COLUMNS = ("recording_uuid", "status", "started_at", "duration", "format", "recording_url")


@sessions_cli.command("show")
@click.argument("session_uuid")
@format_option()
def sessions_show(session_uuid: str, fmt: str) -> None:
    """One session as GET /v1/sessions/<uuid> answers it: its counters, call legs, recordings and numbers."""
    from ..services.sessions import session_details

    details = session_details(_ctx(), session_uuid_as_stored(session_uuid))
    if fmt == "json":
        click.echo(to_json(details))
        return
    lists = ("call_legs", "recordings", "virtual_number_history")
    fields = {name: (to_json(value).replace("\n", " ") if isinstance(value, dict) else value)
              for name, value in details.items() if name not in lists}
    click.echo(format_pairs(fields))
    for name, columns in (("call_legs", LEG_COLUMNS), ("recordings", RECORDING_COLUMNS),
                          ("virtual_number_history", ("virtual_number", "assigned_at"))):
        items = details[name]
        click.echo(f"\n{name.replace('_', ' ')} ({len(items)})")
        if items:
            shown = [c for c in columns if c in items[0]]
            click.echo(format_table(shown, [[item.get(c) for c in shown] for item in items]))


@sessions_cli.command("resolve")
@click.option("--grace-seconds", default=120, show_default=True,
              help="Only conclude 'not created' for attempts older than this.")
@format_option()
def sessions_resolve(grace_seconds: int, fmt: str) -> None:
    """Find out what happened to creates whose outcome was unknown (timeouts after sending).

    Exit code 1 if Plivo could not be asked about some of them.
    """
    from ..services.sessions import resolve_pending_attempts

    counts = resolve_pending_attempts(_ctx(), grace=timedelta(seconds=grace_seconds))
    _counts(fmt, counts, "attempts", "No create attempt was waiting to be resolved.")
    if counts.get("error"):
        raise click.ClickException(f"Plivo ({_ctx().settings.plivo_api_base_url}) could not be asked about"
                                   f" {counts['error']} attempt(s); they stay unresolved for the next run")


def _pass_line(report) -> str:
    attempts = ", ".join(f"{state} {n}" for state, n in sorted(report.attempts.items())) or "none"
    return (f"{datetime.now(UTC).isoformat(timespec='seconds')}  checked {report.checked}, changed {report.changed},"
            f" drift {report.drift}, not found {report.not_found}, errors {report.errors};"
            f" marked expired {report.marked_expired}; unknown creates resolved: {attempts}")


@sessions_cli.command("reconcile")
@click.option("--limit", default=3000, show_default=True, help="Most sessions fetched from Plivo in one run.")
@click.option("--concurrency", default=8, show_default=True, help="Plivo requests in flight at once.")
@click.option("--every", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Repeat every this many seconds until SIGTERM or Ctrl-C, one line per pass.")
@format_option()
def sessions_reconcile(limit: int, concurrency: int, every: float | None, fmt: str) -> None:
    """Heal missed callbacks from Plivo's records, expire overdue sessions, record drift.

    Exit code 1 if Plivo could not be reached for some session (cron and Kubernetes jobs notice).
    """
    from ..services.reconcile import reconcile, reconcile_every

    ctx = _ctx()
    if every is None:
        with progress("reconciling") as bar:
            report = reconcile(ctx, limit=limit, concurrency=concurrency, progress=bar)
        if fmt == "json":
            click.echo(to_json(report.as_dict()))
        elif not (report.fetched or report.marked_expired or report.attempts):
            click.echo("Nothing to reconcile: no session is active, recently expired or has a call in progress.")
        else:
            click.echo(format_pairs(report.as_dict() | {"attempts": to_json(report.attempts).replace("\n", "")}))
        if report.errors:
            raise click.ClickException(f"Plivo ({ctx.settings.plivo_api_base_url}) could not be read for"
                                       f" {report.errors} of {report.fetched} sessions; the next run retries them")
        return
    stop = _stop_on_signals()
    passes = 0
    # The start and stop lines go to stderr with --format json, so stdout stays one JSON object per pass.
    say = (lambda line: click.echo(line, err=True)) if fmt == "json" else click.echo
    say(f"reconciling every {every:g} s until SIGTERM or Ctrl-C")

    def report_pass(report) -> None:
        nonlocal passes
        passes += 1
        click.echo(to_json(report.as_dict()).replace("\n", "").replace("  ", " ") if fmt == "json"
                   else _pass_line(report))

    reconcile_every(ctx, every, stop, report=report_pass, limit=limit, concurrency=concurrency)
    say(f"stopped after {passes} pass{'es' if passes != 1 else ''}")


@sessions_cli.command("project")
@format_option()
def sessions_project(fmt: str) -> None:
    """Project every session that is due, now (waiting for any that a projector holds)."""
    projected = _ctx().projector.project_all_due()
    if fmt == "json":
        click.echo(to_json({"projected": projected}))
    else:
        click.echo(f"Projected {projected} session{'s' if projected != 1 else ''}." if projected
                   else "No session was due for projection.")


@click.command("worker", cls=FailsInOneLine)
@click.option("--reconcile-every", default=60.0, show_default=True, help="Seconds between reconciliation runs.")
@click.option("--poll", default=0.2, show_default=True, help="Seconds between looks at an empty projection queue.")
def worker(reconcile_every: float, poll: float) -> None:
    """The worker process: projects due sessions continuously; reconciles with Plivo every minute.

    SIGTERM or SIGINT stops it after the batch in hand (a batch cut short is rolled back and
    projected again by whoever comes next).
    """
    from ..services import reconcile
    from ..services.inbox import keep_partitions_ahead
    from ..services.projector import run_worker

    ctx = _ctx()
    logging.getLogger().setLevel(ctx.settings.log_level)  # a service: its logs are its output
    if ctx.settings.sandbox:
        log.warning("SANDBOX MODE: no PLIVO_AUTH_ID set; Plivo calls go to the local sandbox at %s",
                    ctx.settings.plivo_api_base_url)
    stop = _stop_on_signals()
    # (`reconcile_every` is the option's value here, the seconds; the function is reconcile.reconcile_every.)
    reconciler = threading.Thread(target=reconcile.reconcile_every, args=(ctx, reconcile_every, stop),
                                  name="reconcile", daemon=True)
    reconciler.start()
    # The inbox's next monthly partitions, made ahead of time (migration 0011).
    partitioner = threading.Thread(target=keep_partitions_ahead, args=(ctx.db, stop), name="partitions",
                                   daemon=True)
    partitioner.start()
    log.info("worker started: projecting, and reconciling every %g s", reconcile_every)
    run_worker(ctx.projector, stop, poll=poll)
    reconciler.join(30)
    log.info("worker stopped")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


# Callbacks --------------------------------------------------------------------------------------


CALLBACK_COLUMNS = ("id", "received", "endpoint", "event", "status", "error")


@callbacks_cli.command("list")
@click.option("--failed", is_flag=True, help="Only callbacks whose reading failed (to replay after a fix).")
@click.option("--session", "session_uuid", help="Only this session's callbacks.")
@click.option("--since", type=DATE_OR_TIME, help="Received since this UTC time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS).")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@format_option()
def callbacks_list(failed: bool, session_uuid: str | None, since: datetime | None, limit: int, fmt: str) -> None:
    """Stored callbacks, newest first: id, received, endpoint, event, status and error."""
    from ..services.inbox import list_callbacks

    rows = list_callbacks(_ctx().db, failed=failed, since=_utc(since), limit=limit,
                          session_uuid=session_uuid_as_stored(session_uuid) if session_uuid else None)
    if fmt == "json":
        click.echo(to_json(rows))
    elif not rows:
        click.echo("No callbacks match." if failed or session_uuid or since else "No callbacks stored.")
    else:
        click.echo(format_table(CALLBACK_COLUMNS, [[r["id"], as_text(r["received_at"]), r["endpoint"], r["event_name"],
                                                     r["status"], clip(r["error"])] for r in rows]))


@callbacks_cli.command("replay")
@click.option("--failed", is_flag=True, help="Callbacks whose application failed.")
@click.option("--id", "ids", multiple=True, type=int, help="This inbox id (repeatable).")
@click.option("--since", type=DATE_OR_TIME, help="Callbacks received since this UTC time.")
@format_option()
def callbacks_replay(failed: bool, ids: tuple[int, ...], since: datetime | None, fmt: str) -> None:
    """Read stored callbacks again from their stored parameters and project them (idempotent).

    With no option: the failed ones. An --id that names no stored callback is an error, and then
    nothing is replayed. Exit code 1 if some callback is still failed after its replay.
    """
    from ..services.inbox import replay

    with progress("replaying") as bar:
        counts = replay(_ctx(), ids=ids, failed=failed, since=_utc(since), progress=bar)
    _counts(fmt, counts, "callbacks", "No callbacks to replay." if ids or since or failed
            else "No callbacks to replay: none is failed.")
    if counts.get("failed"):
        raise click.ClickException(f"{counts['failed']} callback(s) still failed: `flask callbacks list --failed`"
                                   " shows why")


def _duration(value: str) -> timedelta:
    units = {"d": "days", "h": "hours", "m": "minutes"}
    try:
        return timedelta(**{units[value[-1]]: int(value[:-1])})
    except (KeyError, ValueError, IndexError):
        raise click.BadParameter("use a number and a unit: 90d, 12h or 30m") from None


@callbacks_cli.command("prune")
@click.option("--older-than", "older_than", default="90d", show_default=True, help="Age, e.g. 90d, 12h.")
@click.option("--batch-size", default=1000, show_default=True)
@format_option()
def callbacks_prune(older_than: str, batch_size: int, fmt: str) -> None:
    """Delete recorded and ignored callbacks older than the given age (never failed ones; facts stay)."""
    from ..services.inbox import prune

    with progress("pruning callbacks") as bar:
        deleted = prune(_ctx().db, older_than=_duration(older_than), batch_size=batch_size, progress=bar)
    if fmt == "json":
        click.echo(to_json({"deleted": deleted}))
    else:
        click.echo(f"Deleted {deleted} recorded or ignored callback(s) received more than {older_than} ago."
                   if deleted else f"Nothing to prune: no recorded or ignored callback is older than {older_than}.")


@callbacks_cli.command("partitions")
@click.option("--months-ahead", default=MONTHS_AHEAD, show_default=True)
@format_option()
def callbacks_partitions(months_ahead: int, fmt: str) -> None:
    """Make the inbox's monthly partitions up to N months ahead (the worker does it every hour)."""
    from ..services.inbox import ensure_partitions

    made = ensure_partitions(_ctx().db, months_ahead=months_ahead)
    if fmt == "json":
        click.echo(to_json({"made": made}))
    else:
        click.echo("Made the inbox's partition(s) " + ", ".join(made) + "." if made
                   else f"Nothing to do: the inbox's partitions {months_ahead} month(s) ahead exist (or it is not "
                        "partitioned).")


@sessions_cli.command("prune-attempts")
@click.option("--older-than", "older_than", default="90d", show_default=True, help="Age, e.g. 90d, 12h.")
@click.option("--batch-size", default=1000, show_default=True)
@format_option()
def sessions_prune_attempts(older_than: str, batch_size: int, fmt: str) -> None:
    """Delete finished create attempts older than the given age (never pending or unknown ones; sessions stay)."""
    from ..services.sessions import prune_attempts

    with progress("pruning create attempts") as bar:
        deleted = prune_attempts(_ctx(), older_than=_duration(older_than), batch_size=batch_size, progress=bar)
    if fmt == "json":
        click.echo(to_json({"deleted": deleted}))
    else:
        click.echo(f"Deleted {deleted} finished create attempt(s) started more than {older_than} ago."
                   if deleted else f"Nothing to prune: no finished create attempt is older than {older_than}.")


def register_cli(app: Flask) -> None:
    app.cli.add_command(db_cli)
    app.cli.add_command(sessions_cli)
    app.cli.add_command(callbacks_cli)
    app.cli.add_command(report_cli)
    app.cli.add_command(worker)
