"""The operator's commands as scripts use them: help alone on --help, one line and exit code 2 for a bad
setting, exit code 1 when they fail, results printed once (a table, or JSON with --format json), the
new `callbacks list` and `sessions list|show`, and progress bars on a terminal only.

Exit codes, stdout and stderr are read from the real `flask` command in a process of its own; the
output of a command's table is read through Flask's CLI runner.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from .helpers import (
    environ_without_settings,
    flask_command,
    free_port,
    settings_env,
    settle,
    store_callback,
)
from .test_webhooks import create_session, play

ROOT = Path(__file__).resolve().parent.parent


def flask(args: list[str], database_url: str, sandbox_url: str, **overrides: str) -> subprocess.CompletedProcess:
    """`flask --app 'webhook_service:create_app()' <args>` with the test settings: its exit code, stdout, stderr."""
    proc = flask_command(args, database_url, sandbox_url, stderr=subprocess.PIPE, **overrides)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def flask_with(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    """The same with exactly these settings (nothing of the test run's inherited)."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "webhook_service:create_app()", *args], cwd=ROOT,
                          env=environ_without_settings() | env, capture_output=True, text=True, timeout=120)


def invoke(app, *args: str):
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


# --help and settings ----------------------------------------------------------------------------


HELP = [["--help"], ["sessions", "--help"], ["callbacks", "list", "--help"], ["worker", "--help"],
        ["sessions", "reconcile", "--help"], ["report", "daily", "--help"]]


@pytest.mark.parametrize("args", HELP, ids=" ".join)
@pytest.mark.parametrize("mode", ["sandbox", "production"])
def test_help_prints_help_only(database_url, sandbox_server, args, mode):
    if mode == "sandbox":  # no Plivo credentials: the mode whose banner used to be logged by every command
        env = {"DATABASE_URL": database_url}
    else:
        env = settings_env(sandbox_server.url) | {"DATABASE_URL": database_url, "LOG_LEVEL": "DEBUG"}
    done = flask_with(env, args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("Usage: ") and "{" not in done.stdout.splitlines()[0]


def test_help_prints_help_only_on_a_fresh_clone_with_the_embedded_database(tmp_path):
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cli-help-"))  # the wheel's server runs as its own user: not under tmp_path
    env = {"EMBEDDED_PGDATA": str(base / "pgdata")}  # and no DATABASE_URL: the embedded PostgreSQL, as on a fresh clone
    try:
        done = flask_with(env, ["sessions", "--help"])
        assert done.returncode == 0, done.stderr
        assert done.stderr == "" and done.stdout.startswith("Usage: python -m flask sessions")
    finally:
        subprocess.run([sys.executable, "-c", "from webhook_service.devdb import stop; stop(delete=True)"], cwd=ROOT,
                       env=environ_without_settings() | env, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


SETTING_ERRORS = {
    "DATABASE_URL": {"DATABASE_URL": ""},
    "LOG_LEVEL": {"LOG_LEVEL": "chatty"},
    "PUBLIC_BASE_URL": {"PUBLIC_BASE_URL": "http://masking.example.com", "PUBLIC_BASE_URL_ALLOW_HTTP": ""},
    "PLIVO_READ_TIMEOUT": {"PLIVO_READ_TIMEOUT": "soon"},
}
COMMANDS = [["sessions", "reconcile"], ["callbacks", "list"], ["callbacks", "replay", "--id", "1"], ["worker"],
            ["report", "daily", "--since", "2026-11-01"], ["sessions", "--help"]]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("variable", SETTING_ERRORS)
def test_a_setting_error_is_one_line_naming_the_variable_with_exit_code_2(database_url, sandbox_server, args,
                                                                           variable):
    env = settings_env(sandbox_server.url) | {"DATABASE_URL": database_url} | SETTING_ERRORS[variable]
    done = flask_with({k: v for k, v in env.items() if v}, args)
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"Error: {variable} "), done.stderr


# Exit codes -------------------------------------------------------------------------------------


def test_reconcile_that_cannot_reach_plivo_exits_1_saying_so(live, database_url, sandbox):
    create_session(live)
    nowhere = f"http://127.0.0.1:{free_port()}"
    done = flask(["sessions", "reconcile"], database_url, sandbox.url, PLIVO_API_BASE_URL=nowhere, PLIVO_MAX_RETRIES=1)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"Error: Plivo ({nowhere}) could not be read for 1 of 1 sessions; the next run retries them")
    assert "Traceback" not in done.stderr
    assert "errors          1" in done.stdout  # its report is still printed
    reached = flask(["sessions", "reconcile"], database_url, sandbox.url)
    assert reached.returncode == 0, reached.stderr
    assert reached.stderr == ""


