"""The README's first command (`bitfusion up`) and `localhealth` on a GPU server."""

import json
import signal
import socket
import subprocess
import sys

from gateway.spawned import free_port, stop_leftovers
from tests.support.env import base_env
from tests.support.gateways import start_gateway


def test_up_starts_a_labelled_simulated_pool_and_runs_in_a_share(tmp_path):
    env = {**base_env(tmp_path), "BITFUSION_CONFIG_DIR": str(tmp_path / "cfg")}
    # An earlier run's log: `up` shows this run's banner, not old lines (an old traceback
    # shown here would look like a failure of this run).
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "gateway.log").write_text("an earlier run's last words\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitfusion_jupyter",
            "up",
            "--exit",
            "--port",
            str(free_port()),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "an earlier run's last words" not in r.stdout
    assert "No NVIDIA GPU found through NVML: starting a SIMULATED pool" in r.stdout
    assert "SIMULATED" in r.stdout.split("$ bitfusion list_gpus")[1]
    assert "inside share s-" in r.stdout and "capped at 1024 MiB" in r.stdout
    said = r.stdout + r.stderr
    assert "not carrying" not in said and "cannot appear" not in said  # it needs no folder
    assert (tmp_path / "cfg" / "client.json").exists()  # the client is set up for later use


def _up(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**base_env(tmp_path), "BITFUSION_CONFIG_DIR": str(tmp_path / "cfg")}
    cmd = [sys.executable, "-m", "bitfusion_jupyter", "up", "--exit", "--no-lab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)


def test_up_says_what_is_in_its_way_in_its_own_options(tmp_path, gateway):
    # A gateway already serves this state directory.
    r = _up(tmp_path, "--state-dir", str(gateway.state_dir), "--port", str(free_port()))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"Another gateway (pid {gateway.proc.pid}) is using the state directory" in r.stderr
    # Another program listens on the port.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = _up(tmp_path, "--state-dir", str(tmp_path / "own-state"), "--port", str(port))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"Port {port} on 127.0.0.1 is taken" in r.stderr and "--port" in r.stderr
    assert "--bind" not in r.stderr and "Traceback" not in r.stderr  # up has no --bind
    assert gateway.bf("list_gpus").returncode == 0  # the running gateway was left alone


def test_localhealth_reports_each_check(gateway):
    r = gateway.bf(
        "localhealth", "--state-dir", str(gateway.state_dir), "--port", str(gateway.port), "--json"
    )
    assert r.returncode == 0, r.stderr
    checks = {c["check"]: c for c in json.loads(r.stdout)}
    assert checks[f"port {gateway.port}"]["status"] == "ok"
    assert "SIMULATED pool" in checks["gateway"]["detail"]
    assert checks["NVML and driver"]["status"] in ("ok", "WARN")
    assert set(checks) >= {"MPS daemon", "state dir", "disk", "share sandbox"}
    assert checks["share sandbox"]["status"] == "ok"
    assert "sandboxed by bubblewrap" in checks["share sandbox"]["detail"]
    assert checks["kernel channels"]["status"] == "ok"  # ipykernel 7.3+, as installed
    # sshfs and /dev/fuse are here (install-system-packages): shares can mount a folder.
    assert checks["client folders"]["status"] == "ok", checks["client folders"]
    down = gateway.bf(
        "localhealth", "--state-dir", str(gateway.state_dir), "--port", str(free_port())
    )
    assert down.returncode == 1 and "FAIL" in down.stdout and "nothing listens" in down.stdout
    assert "judged from here" in down.stdout  # no gateway to say how it confines shares


def test_localhealth_gives_the_gateways_own_sandbox_verdict(tmp_path):
    # The running gateway's verdict, not one judged from here: this one was told not to.
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB", "--unconfined")
    try:
        r = gw.bf("localhealth", "--state-dir", str(gw.state_dir), "--port", str(gw.port), "--json")
        checks = {c["check"]: c for c in json.loads(r.stdout)}
        sandbox = checks["share sandbox"]
        assert sandbox["status"] == "WARN", sandbox
        assert sandbox["detail"].startswith("UNCONFINED (--unconfined)")
        assert "judged from here" not in sandbox["detail"]
        listed = gw.bf("list_gpus")  # and every user sees it in list_gpus
        assert "shares UNCONFINED (--unconfined)" in listed.stdout, listed.stdout
    finally:
        gw.kill(signal.SIGTERM)
        stop_leftovers(gw.state_dir)


def test_the_state_dir_is_made_0700_whoever_made_it(tmp_path):
    # `bitfusion up` as root once left /var/lib/bitfusion 0755: the ledger (who runs what)
    # and the users' homes were then listable by every local user.
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB")
    try:
        assert state.stat().st_mode & 0o777 == 0o700
    finally:
        gw.kill(signal.SIGTERM)
        stop_leftovers(gw.state_dir)
