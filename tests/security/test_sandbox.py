"""What code in a share can reach of the server, tried as a hostile tenant would: two users,
mallory and alice, each with their own token, on a gateway with a simulated pool.

Every share runs in a bubblewrap sandbox built for it: the system read-only, the user's own
home, a private /tmp, its own processes. The state directory and other users' homes are not
there at all. Each finding of the first hostile-tenant review (issue #17) has its own test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from gateway import landlock, sandbox
from remoting import protocol
from tests.support.env import REPO
from tests.support.kernels import ready, start_shim_kernel
from tests.support.waiting import WAIT_S, wait_for
from tests.support.wire import connect

needs_bwrap = pytest.mark.skipif(
    sandbox.check(True).refuse, reason="bubblewrap cannot make a sandbox on this machine"
)
pytestmark = needs_bwrap

# Tries open, stat, list and write on each path given, from inside a share; prints what worked.
PROBE = """
import json, os, sys
reached = {}
for path in sys.argv[1:]:
    got = []
    for name, act in (
        ("stat", lambda p: os.stat(p)),
        ("open", lambda p: open(p, "rb").close()),
        ("list", lambda p: os.listdir(p)),
        ("write", lambda p: open(os.path.join(p, "x") if os.path.isdir(p) else p, "ab").close()),
    ):
        try:
            act(path)
            got.append(name)
        except OSError:
            pass
    reached[path] = got
print(json.dumps(reached))
"""


def _probe(gateway, user: str, paths: list[str]) -> dict[str, list[str]]:
    r = gateway.bf("run", "-m", "1024", "--", sys.executable, "-c", PROBE, *paths, user=user)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _run(gateway, user: str, script: str) -> subprocess.CompletedProcess:
    return gateway.bf("run", "-m", "1024", "--", "sh", "-c", script, user=user)


def _entries(top: Path) -> list[str]:
    """Every file and folder under ``top``, and ``top`` itself (as the gateway sees them)."""
    out = [str(top)]
    for folder, dirs, files in os.walk(top):
        out += [os.path.join(folder, n) for n in dirs + files]
    return out


def _as(gateway, monkeypatch, user: str) -> None:
    """This test process becomes ``user``'s client (kernels it starts inherit it)."""
    for key, value in gateway.env(user).items():
        if key.startswith("BITFUSION") or key == "PYTHONPATH":
            monkeypatch.setenv(key, value)