def test_replay_of_an_id_with_no_row_says_so_exits_1_and_replays_nothing(app, engine, database_url, sandbox):
    params = {"EventName": "SessionTimeout", "SessionUUID": "5a1c0e6e-0000-4000-8000-0000000000aa",
              "EventTimestamp": "2026-11-20 10:00:00"}
    assert store_callback(app, "session", params) == "recorded"
    with engine.connect() as conn:
        [(stored, attempts)] = conn.execute(text("SELECT id, attempts FROM callback_inbox")).all()
    done = flask(["callbacks", "replay", "--id", str(stored), "--id", "424242"], database_url, sandbox.url)
    assert done.returncode == 1
    assert done.stderr == "Error: No stored callback with id 424242: nothing was replayed\n"
    assert done.stdout == ""
    with engine.connect() as conn:  # the one that exists was not read again either
        assert conn.execute(text("SELECT attempts FROM callback_inbox")).scalar() == attempts


def test_a_session_that_does_not_exist_is_one_error_line_and_exit_1(database_url, sandbox):
    done = flask(["sessions", "show", "5a1c0e6e-0000-4000-8000-0000000000bb"], database_url, sandbox.url)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "Error: No session 5a1c0e6e-0000-4000-8000-0000000000bb\n"


def test_an_unreachable_database_is_one_error_line_and_exit_1(database_url, sandbox):
    port = free_port()
    done = flask(["callbacks", "list"], f"postgresql://postgres@127.0.0.1:{port}/nothing", sandbox.url,
                 DB_CONNECT_TIMEOUT="1")
    assert done.returncode == 1
    assert done.stderr.startswith(f"Error: the database 127.0.0.1:{port} cannot be reached (OperationalError)")
    assert len(done.stderr.splitlines()) == 1


def test_nothing_to_do_is_said_in_words(app):
    said = {
        ("callbacks", "replay"): "No callbacks to replay: none is failed.\n",
        ("callbacks", "prune"): "Nothing to prune: no recorded or ignored callback is older than 90d.\n",
        ("sessions", "prune-attempts"): "Nothing to prune: no finished create attempt is older than 90d.\n",
        ("sessions", "project"): "No session was due for projection.\n",
        ("sessions", "resolve"): "No create attempt was waiting to be resolved.\n",
        ("sessions", "reconcile"): "Nothing to reconcile: no session is active, recently expired or has a call in"
                                   " progress.\n",
        ("callbacks", "list"): "No callbacks stored.\n",
        ("callbacks", "list", "--failed"): "No callbacks match.\n",
        ("sessions", "list"): "No sessions yet.\n",
        ("sessions", "list", "--status", "expired"): "No sessions match.\n",
    }
    assert {args: invoke(app, *args) for args in said} == said
    assert json.loads(invoke(app, "callbacks", "replay", "--format", "json")) == {}  # for scripts: the counts


def test_results_are_printed_once_as_a_table_and_as_json_on_request(live, database_url, sandbox):
    create_session(live)
    table = flask(["sessions", "reconcile"], database_url, sandbox.url, LOG_LEVEL="")
    assert table.returncode == 0 and table.stderr == ""  # no log line repeating the result
    lines = table.stdout.splitlines()
    assert "checked         1" in lines and "errors          0" in lines
    machine = flask(["sessions", "reconcile", "--format", "json"], database_url, sandbox.url, LOG_LEVEL="")
    assert machine.returncode == 0 and machine.stderr == ""
    assert json.loads(machine.stdout) | {"changed": 0} == {
        "marked_expired": 0, "attempts": {}, "checked": 1, "changed": 0, "drift": 0, "not_found": 0, "errors": 0,
        "fetched": 1}


