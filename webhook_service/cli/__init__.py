"""Operator commands (`flask --app webhook_service <group> <command>`); each calls one service."""

from __future__ import annotations

import json
import logging
import signal
import threading
from datetime import UTC, datetime, timedelta

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from .report import report_cli

db_cli = AppGroup("db", help="Database schema.")
sessions_cli = AppGroup("sessions", help="Masking sessions.")
callbacks_cli = AppGroup("callbacks", help="Stored Plivo callbacks (the inbox).")


def _ctx():
    return current_app.extensions["webhook_service"]


@db_cli.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from ..migrate import upgrade

    upgrade(_ctx().db.engine.url.render_as_string(hide_password=False), revision)
    click.echo(f"database at {revision}")


@sessions_cli.command("resolve")
@click.option("--grace-seconds", default=120, show_default=True,
              help="Only conclude 'not created' for attempts older than this.")
def sessions_resolve(grace_seconds: int) -> None:
    """Find out what happened to creates whose outcome was unknown (timeouts after sending)."""
    from ..services.sessions import resolve_pending_attempts

    counts = resolve_pending_attempts(_ctx(), grace=timedelta(seconds=grace_seconds))
    click.echo(json.dumps(counts, sort_keys=True))


@sessions_cli.command("reconcile")
@click.option("--limit", default=3000, show_default=True, help="Most sessions fetched from Plivo in one run.")
@click.option("--concurrency", default=8, show_default=True, help="Plivo requests in flight at once.")
@click.option("--every", type=float, default=None, help="Repeat every this many seconds.")
def sessions_reconcile(limit: int, concurrency: int, every: float | None) -> None:
    """Heal missed callbacks from Plivo's records, expire overdue sessions, record drift."""
    from ..services.reconcile import reconcile, reconcile_every

    if every is None:
        click.echo(json.dumps(reconcile(_ctx(), limit=limit, concurrency=concurrency).as_dict(), sort_keys=True))
        return
    stop = _stop_on_signals()
    reconcile_every(_ctx(), every, stop, report=lambda r: click.echo(json.dumps(r.as_dict(), sort_keys=True)),
                    limit=limit, concurrency=concurrency)


@sessions_cli.command("project")
def sessions_project() -> None:
    """Project every session that is due, now (waiting for any that a projector holds)."""
    click.echo(json.dumps({"projected": _ctx().projector.project_all_due()}))


@click.command("worker")
@click.option("--reconcile-every", default=60.0, show_default=True, help="Seconds between reconciliation runs.")
@click.option("--poll", default=0.2, show_default=True, help="Seconds between looks at an empty projection queue.")
def worker(reconcile_every: float, poll: float) -> None:
    """The worker process: projects due sessions continuously; reconciles with Plivo every minute.

    SIGTERM or SIGINT stops it after the batch in hand (a batch cut short is rolled back and
    projected again by whoever comes next).
    """
    from ..services import reconcile
    from ..services.projector import run_worker

    ctx = _ctx()
    stop = _stop_on_signals()
    # (`reconcile_every` is the option's value here, the seconds; the function is reconcile.reconcile_every.)
    reconciler = threading.Thread(target=reconcile.reconcile_every, args=(ctx, reconcile_every, stop),
                                  name="reconcile", daemon=True)
    reconciler.start()
    logging.getLogger(__name__).info("worker started: projecting, and reconciling every %g s", reconcile_every)
    run_worker(ctx.projector, stop, poll=poll)
    reconciler.join(30)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


@callbacks_cli.command("replay")
@click.option("--failed", is_flag=True, help="Callbacks whose application failed.")
@click.option("--id", "ids", multiple=True, type=int, help="This inbox id (repeatable).")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              help="Callbacks received since this UTC time.")
def callbacks_replay(failed: bool, ids: tuple[int, ...], since: datetime | None) -> None:
    """Read stored callbacks again from their stored parameters and project them (idempotent).

    With no option: the failed ones.
    """
    from ..services.inbox import replay

    counts = replay(_ctx(), ids=ids, failed=failed, since=since.replace(tzinfo=UTC) if since else None)
    click.echo(json.dumps(counts, sort_keys=True))


def _duration(value: str) -> timedelta:
    units = {"d": "days", "h": "hours", "m": "minutes"}
    try:
        return timedelta(**{units[value[-1]]: int(value[:-1])})
    except (KeyError, ValueError):
        raise click.BadParameter("use a number and a unit: 90d, 12h or 30m") from None


@callbacks_cli.command("prune")
@click.option("--older-than", "older_than", default="90d", show_default=True, help="Age, e.g. 90d, 12h.")
@click.option("--batch-size", default=1000, show_default=True)
def callbacks_prune(older_than: str, batch_size: int) -> None:
    """Delete recorded and ignored callbacks older than the given age (never failed ones; facts stay)."""
    from ..services.inbox import prune

    deleted = prune(_ctx().db, older_than=_duration(older_than), batch_size=batch_size)
    click.echo(json.dumps({"deleted": deleted}))


@sessions_cli.command("prune-attempts")
@click.option("--older-than", "older_than", default="90d", show_default=True, help="Age, e.g. 90d, 12h.")
@click.option("--batch-size", default=1000, show_default=True)
def sessions_prune_attempts(older_than: str, batch_size: int) -> None:
    """Delete finished create attempts older than the given age (never pending or unknown ones; sessions stay)."""
    from ..services.sessions import prune_attempts

    deleted = prune_attempts(_ctx(), older_than=_duration(older_than), batch_size=batch_size)
    click.echo(json.dumps({"deleted": deleted}))


def register_cli(app: Flask) -> None:
    app.cli.add_command(db_cli)
    app.cli.add_command(sessions_cli)
    app.cli.add_command(callbacks_cli)
    app.cli.add_command(report_cli)
    app.cli.add_command(worker)