def _cell(kc, code: str) -> tuple[dict, str]:
    """Run ``code``; its reply content and everything it printed."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=120, output_hook=hook)
    return reply["content"], "".join(out)


# --- the six findings --------------------------------------------------------------------
def spawn_with_cwd(gateway, user: str, cwd: str, script: str) -> str:
    """What a raw `spawn` of ``script`` with ``cwd`` prints, to its exit; the share is freed."""
    conn = connect(gateway, user)
    try:
        share = conn.request("allocate", gpus=1, mib=1024)["share"]["share_id"]
        conn.request("spawn", share_id=share, argv=["sh", "-c", script], cwd=cwd)
        text, deadline = "", time.monotonic() + WAIT_S
        while "<exit" not in text and time.monotonic() < deadline:
            msg = conn.receive(1.0)
            if msg is not None and msg.type == "out":
                text += protocol.as_bytes(msg.payloads[0]).decode()
                conn.send("ack", proc_id=msg["proc_id"], seq=msg["seq"])
            elif msg is not None and msg.type == "exit":
                text += f"<exit {msg['code']}>"
        conn.request("release", share_id=share)
    finally:
        conn.close()
    return text


def test_1_a_cwd_sent_by_a_user_widens_nothing(gateway):
    """A `spawn` whose cwd names the state directory runs in the user's home all the same,
    and the state directory is still not there."""
    state = gateway.state_dir
    script = f"pwd; cat {state}/admin.token; ls {state}/keys"
    text = spawn_with_cwd(gateway, "mallory", str(state), script)
    assert text.splitlines()[0] == "/home/mallory", text
    assert "No such file or directory" in text and "bf1." not in text


def test_2_the_state_directory_is_not_there_at_all(gateway):
    bob = gateway.bf_background("run", "-m", "1024", "--", "sleep", "30", user="bob")
    try:
        assert wait_for(lambda: list((gateway.state_dir / "run").glob("*.json")), WAIT_S)
        entries = _entries(gateway.state_dir)
        assert {"admin.token", "keys", "ledger.sqlite3", "run", "homes"} <= {
            Path(p).name for p in entries
        }
        reached = _probe(gateway, "mallory", entries)
        assert {p: got for p, got in reached.items() if got} == {}
        r = gateway.bf("run", "--", "cat", str(gateway.state_dir / "admin.token"))
        assert r.returncode != 0 and "No such file or directory" in r.stderr
    finally:
        bob.kill()
        bob.communicate()


def test_3a_a_startup_file_runs_in_no_one_elses_kernel(gateway, monkeypatch):
    plant = (
        "mkdir -p ~/.ipython/profile_default/startup && "
        "echo 'print(\"PLANTED by mallory\")' > ~/.ipython/profile_default/startup/00-evil.py"
    )
    assert _run(gateway, "mallory", plant).returncode == 0
    _as(gateway, monkeypatch, "alice")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(kc, "print('alice here'); get_ipython().profile_dir.location")
        assert content["status"] == "ok" and "alice here" in out
        assert "PLANTED" not in out
    # The planted file is mallory's own: it runs in her kernels, as IPython promises.
    _as(gateway, monkeypatch, "mallory")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, _out = _cell(kc, "import sys; sys.stdout.flush()")
        assert content["status"] == "ok"


def test_3b_a_planted_ipykernel_launcher_never_replaces_the_kernel(gateway, monkeypatch):
    # In the kernel's own working folder (the user's home): `python -m` must not take it.
    plant = (
        'echo \'open("/home/alice/HIJACKED", "w"); raise SystemExit(7)\' > ipykernel_launcher.py'
    )
    assert _run(gateway, "alice", plant).returncode == 0
    _as(gateway, monkeypatch, "alice")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(kc, "import os; print(os.getcwd(), os.path.exists('HIJACKED'))")
        assert content["status"] == "ok"
        assert out.strip() == "/home/alice False"


def test_4_a_user_sees_nothing_of_anothers_files_history_or_home(gateway, monkeypatch):
    _as(gateway, monkeypatch, "alice")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, _ = _cell(kc, "open('model.txt', 'w').write('alice weights'); secret = 42")
        assert content["status"] == "ok"
    alice_home = gateway.state_dir / "homes" / "alice"
    assert (alice_home / "model.txt").read_text() == "alice weights"
    assert list(alice_home.glob(".ipython/profile_default/history.sqlite"))
    r = _run(gateway, "mallory", "ls /home; cat /home/alice/model.txt; "
             "ls ~/.ipython/profile_default 2>&1; echo HOME=$HOME")  # fmt: skip
    assert r.stdout.splitlines()[0] == "mallory", r.stdout
    assert "alice weights" not in r.stdout and "No such file" in r.stderr
    reached = _probe(gateway, "mallory", [*_entries(alice_home), "/home/alice"])
    assert {p: got for p, got in reached.items() if got} == {}
    # Mallory's kernel has a history of her own, empty of alice's cells.
    _as(gateway, monkeypatch, "mallory")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(
            kc,
            # Split, so that this cell itself does not match.
            "hm = get_ipython().history_manager\n"
            "print([c for _, _, c in hm.search('*secret' + ' = 42*')])",
        )
        assert content["status"] == "ok" and out.strip() == "[]", out


# Tries to write a .pth (code every later Python start runs) into each folder given.
PLANTS_A_PTH = (
    "import sys\n"
    "for d in sys.argv[1:]:\n"
    "    try:\n"
    "        open(d + '/zz-evil.pth', 'w').write('import os')\n"
    "        print('WROTE', d)\n"
    "    except OSError as e:\n"
    "        print(type(e).__name__, e.strerror, d)\n"
)


def test_5_no_code_can_be_planted_in_the_gateways_environment(gateway):
    site_dir = Path(site.getsitepackages()[0])
    before = set(os.listdir(site_dir))
    offered = [*site.getsitepackages(), sys.prefix, sys.base_prefix, str(REPO)]
    r = gateway.bf("run", "-m", "1024", "--", sys.executable, "-c", PLANTS_A_PTH, *offered,
                   user="mallory")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "WROTE" not in r.stdout and "Read-only file system" in r.stdout
    assert set(os.listdir(site_dir)) == before


def test_6_a_kernel_starts_and_writes_its_caches_in_its_users_home(gateway, monkeypatch):
    _as(gateway, monkeypatch, "alice")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(
            kc,
            "import os, IPython\n"
            "print(os.environ['HOME'], IPython.paths.get_ipython_dir())\n"
            "os.makedirs(os.path.expanduser('~/.cache/torch'), exist_ok=True)",
        )
        assert content["status"] == "ok", out
        assert out.split() == ["/home/alice", "/home/alice/.ipython"]
    assert (gateway.state_dir / "homes" / "alice" / ".cache" / "torch").is_dir()


# --- processes, signals, /tmp --------------------------------------------------------------
def test_a_share_sees_and_signals_only_its_own_processes(gateway):
    bob = gateway.bf_background("run", "-m", "1024", "--", "sleep", "61.5", user="bob")
    try:
        assert wait_for(lambda: _sleep_pid() is not None, WAIT_S)
        victim = _sleep_pid()
        r = _run(gateway, "mallory", f"ps -e -o pid=,comm=; kill -9 {victim}; echo kill=$?")
        names = [line.split()[1] for line in r.stdout.splitlines() if line[:1] == " "]
        assert "sleep" not in names and len(names) <= 4, r.stdout  # bwrap's init, sh, ps
        assert "kill=1" in r.stdout or "kill=2" in r.stdout
        assert bob.poll() is None and _sleep_pid() == victim
        r = _run(gateway, "mallory", f"kill -TERM {gateway.proc.pid}; echo kill=$?")
        assert "kill=0" not in r.stdout
        assert gateway.bf("list_gpus").returncode == 0  # still serving
    finally:
        bob.kill()
        bob.communicate()


def _sleep_pid() -> int | None:
    out = subprocess.run(["pgrep", "-f", "^sleep 61.5$"], capture_output=True, text=True)
    return int(out.stdout) if out.returncode == 0 else None


def test_tmp_and_shm_are_private_to_each_share(gateway):
    assert (
        _run(gateway, "alice", "echo secret > /tmp/alice; echo s > /dev/shm/alice").returncode == 0
    )
    r = _run(gateway, "mallory", "ls -A /tmp /dev/shm")
    assert "alice" not in r.stdout
    assert not Path("/tmp/alice").exists()


def test_the_gateways_environment_does_not_reach_a_share(gateway_factory):
    gw = gateway_factory("--simulate-gpus", "1x8GiB", env_extra={"GATEWAY_SECRET": "hunter2"})
    r = gw.bf("run", "--", "env")
    assert r.returncode == 0 and "hunter2" not in r.stdout
    assert "BITFUSION_SHARE_ID=" in r.stdout and "HOME=/home/alice" in r.stdout


# --- per-user packages -----------------------------------------------------------------------
def _wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel, made here (no network), in ``folder`` (a user's home)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    name, version = "bftestpkg", "0.1"
    files = {f"{name}.py": b"WHO = 'bftestpkg works'\n"}
    info = f"{name}-{version}.dist-info"
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def _tree_hash(top: str) -> str:
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(path.encode())
            try:
                h.update(str(os.stat(path).st_mtime_ns).encode())
            except OSError:
                pass
    return h.hexdigest()


def test_pip_install_in_a_kernel_is_for_that_user_alone(gateway, monkeypatch):
    offered = site.getsitepackages()[0]
    before = _tree_hash(offered)
    wheel = _wheel(gateway.state_dir / "homes" / "alice")
    _as(gateway, monkeypatch, "alice")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(kc, f"%pip install --no-index --no-deps ~/{wheel.name}")
        assert content["status"] == "ok" and "Successfully installed bftestpkg" in out, out
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):  # alice's next kernel
        content, out = _cell(kc, "import bftestpkg; print(bftestpkg.WHO)")
        assert content["status"] == "ok" and "bftestpkg works" in out, out
    r = gateway.bf("run", "-m", "1024", "--", "python3", "-c", "import bftestpkg", user="alice")
    assert r.returncode == 0, r.stderr  # her commands too
    _as(gateway, monkeypatch, "mallory")
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, _out = _cell(kc, "import bftestpkg")
        assert content["status"] == "error" and content["ename"] == "ModuleNotFoundError"
    assert _tree_hash(offered) == before  # the offered environment never changed


def test_pip_install_in_a_command_is_kept_for_that_user(gateway):
    wheel = _wheel(gateway.state_dir / "homes" / "bob")
    r = gateway.bf("run", "-m", "1024", "--", "pip", "install", "--no-index", "--no-deps",
                   f"/home/bob/{wheel.name}", user="bob")  # fmt: skip
    assert r.returncode == 0 and "Successfully installed bftestpkg" in r.stdout, r.stderr
    r = gateway.bf("run", "-m", "1024", "--", "python3", "-c",
                   "import bftestpkg; print(bftestpkg.WHO)", user="bob")  # fmt: skip
    assert r.stdout.strip() == "bftestpkg works", r.stderr
    r = gateway.bf("run", "-m", "1024", "--", "python3", "-c", "import bftestpkg", user="alice")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr
    # Each user is told what they installed on each server, and only that.
    r = gateway.bf("list_shares", user="bob")
    assert "Packages you installed" in r.stdout and "bftestpkg" in r.stdout, r.stdout
    assert "Packages you installed" not in gateway.bf("list_shares", user="alice").stdout


# --- no silent fall-back ---------------------------------------------------------------------
def test_without_bubblewrap_shares_are_refused_in_one_sentence(gateway_factory, tmp_path):
    # A PATH with python but no bwrap: as on a server where it is not installed.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("env", "sh"):
        (bindir / tool).symlink_to(f"/usr/bin/{tool}" if tool == "env" else "/bin/sh")
    gw = gateway_factory("--simulate-gpus", "1x8GiB", env_extra={"PATH": str(bindir)})
    assert "shares: REFUSED: bubblewrap is not installed" in gw.log()
    r = gw.bf("run", "-m", "1024", "--", "true")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "refuses shares: bubblewrap is not installed" in r.stderr
    assert "apt-get install bubblewrap" in r.stderr and "--unconfined" in r.stderr
    assert gw.shares() == []  # nothing held


def test_an_unconfined_gateway_says_so(gateway_factory, monkeypatch):
    gw = gateway_factory("--simulate-gpus", "1x8GiB", "--unconfined")
    assert "shares: UNCONFINED (--unconfined)" in gw.log()
    r = gw.bf("run", "--", "cat", str(gw.state_dir / "admin.token"))
    assert r.returncode == 0 and r.stdout.startswith("bf1.a.")  # what the flag means
    assert "UNCONFINED" in r.stderr  # and the user is told
    r = gw.bf("run", "--", sys.executable, "-c", "import os; print(os.getcwd())")
    assert r.returncode == 0 and r.stdout.strip() != "/home/alice"  # the gateway's own
    _as(gw, monkeypatch, "alice")  # and a kernel starts, with the gateway's own paths
    with ready(start_shim_kernel("-m", "1024")) as (_km, kc):
        content, out = _cell(kc, "print(6 * 7)")
        assert content["status"] == "ok" and out.strip() == "42"


def test_workdir_is_gone_and_says_what_replaced_it(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--state-dir", str(tmp_path / "s"), "--workdir", "/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--workdir is gone" in r.stderr and "--homes DIR" in r.stderr


def test_landlock_scopes_are_the_second_layer():
    if landlock.abi() < landlock.SCOPED_ABI:
        pytest.skip("Landlock scopes need Linux 6.12; bubblewrap alone walls shares off")
    assert "Landlock ABI" in sandbox.check(True).line
