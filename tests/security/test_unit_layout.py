"""Smoke tests of unit_layout's gateway: it runs as systemd/bitfusion-gateway.service says.

Only the fixture is checked here; what that layout must keep out is for the security tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.unit_layout import (
    SYSTEMD_PATH,
    UnitGateway,
    describe,
    live_output,
    proc_environ,
    proc_status,
    service_python,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the unit-layout gateway runs as a system user"
)


@pytest.fixture(scope="module")
def unit(pytestconfig: pytest.Config) -> Iterator[UnitGateway]:
    with live_output(pytestconfig):
        service_python()  # the first build takes a while and says what it does
    with UnitGateway() as gw:
        yield gw


def test_runs_as_the_unit_says(unit: UnitGateway) -> None:
    pid = unit.proc.pid
    status = proc_status(pid)
    assert status["Uid"].split() == [str(unit.uid)] * 4, describe(unit)
    assert status["Gid"].split() == [str(unit.gid)] * 4
    assert status["NoNewPrivs"] == ("1" if unit.unit.no_new_privileges else "0")
    if unit.unit.capability_bounding_set == "":
        assert int(status["CapBnd"], 16) == 0
    assert int(status["Umask"], 8) == unit.unit.umask
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    env = proc_environ(pid)
    assert env["HOME"] == str(unit.state_dir)
    assert env["USER"] == env["LOGNAME"] == unit.user_name
    assert env["PATH"] == SYSTEMD_PATH
    # From the service venv, not from this checkout or the suite's Python.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1].decode() == str(unit.python.parent / "bitfusion"), cmdline
    assert b"--simulate-gpus" in cmdline


def test_state_dir_is_the_service_users_alone(unit: UnitGateway) -> None:
    st = unit.state_dir.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (unit.uid, 0o700)
    assert (unit.state_dir.parent.stat().st_mode & 0o777) == 0o755


def test_list_gpus(unit: UnitGateway) -> None:
    r = unit.bf("list_gpus")
    assert r.returncode == 0, f"{r.stderr}\n{describe(unit)}"
    assert r.stdout.count("16") >= 2, r.stdout


def test_run_echo(unit: UnitGateway) -> None:
    r = unit.bf("run", "-m", "1024", "--", "echo", "hi")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{describe(unit)}"
    assert "hi" in r.stdout.splitlines(), r.stdout
