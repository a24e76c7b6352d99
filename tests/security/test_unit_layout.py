"""A gateway laid out as systemd/bitfusion-gateway.service lays it out (unit_layout.py): first
smoke tests of the fixture itself, then the hostile-tenant tests of issue #17 against that
layout, where the gateway is a non-root service user whose home is the state directory and
every share runs as that same user, so that only the share's sandbox stands between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.test_sandbox import (
    PLANTS_A_PTH,
    PROBE,
    _as,
    _cell,
    _entries,
    _tree_hash,
    _wheel,
    needs_bwrap,
    spawn_with_cwd,
)
from tests.security.unit_layout import (
    SYSTEMD_PATH,
    UnitGateway,
    describe,
    live_output,
    proc_environ,
    proc_status,
    service_python,
)
from tests.support.kernels import ready, start_shim_kernel
from tests.support.waiting import WAIT_S, wait_for

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


# --- hostile tenants under the unit (issue #17) ------------------------------------------------
# The tests above check the fixture; these check what two users, alice and mallory, can reach
# of a gateway laid out as the unit lays it out: a service user whose home is the hidden state
# directory, shares run as that same user, the gateway's Python a venv outside /usr.


def _share(gw: UnitGateway, user: str, script: str) -> subprocess.CompletedProcess:
    """``script`` run by `sh` in a share of ``user``'s, in their server home."""
    return gw.bf("run", "-m", "1024", "--no-files", "--", "sh", "-c", script, user=user)


def _probe(gw: UnitGateway, user: str, paths: list[str]) -> dict[str, list[str]]:
    """What a share of ``user``'s can open, stat, list and write of ``paths`` (the share's
    own python3: the suite's interpreter, under /root, is not in a share)."""
    r = gw.bf("run", "-m", "1024", "--no-files", "--", "python3", "-c", PROBE, *paths, user=user)
    assert r.returncode == 0, f"{r.stderr}\n{describe(gw)}"
    return json.loads(r.stdout)


def _home(gw: UnitGateway, user: str) -> Path:
    """``user``'s home on the host, made now if no share made it yet, as the gateway makes
    it: the service user's, 0700 (root's would lock the gateway out)."""
    homes = gw.state_dir / "homes"
    for folder in (homes, homes / user):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            os.chown(folder, gw.uid, gw.gid)
    return homes / user


def _site_packages(gw: UnitGateway) -> Path:
    """The site-packages of the environment the unit gateway offers (its venv's)."""
    return next((gw.python.parent.parent / "lib").glob("python3*/site-packages"))


@contextlib.contextmanager
def _sleeping(gw: UnitGateway, user: str, seconds: str) -> Iterator[int]:
    """A share of ``user``'s running `sleep SECONDS` (an odd number, to find it by), and the
    host PID of that sleep."""
    proc = gw.bf_background("run", "-m", "1024", "--", "sleep", seconds, user=user)
    try:
        assert wait_for(lambda: _pid_of(f"^sleep {seconds}$") is not None, WAIT_S), (
            proc.poll(),
            describe(gw),
        )
        yield _pid_of(f"^sleep {seconds}$") or 0
    finally:
        proc.kill()
        proc.communicate()


