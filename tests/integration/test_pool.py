"""Looking at the pool and admission: list_gpus, smi, health, best fit, queueing."""

import json
import signal
import time

from gateway.spawned import stop_leftovers
from tests.support.gateways import start_gateway
from tests.support.waiting import wait_for


def test_list_gpus_shows_the_simulated_pool(gateway):
    r = gateway.bf("list_gpus")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["SERVER", "GPU", "NAME"]
    gpu_rows = [ln for ln in lines if ln.startswith(gateway.address)]
    assert len(gpu_rows) == 2
    assert all("16384" in ln and "SIMULATED" in ln for ln in gpu_rows)
    data = json.loads(gateway.bf("list_gpus", "--json").stdout)
    assert data[0]["ok"] and len(data[0]["data"]["gpus"]) == 2
    assert data[0]["data"]["simulated"] is True


def test_smi_and_health(gateway):
    smi = gateway.bf("smi")
    assert smi.returncode == 0, smi.stderr
    assert "driver simulated" in smi.stdout and "SIMULATED" in smi.stdout
    health = gateway.bf("health")
    assert health.returncode == 0, health.stderr
    row = health.stdout.splitlines()[1]
    assert "yes" in row and "accepted" in row and "0.1.0" in row and "alice" in row
    rows = json.loads(gateway.bf("health", "--json").stdout)
    assert rows[0]["rtt_ms"] > 0


def _hold(gateway, user, *share_args):
    env = gateway.env(user, BITFUSION_SESSION=f"hold-{user}-{time.monotonic_ns()}")
    r = gateway.bf("request_gpus", *share_args, env=env)
    return r, env


def test_two_12gib_shares_land_on_different_gpus_and_a_third_is_refused(gateway):
    a, env_a = _hold(gateway, "alice", "-m", "12288")
    b, env_b = _hold(gateway, "bob", "-m", "12288")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    gpu_a = a.stdout.split("GPU ")[1].split()[0]
    gpu_b = b.stdout.split("GPU ")[1].split()[0]
    assert gpu_a != gpu_b
    c, _ = _hold(gateway, "carol", "-m", "12288")
    assert c.returncode == 1
    assert "No room for 1 GPU × 12288 MiB" in c.stderr and "4096 of 16384 MiB free" in c.stderr
    assert "Traceback" not in c.stderr
    # With --wait, the third queues and gets the GPU the moment one is released.
    waiter = gateway.bf_background(
        "request_gpus",
        "-m",
        "12288",
        "--wait",
        "30",
        env=gateway.env("carol", BITFUSION_SESSION="carol-wait"),
    )
    time.sleep(1.5)
    assert waiter.poll() is None
    assert gateway.bf("release_gpus", env=env_a).returncode == 0
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert "Position 1" in err and f"GPU {gpu_a}" in out
    for env in (env_b, gateway.env("carol", BITFUSION_SESSION="carol-wait")):
        gateway.bf("release_gpus", env=env)


def test_wait_gives_up_with_a_clear_error(gateway):
    a, env_a = _hold(gateway, "alice", "-n", "2")
    assert a.returncode == 0, a.stderr
    r = gateway.bf("run", "-m", "1024", "--wait", "1", "--", "true", user="bob")
    assert r.returncode == 1 and "Waited in vain" in r.stderr
    gateway.bf("release_gpus", env=env_a)


def _queued(gateway) -> int:
    """How many requests wait in the gateway's queue, as list_gpus reports it."""
    return json.loads(gateway.bf("list_gpus", "--json").stdout)[0]["data"]["queued"]


def test_a_waiter_whose_client_died_leaves_the_queue(gateway):
    a, env_a = _hold(gateway, "alice", "-n", "2")
    assert a.returncode == 0, a.stderr
    carol = gateway.bf_background(
        "request_gpus", "-n", "2", "--wait", "120", env=gateway.env("carol")
    )
    assert wait_for(lambda: _queued(gateway) == 1, 15)
    dave_env = gateway.env("dave", BITFUSION_SESSION="dave-wait")
    dave = gateway.bf_background("request_gpus", "-n", "2", "--wait", "120", env=dave_env)
    assert wait_for(lambda: _queued(gateway) == 2, 15)
    carol.kill()  # no goodbye: the gateway only stops hearing from her client
    carol.communicate()
    # After the lease grace (2 s here) her place goes; dave, still heard, moves up.
    assert wait_for(lambda: _queued(gateway) == 1, 15)
    assert "carol's request for 2 GPUs (whole) left the queue: no word from its" in gateway.log()
    assert gateway.bf("release_gpus", env=env_a).returncode == 0
    out, err = dave.communicate(timeout=20)
    assert dave.returncode == 0, err
    assert "Position 2" in err and "Position 1" in err
    assert [s["owner"] for s in gateway.shares()] == ["dave"]  # no share for a ghost
    gateway.bf("release_gpus", env=dave_env)


def test_ctrl_c_while_queued_leaves_the_queue_at_once(tmp_path):
    # A long lease grace: the place must go because the client said so, not by silence.
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x16GiB", "--lease-grace", "120")
    try:
        a, env_a = _hold(gw, "alice", "-n", "1")
        assert a.returncode == 0, a.stderr
        bob = gw.bf_background("run", "-n", "1", "--wait", "600", "--", "true", user="bob")
        assert wait_for(lambda: _queued(gw) == 1, 15)
        bob.send_signal(signal.SIGINT)
        _, err = bob.communicate(timeout=15)
        assert bob.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert wait_for(lambda: _queued(gw) == 0, 10)
        assert "bob's request for 1 GPU (whole) left the queue: its client gave up" in gw.log()
        assert gw.bf("release_gpus", env=env_a).returncode == 0
        assert gw.no_shares_within(5)  # bob's request did not come back as a share
    finally:
        gw.kill(signal.SIGTERM)
        stop_leftovers(gw.state_dir)


def test_users_see_only_their_own_shares_and_admins_see_all(gateway):
    a, env_a = _hold(gateway, "alice", "-m", "1000")
    b, env_b = _hold(gateway, "bob", "-m", "2000")
    mine = json.loads(gateway.bf("list_shares", "--json", user="alice").stdout)[0]["data"]
    assert [s["owner"] for s in mine["shares"]] == ["alice"]
    every = json.loads(gateway.bf("list_shares", "--json", user="root", admin=True).stdout)
    assert sorted(s["owner"] for s in every[0]["data"]["shares"]) == ["alice", "bob"]
    for env in (env_a, env_b):
        gateway.bf("release_gpus", env=env)


def test_filters_pick_gpus(gateway):
    r = gateway.bf("run", "--filter", "device.memory>=32GiB", "--", "true")
    assert r.returncode == 1 and "can never hold" in r.stderr
    r = gateway.bf("run", "--filter", "server.hostname=gpuhost", "-m", "100", "--", "true")
    assert r.returncode == 0, r.stderr
