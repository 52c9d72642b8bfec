"""The deployment files in deploy/ are what docs/deploy.md says and what the tools accept."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
INSTALLED_AT = "/opt/masking-service"


def procfile() -> dict[str, list[str]]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name: shlex.split(command) for name, command in (line.split(":", 1) for line in lines if line.strip())}


def exec_start(unit: Path) -> list[str]:
    line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path):
    # As installed, but in this checkout: verify checks that each ExecStart program exists.
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_AT, str(ROOT)))
    checked = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not checked.stderr.strip(), checked.stderr


def test_the_systemd_units_run_the_procfiles_commands():
    commands = procfile()
    assert set(commands) == {"web", "worker", "release"}
    for name, command in commands.items():
        program, *arguments = exec_start(ROOT / "deploy" / "systemd" / f"masking-{name}.service")
        assert program == f"{INSTALLED_AT}/.venv/bin/{command[0]}", (name, program)
        assert arguments == [a.strip("'") for a in command[1:]], (name, arguments)
