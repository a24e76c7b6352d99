"""Policing on the simulated pool: usage is seen, an over-share process is warned and stopped."""

import json
import signal
import sys
import time


def _alloc(gateway, share_mib, use_mib, seconds=60, user="alice"):
    return gateway.bf_background(
        "run",
        "-m",
        str(share_mib),
        "--",
        sys.executable,
        "-m",
        "gateway.simulated_alloc",
        str(use_mib),
        "--seconds",
        str(seconds),
        user=user,
    )


def test_usage_inside_the_share_is_shown_and_left_alone(gateway):
    client = _alloc(gateway, 2048, 1500, seconds=4)
    assert "allocated 1500 MiB" in client.stdout.readline()
    deadline, usage = time.monotonic() + 10, {}
    while time.monotonic() < deadline and not usage:
        shares = json.loads(gateway.bf("list_shares", "--json").stdout)[0]["data"]["shares"]
        usage = shares[0]["usage_mib"] if shares else {}
        time.sleep(0.3)
    assert list(usage.values()) == [1500]
    smi = gateway.bf("smi").stdout
    assert "1500" in smi
    client.wait(30)
    assert client.returncode == 0, client.stderr.read()
    kinds = [
        e["kind"]
        for e in json.loads(gateway.bf("list_shares", "--json").stdout)[0]["data"]["events"]
    ]
    assert "police_warn" not in kinds


def test_a_process_over_its_share_is_warned_then_stopped(gateway):
    start = time.monotonic()
    client = _alloc(gateway, 2048, 5000)
    out, err = client.communicate(timeout=40)
    assert client.returncode == 128 + signal.SIGKILL, err
    assert "uses 5000 MiB on GPU" in err and "more than its 2048 MiB" in err
    assert "will be stopped in 1 s" in err and "being stopped" in err
    assert time.monotonic() - start < 30
    events = json.loads(gateway.bf("list_shares", "--json").stdout)[0]["data"]["events"]
    kinds = [e["kind"] for e in events]
    assert "police_warn" in kinds and "police_stop" in kinds
    # Another user does not see alice's policing events.
    others = json.loads(gateway.bf("list_shares", "--json", user="bob").stdout)[0]["data"]
    assert not any(e["kind"].startswith("police") for e in others["events"])
