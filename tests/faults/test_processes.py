"""Processes killed without a goodbye: clients, shims, the gateway, the remote kernel.

Whatever dies, afterwards no share is lost, leaked or granted twice, and what still runs
keeps working.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.faults.conftest import PRINTS_ITS_PID_AND_WAITS
from tests.support.processes import PRINTS_ITS_PID, host_pid

COUNTS_TO_100 = "import time\nfor i in range(100):\n    print(i)\n    time.sleep(0.1)\n"


def _remote_pid(fe) -> int:
    return host_pid(fe.run_cell(PRINTS_ITS_PID)["stdout"])


def test_kill_9_of_a_kernel_shim_frees_its_share_within_the_grace(short_lease_cluster, figures):
    cluster = short_lease_cluster
    fe = cluster.frontend()
    shim_pid = fe.call("start", args=["-m", "1024"])["shim_pid"]
    remote_pid = _remote_pid(fe)
    assert len(cluster.shares()) == 1
    os.kill(shim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert fe.call("wait_dead", timeout=10)["dead"], "the frontend did not see the kernel die"
    cluster.expect_freed(figures, "s from kill to share freed", killed_at, remote_pid)
    fe.call("restart")  # what JupyterLab's restarter does: a new shim, a new share
    assert fe.run_cell("print('again')")["stdout"] == "again\n"


def test_kill_9_of_a_run_client_frees_its_share_within_the_grace(short_lease_cluster, figures):
    cluster = short_lease_cluster
    client = cluster.run_python(PRINTS_ITS_PID_AND_WAITS, "-m", "2048")
    remote_pid = host_pid(client.stdout.readline())
    client.kill()
    cluster.expect_freed(figures, "s from kill to share freed", time.monotonic(), remote_pid)


# Ctrl-C (SIGINT) takes the gateway's one stop path with SIGTERM (gateway.service.core);
# test_leases stops a gateway with each and sees its command kept.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "SIGTERM"])
def test_a_gateway_stopped_and_started_again_loses_nothing(cluster, figures, sig):
    """kill -9 or `systemctl restart` (SIGTERM): the processes in shares go on under their
    nannies, and the next gateway adopts them."""
    gw = cluster.gateways["gpu1"]
    fe = cluster.frontend()
    fe.call("start", args=["-m", "4096", "-l", gw.address])
    fe.run_cell("state = 'kept'")
    client = cluster.run_python(COUNTS_TO_100, "-m", "8192", "-l", gw.address)
    assert client.stdout.readline() == "0\n"
    before = sorted((s["share_id"], s["gpus"][0]["mib"]) for s in gw.shares())
    assert len(before) == 2

    gw.kill(sig)
    time.sleep(1)
    gw.start()  # same state, same port: it adopts the kernel and the command
    assert "exited with None" not in gw.log(), "the stop took its processes for ended"
    started_at = time.monotonic()
    assert sorted((s["share_id"], s["gpus"][0]["mib"]) for s in gw.shares()) == before
    # The kernel kept its state: the shim reconnected to the same remote kernel.
    assert fe.run_cell("print(state)", timeout=90)["stdout"] == "kept\n"
    figures["s from restart to the kernel's answer"] = round(time.monotonic() - started_at, 2)
    # The command's output resumed with nothing lost or repeated, and it ends normally.
    out, err = client.communicate(timeout=90)
    assert client.returncode == 0, err
    assert [int(x) for x in ("0\n" + out).split()] == list(range(100)), "lost or duplicated"
    after = sorted((s["share_id"], s["gpus"][0]["mib"]) for s in gw.shares())
    assert after == [s for s in before if s[1] == 4096], "the kernel's share changed"
    # Nothing granted twice: 16 GiB less the kernel's 4 GiB is what is free on gpu1 now.
    room = cluster.bf("run", "-m", "12289", "-l", gw.address, "--", "true")
    assert room.returncode == 1 and "No room" in room.stderr, room
    fits = cluster.bf("run", "-m", "12288", "-l", gw.address, "--", "true")
    assert fits.returncode == 0, fits.stderr


def test_a_crashed_remote_kernel_frees_its_share_and_can_be_restarted(cluster, figures):
    fe = cluster.frontend()
    fe.call("start", args=["-m", "1024"])
    first = cluster.shares()
    assert len(first) == 1
    crashed = fe.run_cell("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", timeout=30)
    dead_at = time.monotonic()
    assert crashed["status"] == "dead", crashed  # the frontend sees a dead kernel
    cluster.expect_freed(figures, "s from the frontend seeing it dead to share freed", dead_at)
    # 128+9: a sandboxed kernel's exit is said as shells say it.
    assert "exited with 137 (128+SIGKILL)" in cluster.gateways["gpu1"].log(), "not logged"
    fe.call("restart")
    assert fe.run_cell("print('restarted')")["stdout"] == "restarted\n"
    again = cluster.shares()
    assert len(again) == 1 and again[0]["share_id"] != first[0]["share_id"]