def _pid_of(pattern: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    pids = out.stdout.split()
    return int(pids[0]) if out.returncode == 0 and len(pids) == 1 else None


@needs_bwrap
def test_run_files_as_the_unit_lays_it_out(unit: UnitGateway, tmp_path_factory) -> None:
    """The client's folder (issue #19) under the documented service user, not root: the
    sandbox mounts it as root of the user's namespace, the command runs as the service user
    with no capability, and what it writes is the client's."""
    import shutil

    from tests.security.test_files_mount import pytestmark as needs_files

    if needs_files.args[0]:
        pytest.skip(needs_files.kwargs["reason"])
    folder = Path("/var/tmp") / f"bf-unit-files-{os.getpid()}"
    folder.mkdir()
    try:
        (folder / "data.csv").write_text("a,b\n")
        script = (
            "import os; print(os.getuid(), os.getcwd(), open('data.csv').read().strip(),"
            " open('/proc/self/status').read().split('CapEff:')[1].split()[0]);"
            "open('out.txt', 'w').write('from the unit')"
        )
        r = unit.bf("run", "-m", "1024", "--files", str(folder), "--", "python3", "-c", script)
        assert r.returncode == 0, f"{r.stderr}\n{describe(unit)}"
        assert r.stdout.split() == [str(unit.uid), str(folder), "a,b", "0000000000000000"]
        assert (folder / "out.txt").read_text() == "from the unit"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_unit_gateway_says_its_shares_are_sandboxed(unit: UnitGateway) -> None:
    log = unit.log()
    line = next((ln for ln in log.splitlines() if ln.strip().startswith("shares:")), "")
    assert "shares: sandboxed by bubblewrap" in line, describe(unit)
    for word in ("NOT confined", "UNCONFINED", "REFUSED"):
        assert word not in log, describe(unit)
    assert f"users' homes on this server: {unit.state_dir}/homes/USER" in log


@needs_bwrap
def test_a_share_reaches_nothing_of_the_state_dir_or_anothers_home(unit: UnitGateway) -> None:
    r = _share(unit, "alice", "echo 'alice weights' > model.txt")
    assert r.returncode == 0, f"{r.stderr}\n{describe(unit)}"
    alice_home = unit.state_dir / "homes" / "alice"
    assert (alice_home / "model.txt").read_text() == "alice weights\n"
    # While a share of alice's runs: its files of the gateway's are there to be tried too.
    with _sleeping(unit, "alice", "63.25"):
        entries = _entries(unit.state_dir)  # as root, who can
        names = {Path(p).name for p in entries}
        assert {"admin.token", "keys", "ledger.sqlite3", "run", "homes", "model.txt"} <= names
        # alice's home at the host's path and where her own shares see it.
        inside = [f"/home/alice/{Path(p).relative_to(alice_home)}" for p in _entries(alice_home)]
        paths = [*entries, *inside]
        reached = _probe(unit, "mallory", paths)
    assert set(reached) == set(paths)  # every one tried
    assert {p: got for p, got in reached.items() if got} == {}
    r = _share(unit, "mallory", f"cat {unit.state_dir}/admin.token")
    assert r.returncode != 0 and "No such file or directory" in r.stderr, r.stdout
    assert "bf1." not in r.stdout
    r = _share(unit, "mallory", "ls -A /home")
    assert r.returncode == 0 and r.stdout.split() == ["mallory"], r.stdout


@needs_bwrap
def test_a_spawn_whose_cwd_is_the_state_dir_runs_in_the_users_home(unit: UnitGateway) -> None:
    script = f"pwd; cat {unit.state_dir}/admin.token; ls {unit.state_dir}/keys"
    text = spawn_with_cwd(unit, "mallory", str(unit.state_dir), script)
    assert text.splitlines()[0] == "/home/mallory", f"{text}\n{describe(unit)}"
    assert "No such file or directory" in text and "bf1." not in text, text


@needs_bwrap
def test_a_kernel_starts_under_the_unit_with_its_users_home(
    unit: UnitGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gateway's own HOME is the state dir, which no share may see: the kernel's is not it.
    assert proc_environ(unit.proc.pid)["HOME"] == str(unit.state_dir)
    _as(unit, monkeypatch, "alice")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(
            kc,
            "import os, IPython\n"
            "print(os.environ['HOME'], IPython.paths.get_ipython_dir())\n"
            "os.makedirs(os.path.expanduser('~/.cache/torch'), exist_ok=True)\n"
            "open(os.path.expanduser('~/.cache/torch/cached'), 'w').write('ok')",
        )
        assert content["status"] == "ok", f"{out}\n{describe(unit)}"
        assert out.split() == ["/home/alice", "/home/alice/.ipython"], out
    cached = unit.state_dir / "homes" / "alice" / ".cache" / "torch" / "cached"
    assert cached.read_text() == "ok"
    assert cached.stat().st_uid == unit.uid


@needs_bwrap
def test_pip_install_in_a_kernel_is_for_that_user_alone(
    unit: UnitGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    offered = _site_packages(unit)
    before = _tree_hash(str(offered))
    wheel = _wheel(_home(unit, "alice"))
    os.chown(wheel, unit.uid, unit.gid)
    _as(unit, monkeypatch, "alice")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(kc, f"%pip install --no-index --no-deps ~/{wheel.name}")
        assert content["status"] == "ok", f"{out}\n{describe(unit)}"
        assert "Successfully installed bftestpkg" in out, out
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):  # alice's next kernel
        content, out = _cell(kc, "import bftestpkg; print(bftestpkg.WHO)")
        assert content["status"] == "ok" and "bftestpkg works" in out, out
    _as(unit, monkeypatch, "mallory")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(kc, "import bftestpkg")
        assert content["status"] == "error" and content["ename"] == "ModuleNotFoundError", out
    assert not list(offered.glob("bftestpkg*"))
    assert _tree_hash(str(offered)) == before  # the offered environment never changed


@needs_bwrap
def test_a_share_sees_and_signals_only_its_own_processes(unit: UnitGateway) -> None:
    with _sleeping(unit, "alice", "64.75") as victim:
        r = _share(unit, "mallory", f"ps -e -o pid=,comm=; kill -9 {victim}; echo kill=$?")
        names = [line.split()[1] for line in r.stdout.splitlines() if line[:1] == " "]
        assert "ps" in names and "sleep" not in names, r.stdout
        assert len(names) <= 4, r.stdout  # bwrap's init, sh, ps
        assert "bitfusion" not in names and "python3" not in names, r.stdout
        assert "kill=0" not in r.stdout, r.stdout
        assert _pid_of("^sleep 64.75$") == victim  # alice's share runs on
    # The gateway runs as the very user the share runs as: only the sandbox stands between.
    r = _share(unit, "mallory", f"kill -TERM {unit.proc.pid}; echo kill=$?")
    assert "kill=" in r.stdout and "kill=0" not in r.stdout, f"{r.stdout}{r.stderr}"
    time.sleep(0.5)
    assert unit.proc.poll() is None, describe(unit)
    r = unit.bf("list_gpus", user="alice")
    assert r.returncode == 0, f"{r.stderr}\n{describe(unit)}"  # still serving


@needs_bwrap
def test_the_service_home_is_writable_but_a_share_cannot_write_the_venv(
    unit: UnitGateway,
) -> None:
    # The gateway writes its home (the state dir): its ledger and keys are its own.
    for name in ("admin.token", "ledger.sqlite3", "keys"):
        assert (unit.state_dir / name).stat().st_uid == unit.uid, name
    wrote = subprocess.run(
        [*unit.as_service(), "sh", "-c", 'touch "$HOME/.written" && rm "$HOME/.written"'],
        capture_output=True,
        text=True,
        env=unit.service_env(),
        cwd="/",
    )
    assert wrote.returncode == 0, wrote.stderr
    # A share cannot plant code in the venv the gateway and its kernels run from.
    site_dir = _site_packages(unit)
    before = sorted(os.listdir(site_dir))
    prefix = unit.python.parent.parent
    targets = [str(site_dir), str(prefix), str(prefix / "bin"), str(site_dir / "gateway")]
    r = unit.bf("run", "-m", "1024", "--", "python3", "-c", PLANTS_A_PTH, *targets,
                user="mallory")  # fmt: skip
    assert r.returncode == 0, f"{r.stderr}\n{describe(unit)}"
    assert "WROTE" not in r.stdout, r.stdout
    assert r.stdout.count("Read-only file system") == len(targets), r.stdout
    assert sorted(os.listdir(site_dir)) == before