# New commands -----------------------------------------------------------------------------------


def _callbacks(app, engine) -> tuple[str, str]:
    """Three stored callbacks: two of one session (the second failed), one of another; the sessions."""
    first, other = "5a1c0e6e-0000-4000-8000-00000000c001", "5a1c0e6e-0000-4000-8000-00000000c002"
    for uuid, minute in ((first, 0), (other, 1), (first, 2)):
        params = {"EventName": "SessionTimeout", "SessionUUID": uuid, "EventTimestamp": f"2026-11-20 10:0{minute}:00"}
        assert store_callback(app, "session", params) == "recorded"
    with engine.begin() as conn:
        conn.execute(text("UPDATE callback_inbox SET status = 'failed', error = :error, received_at = now()"
                          " WHERE id = 3"), {"error": "ValueError: " + "a long reason " * 10})
        conn.execute(text("UPDATE callback_inbox SET received_at = '2026-01-01T00:00:00Z' WHERE id = 1"))
    return first, other


def test_callbacks_list_shows_id_received_endpoint_event_status_error_newest_first(app, engine):
    first, other = _callbacks(app, engine)
    lines = invoke(app, "callbacks", "list").splitlines()
    assert lines[0].split() == ["id", "received", "endpoint", "event", "status", "error"]
    assert [line.split()[0] for line in lines[2:]] == ["3", "2", "1"]
    assert lines[2].split()[2:5] == ["session", "SessionTimeout", "failed"] and lines[2].endswith("…")
    assert "2026-01-01T00:00:00+00:00" in lines[4]
    assert [line.split()[0] for line in invoke(app, "callbacks", "list", "--failed").splitlines()[2:]] == ["3"]
    assert [line.split()[0] for line in invoke(app, "callbacks", "list", "--session", first.upper()
                                               ).splitlines()[2:]] == ["3", "1"]
    assert [line.split()[0] for line in invoke(app, "callbacks", "list", "--since", "2026-06-01"
                                               ).splitlines()[2:]] == ["3", "2"]
    [row] = json.loads(invoke(app, "callbacks", "list", "--failed", "--format", "json"))
    assert row["id"] == 3 and row["session_uuid"] == first and row["error"] == "ValueError: " + "a long reason " * 10


def test_sessions_list_and_show_give_the_apis_data_without_curl(app, live, sandbox, auth):
    uuids = [create_session(live, external_ref=f"order-{n}") for n in range(3)]
    play(sandbox, uuids[0], deliver=True)
    settle(live.app)
    api = requests.get(live.url + "/v1/sessions", headers=auth, params={"limit": 2}, timeout=10).json()
    assert json.loads(invoke(app, "sessions", "list", "--limit", "2", "--format", "json")) == api
    lines = invoke(app, "sessions", "list", "--limit", "2").splitlines()
    assert lines[0].split() == ["session_uuid", "status", "created", "virtual_number", "first_party", "second_party",
                                "call_count", "external_ref"]
    assert [line.split()[0] for line in lines[2:4]] == [uuids[2], uuids[1]]
    assert lines[-1] == f"more: --cursor {api['next_cursor']}"
    rest = invoke(app, "sessions", "list", "--cursor", api["next_cursor"]).splitlines()
    assert [line.split()[0] for line in rest[2:]] == [uuids[0]]
    assert invoke(app, "sessions", "list", "--external-ref", "order-1").splitlines()[2].split()[0] == uuids[1]

    shown = requests.get(f"{live.url}/v1/sessions/{uuids[0]}", headers=auth, timeout=10).json()
    assert json.loads(invoke(app, "sessions", "show", uuids[0].upper(), "--format", "json")) == shown
    table = invoke(app, "sessions", "show", uuids[0])
    fields = dict(line.split(None, 1) for line in table.split("\n\n")[0].splitlines() if len(line.split()) > 1)
    assert fields["session_uuid"] == uuids[0] and fields["call_count"] == "2" and fields["external_ref"] == "order-0"
    assert "\ncall legs (2)\nparty " in table and "\nrecordings (0)\n" in table
    assert invoke(app, "report", "session", uuids[0].upper()) == invoke(app, "report", "session", uuids[0])


