"""Leases: a vanished client's share is ended and freed; a restarted gateway adopts processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gateway.spawned import SpawnedGateway, SpawnError, free_port
from tests.support.gateways import stop_leftovers
from tests.support.processes import ECHOES_ITS_STDIN, PRINTS_ITS_PID, host_pid
from tests.support.waiting import wait_for


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_killed_client_frees_the_share_and_stops_its_process(gateway):
    client = gateway.bf_background(
        "run",
        "-m",
        "2048",
        "--",
        sys.executable,
        "-c",
        f"{PRINTS_ITS_PID}\nimport time; time.sleep(120)",
    )
    remote_pid = host_pid(client.stdout.readline())
    assert len(gateway.shares()) == 1
    client.kill()  # kill -9: no goodbye, no release
    client.wait()
    assert gateway.no_shares_within(15), "share not freed"
    assert wait_for(lambda: not _alive(remote_pid), 10, step=0.1), "process left running"
    events = json.loads(gateway.bf("list_shares", "--json").stdout)[0]["data"]["events"]
    assert any(e["kind"] == "lease_expired" for e in events)
    [share_id] = {e["share_id"] for e in events if e["kind"] == "lease_expired"}
    assert f"the lease of share {share_id} (alice) expired: its holder stopped renewing" in (
        gateway.log()
    )  # the admin reads why a share ended in the gateway's log, not only in the ledger


def test_a_restarted_gateway_adopts_running_commands(gateway_factory):
    gw = gateway_factory("--simulate-gpus", "2x16GiB", "--lease-grace", "10")
    client = gw.bf_background(
        "run",
        "-m",
        "2048",
        "--",
        sys.executable,
        "-u",
        "-c",
        "import time\nfor i in range(60):\n    print(i)\n    time.sleep(0.1)\n",
    )
    assert client.stdout.readline() == "0\n"
    gw.kill(signal.SIGKILL)
    time.sleep(1)
    gw.start()  # same state dir, same port
    out = client.stdout.read()  # (not communicate(): it would skip readline's buffer)
    client.wait(60)
    assert client.returncode == 0, client.stderr.read()
    numbers = [int(x) for x in ("0\n" + out).split()]
    assert numbers == list(range(60)), "output lost or duplicated across the restart"
    assert gw.no_shares_within(15)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_gateway_stopped_as_systemctl_does_keeps_the_command_for_the_next(gateway_factory, sig):
    # `systemctl restart` sends SIGTERM, Ctrl-C SIGINT: neither may end or forget a command.
    gw = gateway_factory("--simulate-gpus", "1x8GiB", "--lease-grace", "10")
    script = "import time\nfor i in range(40):\n    print(i)\n    time.sleep(0.1)\n"
    client = gw.bf_background("run", "-m", "1024", "--", sys.executable, "-u", "-c", script)
    assert client.stdout.readline() == "0\n"
    gw.stop(sig)
    assert "exited with None" not in gw.log()
    gw.start()
    # The port listens before the gateway adopts (it binds, then serves): wait for it.
    assert wait_for(lambda: "adopted process" in gw.start_log(), 10), gw.start_log()
    out = client.stdout.read()
    client.wait(60)
    assert client.returncode == 0, client.stderr.read()
    assert [int(x) for x in ("0\n" + out).split()] == list(range(40)), "lost or repeated"


def test_a_command_gone_while_no_gateway_ran_is_said_and_its_client_exits(gateway_factory):
    gw = gateway_factory("--simulate-gpus", "1x8GiB", "--lease-grace", "10")
    script = f"{PRINTS_ITS_PID}\nimport time; time.sleep(120)"
    client = gw.bf_background("run", "-m", "1024", "--", sys.executable, "-c", script)
    remote = host_pid(client.stdout.readline())
    gw.stop(signal.SIGTERM)
    stop_leftovers(gw.state_dir)  # its supervisor and the command die meanwhile
    assert wait_for(lambda: not _alive(remote), 10)
    gw.start()
    _, err = client.communicate(timeout=60)
    assert client.returncode == 255, err
    assert "its supervisor is gone: its exit status and last output are unknown" in err
    assert "Traceback" not in err


def test_ctrl_c_ends_a_client_whose_gateway_does_not_answer(gateway):
    client = gateway.bf_background("run", "-m", "512", "--", "sh", "-c", "echo started; sleep 60")
    try:
        # Frozen once the command runs, not while the client still waits for it to start
        # (that wait ends in its own error, not in a lost gateway).
        assert client.stdout.readline() == "started\n"
        os.kill(gateway.proc.pid, signal.SIGSTOP)  # frozen: it takes nothing in any more
        said: list[str] = []
        deadline = time.monotonic() + 20
        while not any("lost the gateway" in s for s in said) and time.monotonic() < deadline:
            said.append(client.stderr.readline())
            if not said[-1]:
                break  # the client ended
        assert any("lost the gateway" in s for s in said), said
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=20)
        assert client.returncode == 128 + signal.SIGINT, err
        assert "interrupted while the gateway" in err and "Traceback" not in err
    finally:
        os.kill(gateway.proc.pid, signal.SIGCONT)
        client.kill()
        client.wait()


def test_stdin_sent_as_the_gateway_dies_still_reaches_the_command(gateway_factory):
    # A line typed just before the gateway is killed is in the dead gateway's socket, not yet
    # with the command's nanny: the client keeps each line until the nanny confirms it, and
    # sends it again to the restarted gateway.
    gw = gateway_factory("--simulate-gpus", "1x16GiB", "--lease-grace", "10")
    client = None
    try:
        args = ("run", "-m", "1024", "--", sys.executable, "-u", "-c", ECHOES_ITS_STDIN)
        client = gw.bf_background(*args, stdin=subprocess.PIPE)
        client.stdin.write("one\n")
        client.stdin.flush()
        assert client.stdout.readline() == "got one\n"
        os.kill(gw.proc.pid, signal.SIGSTOP)  # frozen: it takes the line in and passes nothing on
        client.stdin.write("two\n")
        client.stdin.flush()
        time.sleep(0.5)
        gw.kill(signal.SIGKILL)
        gw.start()
        client.stdin.write("three\n")
        client.stdin.close()
        out = client.stdout.read()
        client.wait(60)
        assert client.returncode == 0, client.stderr.read()
        assert out == "got two\ngot three\n", "stdin lost or repeated across the restart"
        assert gw.no_shares_within(15)
    finally:
        if client is not None and client.poll() is None:
            client.kill()


def test_nothing_is_granted_twice_across_a_restart(gateway_factory):
    gw = gateway_factory("--simulate-gpus", "1x16GiB", "--lease-grace", "10")
    env = gw.env(BITFUSION_SESSION="restart-hold")
    assert gw.bf("request_gpus", "-m", "10000", env=env).returncode == 0
    gw.kill(signal.SIGKILL)
    gw.start()
    r = gw.bf("run", "-m", "10000", "--", "true", user="bob")
    assert r.returncode == 1 and "No room" in r.stderr
    assert gw.bf("release_gpus", env=env).returncode == 0
    assert gw.bf("run", "-m", "10000", "--", "true", user="bob").returncode == 0


def _refused_start(state_dir, port, env, log_path) -> str:
    """Start another gateway that must not come up; what it said, once it has ended."""
    other = SpawnedGateway(
        state_dir, port, ["--simulate-gpus", "1x16GiB"], process_env=env, log_path=log_path
    )
    try:
        other.start()
    except SpawnError as exc:
        assert other.proc.poll() is not None and "Traceback" not in str(exc)
        return str(exc)
    finally:
        other.stop()
    raise AssertionError("the other gateway started")


def test_a_second_gateway_on_the_same_state_is_refused_and_the_first_keeps_its_share(
    gateway_factory, tmp_path
):
    """Two gateways on one ledger would each hand out the same GPU memory. A second one, on
    another port or the same, stops with one sentence; the first serves on as before."""
    gw = gateway_factory("--simulate-gpus", "1x16GiB")
    env = gw.env(BITFUSION_SESSION="first-holds")
    assert gw.bf("request_gpus", "-m", "10000", env=env).returncode == 0
    for port in (free_port(), gw.port):
        said = _refused_start(gw.state_dir, port, gw.process_env, tmp_path / "second.log")
        assert f"Another gateway (pid {gw.proc.pid}) is using the state directory" in said
    r = gw.bf("run", "-m", "10000", "--", "true", user="bob")
    assert r.returncode == 1 and "No room" in r.stderr  # the first share is still held
    assert gw.bf("release_gpus", env=env).returncode == 0


def test_a_gateway_that_cannot_bind_is_not_mistaken_for_one_that_started(tmp_path, gateway):
    """Another gateway already listening on the port must not pass for ours."""
    said = _refused_start(
        tmp_path / "other-state", gateway.port, gateway.process_env, tmp_path / "other.log"
    )
    assert f"Cannot listen on 127.0.0.1:{gateway.port}" in said
