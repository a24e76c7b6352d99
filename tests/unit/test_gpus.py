import json
import os
import subprocess
import sys

import pytest

from gateway.gpus import (
    InventoryError,
    NvmlInventory,
    SimulatedInventory,
    open_inventory,
    parse_simulate_spec,
)


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("2x16GiB", [16384, 16384]),
        ("1x80GiB,1x24GiB", [81920, 24576]),
        ("16GiB", [16384]),
        ("3x512mib", [512, 512, 512]),
        (" 1 x 40 GIB , 2x8GiB ", [40960, 8192, 8192]),
    ],
)
def test_simulate_spec_gives_the_sizes_of_the_pool(spec, sizes):
    assert parse_simulate_spec(spec) == sizes


@pytest.mark.parametrize(
    ("spec", "bad_part"),
    [
        ("", "''"),
        ("2x16", "'2x16'"),
        ("2x16GB", "'2x16GB'"),
        ("1x80GiB,lots", "'lots'"),
        ("0x16GiB", "'0x16GiB'"),
        ("2x0MiB", "'2x0MiB'"),
        ("-1x16GiB", "'-1x16GiB'"),
    ],
)
def test_bad_simulate_spec_names_the_bad_part_and_shows_a_valid_one(spec, bad_part):
    with pytest.raises(ValueError) as err:
        parse_simulate_spec(spec)
    message = str(err.value)
    assert bad_part in message and "2x16GiB" in message
    assert "\n" not in message and message.endswith(".")


def test_an_absurd_number_of_simulated_gpus_is_refused():
    with pytest.raises(ValueError, match="more than 64 GPUs"):
        parse_simulate_spec("1000x16GiB")


def test_simulated_pool_is_stable_per_host_and_distinct_across_hosts(tmp_path):
    a = SimulatedInventory([16384, 24576], tmp_path / "a", "gpuhost")
    again = SimulatedInventory([16384, 24576], tmp_path / "b", "gpuhost")
    other = SimulatedInventory([16384, 24576], tmp_path / "c", "otherhost")
    gpus = a.gpus()
    assert [g.index for g in gpus] == [0, 1]
    assert [g.memory_total_mib for g in gpus] == [16384, 24576]
    assert [g.name for g in gpus] == ["Simulated GPU 16 GiB", "Simulated GPU 24 GiB"]
    assert all(g.simulated and g.uuid.startswith("GPU-") for g in gpus)
    assert len({g.uuid for g in gpus}) == 2
    assert [g.uuid for g in again.gpus()] == [g.uuid for g in gpus]
    assert not {g.uuid for g in other.gpus()} & {g.uuid for g in gpus}
    assert a.simulated and a.driver_version() == "simulated" and a.cuda_version() is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _claim(pid: int) -> str:
    """The claim name of host ``pid``, as it would write it (its namespace, its own pid)."""
    return f"{os.stat(f'/proc/{pid}/ns/pid').st_ino}-{pid}"


def test_simulated_usage_counts_live_claims_and_drops_dead_ones(tmp_path):
    inv = SimulatedInventory([16384, 16384], tmp_path / "usage", "gpuhost")
    g0, g1 = (g.uuid for g in inv.gpus())
    usage_dir = tmp_path / "usage" / "s-share"  # a share's own folder
    usage_dir.mkdir()
    live = subprocess.Popen(["sleep", "60"])
    (usage_dir / f"{_claim(live.pid)}.json").write_text(
        json.dumps({g0: 1000, g1: 3000, "GPU-not-here": 99})
    )
    ns = os.stat("/proc/self/ns/pid").st_ino
    dead = usage_dir / f"{ns}-{_dead_pid()}.json"
    dead.write_text(json.dumps({g0: 5000}))
    (usage_dir / "garbage.json").write_text("{}")
    own = usage_dir / f"{_claim(os.getpid())}.json"
    own.write_text("{not json")

    try:
        assert inv.process_memory() == {live.pid: {0: 1000, 1: 3000}}
        assert not dead.exists()  # a claim of a process that is gone is cleaned up
        assert own.exists()  # a malformed claim of a live process is only ignored

        states = {s.index: s for s in inv.states()}
        assert states[0].memory_used_mib == 1000 and states[1].memory_used_mib == 3000
        assert states[0].temperature_c is None and states[0].power_w is None
    finally:
        live.kill()
        live.wait()


def test_open_inventory_with_simulate_serves_the_simulated_pool(tmp_path):
    inv = open_inventory("2x16GiB", tmp_path, "gpuhost")
    try:
        assert inv.simulated and len(inv.gpus()) == 2
        assert (tmp_path / "simulated-usage").is_dir()
    finally:
        inv.close()


def test_without_nvidia_gpu_the_error_points_to_the_simulated_pool(tmp_path):
    try:
        NvmlInventory().close()
    except InventoryError:
        pass
    else:
        pytest.skip("NVML finds a GPU on this machine")
    with pytest.raises(InventoryError) as err:
        open_inventory(None, tmp_path, "gpuhost")
    assert "No NVIDIA GPU was found through NVML" in str(err.value)
    assert "--simulate-gpus 2x16GiB" in str(err.value)