def test_sessions_list_refuses_a_bad_filter_as_a_usage_error(database_url, sandbox):
    done = flask(["sessions", "list", "--status", "open"], database_url, sandbox.url)
    assert done.returncode == 2
    assert "--status must be one of" in done.stderr and "Traceback" not in done.stderr


# Progress ---------------------------------------------------------------------------------------


def _on_a_terminal(args: list[str], database_url: str, sandbox_url: str) -> tuple[int, str, str]:
    """The command with its stderr on a pseudo-terminal (as in a shell): exit code, stdout, what the terminal got."""
    env = environ_without_settings() | settings_env(sandbox_url) | {"DATABASE_URL": database_url, "COLUMNS": "100"}
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "webhook_service:create_app()", *args],
                            env=env, stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed the terminal (it ended)
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    stdout = proc.stdout.read()
    return proc.wait(timeout=60), stdout, shown.decode()


def _failed_callbacks(engine, count: int) -> None:
    with engine.begin() as conn:
        for n in range(count):
            params = {"EventName": "SessionTimeout", "SessionUUID": f"5a1c0e6e-0000-4000-8000-{n:012d}",
                      "EventTimestamp": "2026-11-20 10:00:00"}
            # Received, and (its partition's month) sent, 100 days ago: a month a prune drops whole.
            conn.execute(text("INSERT INTO callback_inbox (received_at, event_month, endpoint, method, params,"
                              " dedupe_key, status, error) VALUES (now() - interval '100 days',"
                              " date_trunc('month', now() - interval '100 days')::date, 'session', 'POST',"
                              " CAST(:p AS jsonb), :k, 'failed', 'stranded')"),
                         {"p": json.dumps(params), "k": f"progress-{n}"})


@pytest.mark.parametrize(("args", "label", "said"), [
    (["callbacks", "replay"], "replaying", "recorded"),
    (["callbacks", "prune", "--batch-size", "7"], "pruning callbacks", "Deleted 25"),
], ids=["replay", "prune"])
def test_long_work_shows_progress_on_a_terminal_and_nothing_when_not(engine, database_url, sandbox, args, label,
                                                                     said):
    _failed_callbacks(engine, 25)
    if args[1] == "prune":  # recorded ones are what a prune deletes
        with engine.begin() as conn:
            conn.execute(text("UPDATE callback_inbox SET status = 'recorded', error = NULL"))
    code, stdout, terminal = _on_a_terminal(args, database_url, sandbox.url)
    assert code == 0, terminal
    assert f"{label}  [####" in terminal and "25/25" in terminal, terminal
    assert said in stdout and label not in stdout  # the result on stdout, the bar on the terminal only

    if args[1] == "prune":
        _failed_callbacks(engine, 25)
    with engine.begin() as conn:
        conn.execute(text("UPDATE callback_inbox SET status = :s, error = NULL"),
                     {"s": "recorded" if args[1] == "prune" else "failed"})
    quiet = flask(args, database_url, sandbox.url)  # stderr a pipe, as under cron or a process manager
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and said in quiet.stdout


def test_reconcile_shows_its_progress_over_the_sessions_on_a_terminal(app, auth, database_url, sandbox):
    for n in range(4):
        created = app.test_client().post("/v1/sessions", headers=auth,
                                         json={"first_party": f"+1415555010{n}", "second_party": "+14155550199"})
        assert created.status_code == 201, created.get_data(as_text=True)
    code, stdout, terminal = _on_a_terminal(["sessions", "reconcile"], database_url, sandbox.url)
    assert code == 0, terminal
    assert "reconciling  [####" in terminal and "4/4" in terminal, terminal
    assert "checked         4" in stdout.splitlines()
