import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.gpus import SimulatedInventory
from gateway.share_env import ShareGpu, share_environment


@pytest.fixture
def pool(tmp_path):
    return SimulatedInventory([16384, 16384], tmp_path / "simulated-usage", "gpuhost")


def share_env(pool: SimulatedInventory) -> dict[str, str]:
    """The environment the gateway gives a share holding 8 GiB of each simulated GPU."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_")}
    return share_environment(
        server="gpuhost",
        share_id="s-1",
        gpus=[ShareGpu(g.index, g.uuid, g.name, 8192, g.memory_total_mib) for g in pool.gpus()],
        simulated_usage_dir=share_dir(pool),
        mps=False,
        base=base,
    )


def share_dir(pool: SimulatedInventory) -> Path:
    """The share's own claims folder, as the gateway makes it."""
    folder = pool.usage_dir / "s-1"
    folder.mkdir(exist_ok=True)
    return folder


def alloc(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.simulated_alloc", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_allocation_is_seen_by_the_gateway_and_gone_after_sigterm(pool):
    proc = alloc(share_env(pool), "4096")
    try:
        line = proc.stdout.readline()
        uuids = ", ".join(g.uuid for g in pool.gpus())
        assert line == f"allocated 4096 MiB on {uuids} (simulated)\n"
        assert pool.process_memory() == {proc.pid: {0: 4096, 1: 4096}}
        assert [s.memory_used_mib for s in pool.states()] == [4096, 4096]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert pool.process_memory() == {}
    assert [s.memory_used_mib for s in pool.states()] == [0, 0]
    assert list(share_dir(pool).iterdir()) == []  # it cleaned up after itself


def test_allocation_for_a_while_ends_by_itself(pool):
    proc = alloc(share_env(pool), "100", "--seconds", "0.2")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.startswith("allocated 100 MiB") and err == ""
    assert pool.process_memory() == {}


def test_a_killed_allocator_stops_counting(pool):
    proc = alloc(share_env(pool), "2048")
    proc.stdout.readline()
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert pool.process_memory() == {}
    assert list(share_dir(pool).iterdir()) == []


def test_outside_a_simulated_share_it_says_so(pool):
    env = {k: v for k, v in share_env(pool).items() if k != "BITFUSION_SIMULATED_USAGE_DIR"}
    proc = alloc(env, "1024")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and out == ""
    assert "not a share on a simulated pool" in err and err.count("\n") == 1
