"""The operator's commands as scripts use them: help alone on --help, one line and exit code 2 for a bad
setting, exit code 1 when they fail, results printed once (a table, or JSON with --format json), the
new `callbacks list` and `sessions list|show`, and progress bars on a terminal only.

Exit codes, stdout and stderr are read from the real `flask` command in a process of its own; the
output of a command's table is read through Flask's CLI runner.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import (
    environ_without_settings,
    flask_command,
    settings_env,
)

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


HELP = [["--help"], ["sessions", "--help"], ["callbacks", "replay", "--help"], ["worker", "--help"],
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
