"""`make run` as a newcomer runs it, in a process of its own on free ports: web, sandbox and worker start,
Ctrl-C or SIGTERM stops all of them within 10 s leaving the ports free, and a second one refuses at once.

Each run gets its own empty database (migrated by `make run` itself) and its own TMPDIR. The processes
are found through psutil, so that a test that fails still kills every one it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from sqlalchemy import create_engine, text

from webhook_service.persistence.db import sqlalchemy_url

from .helpers import FIRST, SECOND, environ_without_settings, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
STOP_WITHIN = 10.0  # seconds, from the signal to every process gone and every port free


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class MakeRun:
    """`make run` in its own session (so that a Ctrl-C can be sent to its process group), its output in a file."""

    def __init__(self, tmp_path: Path, database_url: str, *, web_port: int | None = None,
                 sandbox_port: int | None = None, name: str = "make-run", **settings: str):
        self.web_port = web_port or free_port()
        self.sandbox_port = sandbox_port or free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.sandbox_url = f"http://127.0.0.1:{self.sandbox_port}"
        self.tmp = tmp_path / f"{name}-tmp"
        self.tmp.mkdir()
        self.log = tmp_path / f"{name}.log"
        self.env = environ_without_settings() | {
            "DATABASE_URL": database_url, "PORT": str(self.web_port), "PLIVO_API_BASE_URL": self.sandbox_url,
            "PUBLIC_BASE_URL": self.url, "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1"} | settings
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}

    def start(self) -> MakeRun:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def processes(self) -> list[psutil.Process]:
        """make's descendants now (each also remembered, to be killed if the test fails)."""
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        self.seen.update((p.pid, p) for p in found)
        return found

    def commands(self) -> list[str]:
        names = []
        for process in self.processes():
            try:
                names.append(" ".join(process.cmdline()))
            except psutil.NoSuchProcess:
                pass
        return names

    def wait_serving(self, timeout: float = 60.0) -> MakeRun:
        """Until the web answers /readyz, the sandbox its health check, and the worker runs."""
        def serving() -> bool:
            worker = any(command.endswith(" worker") for command in self.commands())
            return worker and answers(self.url + "/readyz") and answers(self.sandbox_url + "/sandbox/healthz")

        assert wait_until(serving, timeout=timeout, alive=lambda: self.proc.poll() is None), self.output()
        self.processes()
        return self

    def output(self) -> str:
        return self.log.read_text()

    def kill_everything(self) -> None:
        """What a failed test leaves: make and every process it started, SIGKILLed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.processes()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for process in self.seen.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def make_runs(tmp_path) -> Iterator[list[MakeRun]]:
    runs: list[MakeRun] = []
    yield runs
    for run in runs:
        run.kill_everything()


@pytest.fixture
def run_database(scratch_url) -> str:
    """An empty database: `make run` applies the migrations itself."""
    return scratch_url


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_make_run_stops_web_sandbox_and_worker_within_10s_leaving_their_ports_free(make_runs, run_database, tmp_path,
                                                                                     stop):
    run = MakeRun(tmp_path, run_database).start()
    make_runs.append(run)
    run.wait_serving()
    started = run.processes()
    commands = run.commands()
    assert any("plivo_sandbox" in c for c in commands), commands
    assert sum("gunicorn" in c for c in commands) >= 3, commands  # the master and two workers
    assert any(c.endswith(" worker") for c in commands), commands
    metrics = [p.name for p in run.tmp.iterdir() if p.name.startswith("webhook-service-metrics-")]
    assert len(metrics) == 1, metrics

    signalled = time.monotonic()
    if stop == "ctrl-c":
        os.killpg(run.proc.pid, signal.SIGINT)  # what the terminal sends its foreground process group
    else:
        run.proc.send_signal(signal.SIGTERM)  # make alone, as a process manager or `kill` does
    run.proc.wait(timeout=STOP_WITHIN + 5)
    assert wait_until(lambda: all(gone(p) for p in started), timeout=STOP_WITHIN - (time.monotonic() - signalled))
    assert wait_until(lambda: bindable(run.web_port) and bindable(run.sandbox_port), timeout=1)
    assert time.monotonic() - signalled < STOP_WITHIN
    assert list(run.tmp.iterdir()) == []  # the metrics folder went with it
    assert "Traceback" not in run.output(), run.output()


def test_make_run_runs_the_worker_which_projects_what_callbacks_stored(make_runs, run_database, tmp_path):
    run = MakeRun(tmp_path, run_database).start()
    make_runs.append(run)
    run.wait_serving()
    headers = {"Authorization": "Bearer dev-token"}
    created = requests.post(run.url + "/v1/sessions", headers=headers, timeout=10,
                            json={"first_party": FIRST, "second_party": SECOND})
    assert created.status_code == 201, created.text
    uuid = created.json()["session_uuid"]
    played = requests.post(f"{run.sandbox_url}/sandbox/sessions/{uuid}/calls", json={"vocabulary": "latest"},
                           timeout=30)
    assert played.status_code == 200, played.text
    engine = create_engine(sqlalchemy_url(run_database))
    try:
        def projected() -> bool:  # by the worker: `make run`'s web processes do not project (PROJECT_IN_WEB)
            with engine.connect() as conn:
                return conn.execute(text("SELECT call_count FROM masking_sessions WHERE session_uuid = :u"),
                                    {"u": uuid}).scalar() == 2 and not conn.execute(
                    text("SELECT count(*) FROM projection_queue")).scalar()

        assert wait_until(projected, timeout=30), run.output()
    finally:
        engine.dispose()
    os.killpg(run.proc.pid, signal.SIGINT)
    run.proc.wait(timeout=STOP_WITHIN + 5)


def test_a_second_make_run_names_the_taken_port_and_what_holds_it_and_exits_at_once(make_runs, run_database,
                                                                                       tmp_path):
    first = MakeRun(tmp_path, run_database, name="first").start()
    make_runs.append(first)
    first.wait_serving()
    second = MakeRun(tmp_path, run_database, web_port=free_port(), sandbox_port=first.sandbox_port, name="second")
    make_runs.append(second)
    started = time.monotonic()
    second.start().proc.wait(timeout=30)
    assert second.proc.returncode != 0
    assert time.monotonic() - started < 10  # at once: nothing was started, nothing retried
    said = second.output()
    assert f"port {first.sandbox_port} (sandbox) is already taken by pid" in said, said
    assert "plivo_sandbox" in said  # what holds it
    assert "Traceback" not in said and "Address already in use" not in said
    assert answers(first.url + "/readyz")  # the first one is untouched
    os.killpg(first.proc.pid, signal.SIGINT)
    first.proc.wait(timeout=STOP_WITHIN + 5)


def test_make_run_refuses_a_taken_web_port_naming_what_holds_it_without_its_passwords(run_database, tmp_path):
    import sys

    port = free_port()
    listen = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[2]))); s.listen(); " \
             "print('ready', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", listen, "postgresql://bob:s3cret@db.example.com/x", str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        run = MakeRun(tmp_path, run_database, web_port=port).start()
        try:
            run.proc.wait(timeout=30)
        finally:
            run.kill_everything()
    finally:
        holder.kill()
        holder.wait()
    said = run.output()
    assert run.proc.returncode != 0
    assert f"port {port} (web) is already taken by pid {holder.pid} (" in said, said
    assert "postgresql://bob:***@db.example.com/x" in said and "s3cret" not in said


def test_make_stop_db_stops_the_embedded_postgresql_keeping_its_data_and_clean_db_deletes_it():
    import shutil
    import tempfile

    import psycopg

    base = Path(tempfile.mkdtemp(prefix="devdb-test-"))
    env = environ_without_settings() | {"EMBEDDED_PGDATA": str(base / "pgdata")}

    def development_database() -> str:  # starts the server if it is not running, as `make run` does
        done = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "webhook_service.devdb"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        assert done.stderr == ""
        return done.stdout.strip()

    def make(target: str) -> str:
        done = subprocess.run(["make", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        with psycopg.connect(development_database(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('still here')")
        assert "stopped the embedded PostgreSQL" in make("stop-db")
        assert not (base / "pgdata" / "postmaster.pid").exists()
        assert "is not running" in make("stop-db")  # stopping it again says so
        with psycopg.connect(development_database()) as conn:  # started again, with its data
            assert conn.execute("SELECT note FROM kept").fetchone() == ("still here",)
        assert "deleted its data" in make("clean-db")
        assert not (base / "pgdata").exists()
    finally:
        subprocess.run(["make", "clean-db"], cwd=ROOT, env=env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_make_psql_opens_psql_on_the_database_for_the_reporting_queries(database_url):
    env = environ_without_settings() | {"DATABASE_URL": database_url}
    done = subprocess.run(["make", "--silent", "psql"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          input="SELECT count(*) >= 0 AS readable FROM reporting.session_summary;\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["readable", "----------", "t", "(1", "row)"]


# A newcomer's first hour, as the README tells it ------------------------------------------------------

README = (ROOT / "README.md").read_text()


def readme_shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)


def on_ports(command: str, run: MakeRun) -> str:
    """The README's command for this run's ports (the README's are 8000 and 8001)."""
    return command.replace("127.0.0.1:8000", f"127.0.0.1:{run.web_port}").replace(
        "127.0.0.1:8001", f"127.0.0.1:{run.sandbox_port}")


def test_a_newcomers_first_hour_as_the_readme_tells_it(make_runs, run_database, tmp_path):
    quick_start, snippet, *commands = readme_shell_blocks()
    assert [line.split("#")[0].strip() for line in quick_start.splitlines()] == ["make run", "make test"]
    [look] = re.findall(r"`(curl -s http://127\.0\.0\.1:8000/v1/sessions/\$uuid [^`]*)`", README)
    run = MakeRun(tmp_path, run_database).start()
    make_runs.append(run)
    run.wait_serving()
    started = run.processes()
    shell = environ_without_settings() | {"DATABASE_URL": run_database}  # what the newcomer's shell holds

    def bash(script: str, **variables: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=shell | variables, capture_output=True, text=True,
                              timeout=120)

    # The snippet, ten times: each plays its call (the sandbox's pool has a hundred numbers per country).
    uuids = []
    for _ in range(10):
        done = bash(on_ports(snippet, run) + '\nstatus=$?; echo "uuid=$uuid"; exit $status')
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        uuid = done.stdout.rsplit("uuid=", 1)[1].strip()
        assert json.loads(done.stdout.rsplit("uuid=", 1)[0])["callbacks"]  # the call the sandbox played
        session = json.loads(bash(on_ports(look, run), uuid=uuid).stdout)
        assert (session["call_count"], len(session["call_legs"]), session["recording_count"]) == (2, 2, 1), session
        uuids.append(uuid)
    assert len(set(uuids)) == 10
    # When the API refuses (Plivo answers an error), the snippet says the API's own message, no traceback.
    sandbox = f"http://127.0.0.1:{run.sandbox_port}"
    requests.post(f"{sandbox}/sandbox/faults", timeout=5, json=[
        {"method": "POST", "path_contains": "/Masking/Session", "status": 400,
         "body": {"api_id": "fault", "error": "Number pool exhausted or not available"}}]).raise_for_status()
    done = bash(on_ports(snippet, run) + '\nstatus=$?; echo "uuid=$uuid"; exit $status')
    assert done.returncode != 0 and "Traceback" not in done.stderr and done.stdout == "uuid=\n", done
    answer = requests.post(run.url + "/v1/sessions", headers={"Authorization": "Bearer dev-token"}, timeout=10,
                           json={"first_party": FIRST, "second_party": SECOND}).json()
    assert done.stderr == answer["message"] + "\n"  # the API's message, word for word
    requests.delete(f"{sandbox}/sandbox/faults", timeout=5).raise_for_status()

    # The README's other examples, as written (its commands, with $uuid from the snippet).
    for command in commands:  # curl fails on an error answer too (-f), as a reader would notice one
        done = bash(on_ports(command, run).replace("curl -s ", "curl -sf "), uuid=uuids[0])
        assert done.returncode == 0, command + done.stdout + done.stderr
        assert "Traceback" not in done.stderr
    # A round trip through the CLI.
    flask = str(ROOT / ".venv/bin/flask")
    listed = bash(f"{flask} --app webhook_service sessions list --limit 100 --format json")
    assert {s["session_uuid"] for s in json.loads(listed.stdout)["sessions"]} == set(uuids)
    shown = json.loads(bash(f"{flask} --app webhook_service sessions show {uuids[0].upper()} --format json").stdout)
    assert shown["call_count"] == 2 and shown["recording_count"] == 1
    callbacks = json.loads(bash(f"{flask} --app webhook_service callbacks list --session {uuids[0]} --format json"
                                ).stdout)
    assert len(callbacks) >= 5 and {c["status"] for c in callbacks} == {"recorded"}
    replayed = bash(f"{flask} --app webhook_service callbacks replay --id {callbacks[0]['id']}")
    assert (replayed.returncode, replayed.stdout.split()) == (0, ["outcome", "callbacks", "--------", "---------",
                                                                  "recorded", "1"]), replayed.stderr

    # Ctrl-C, and every process gone and every port free.
    signalled = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)
    run.proc.wait(timeout=STOP_WITHIN + 5)
    assert wait_until(lambda: all(gone(p) for p in started), timeout=STOP_WITHIN - (time.monotonic() - signalled))
    assert bindable(run.web_port) and bindable(run.sandbox_port)
    assert "Traceback" not in run.output(), run.output()
