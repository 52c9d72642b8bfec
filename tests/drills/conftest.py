"""Fixtures of the fault drills: one private PostgreSQL cluster per run, a database, the sandbox and services per drill.

None of these fixtures is named like the suite's own (`engine`, `app`, `database_url`, `sandbox`), so
the suite's autouse table cleaning never touches the drills' databases, and the drills never start
the project's development PostgreSQL under `.pgdata/`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from .harness import GunicornService, PgCluster, Sandbox, new_engine

_REPORTS: list[tuple[str, dict[str, Any]]] = []


class DrillReport(dict):
    """A drill's measurements, with the time each phase took (`phase("load")` ends the current phase)."""

    def __init__(self) -> None:
        super().__init__()
        self._started = self._mark = time.monotonic()
        self._phases: dict[str, float] = {}

    def phase(self, name: str) -> None:
        """Record the time since the previous phase ended as `name`'s."""
        now = time.monotonic()
        self._phases[name] = round(now - self._mark, 1)
        self._mark = now

    def finish(self) -> None:
        if self._phases:
            self["phases, s"] = self._phases
        self["drill seconds"] = round(time.monotonic() - self._started, 1)


@pytest.fixture(scope="session")
def drill_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def drill_db(drill_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for one drill; its URL."""
    name = "drill_" + re.sub(r"\W", "_", request.node.name)[:50]
    drill_cluster.ensure_running()
    url = drill_cluster.create_database(name)
    try:
        yield url
    finally:
        # A drill that failed with the server down must not leave it so for the next one.
        drill_cluster.ensure_running()
        drill_cluster.drop_database(name)


@pytest.fixture
def drill_engine(drill_db: str) -> Iterator[Engine]:
    """An engine on the drill's database, for the checker."""
    engine = new_engine(drill_db)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def drill_sandbox() -> Iterator[Sandbox]:
    sandbox = Sandbox().start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., GunicornService]]:
    """Start gunicorn instances (`start_service(env, name=…)`); every one is stopped at the end.

    With `wait=False` the instance is only launched: call its `wait_started()` (instances then boot
    side by side, which on two cores saves seconds).
    """
    started: list[GunicornService] = []

    def start(env: Mapping[str, str], name: str = "service", *, wait: bool = True) -> GunicornService:
        service = GunicornService(tmp_path, env, name=name)
        started.append(service)
        return service.start() if wait else service.launch()

    try:
        yield start
    finally:
        for service in started:
            service.stop()


@pytest.fixture
def drill_report(request: pytest.FixtureRequest) -> Iterator[DrillReport]:
    """The drill's measurements (a dict), printed in the terminal summary whatever the outcome."""
    report = DrillReport()
    try:
        yield report
    finally:
        report.finish()
        _REPORTS.append((request.node.name, report))


def pytest_terminal_summary(terminalreporter) -> None:
    if not _REPORTS:
        return
    terminalreporter.section("fault drills: measurements")
    for name, report in _REPORTS:
        terminalreporter.write_line(name)
        for key, value in report.items():
            terminalreporter.write_line(f"    {key}: {value}")
