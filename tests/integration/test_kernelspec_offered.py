"""`bitfusion kernelspec install` asks the servers whether they offer the --kernel ENV and
could ever hold the share, so a typo or a share too big for the pool is refused at install
time, not when a notebook's kernel fails to start."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from gateway.spawned import free_port, stop_leftovers
from tests.support.gateways import start_gateway


@pytest.fixture
def torch_gateway(tmp_path):
    """A gateway that offers a `torch` kernel environment beside python3."""
    kernels = tmp_path / "kernels.json"
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernels.write_text(json.dumps({"torch": argv}))
    gw = start_gateway(tmp_path / "gw", "--simulate-gpus", "1x16GiB", "--kernels", str(kernels))
    yield gw
    gw.kill(signal.SIGTERM)
    stop_leftovers(gw.state_dir)


def _install(gw, tmp_path, *args):
    env = {**gw.env(), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    return gw.bf("kernelspec", "install", "--user", "-m", "1024", *args, env=env)


def test_a_kernel_the_server_offers_installs_without_a_note(torch_gateway, tmp_path):
    r = _install(torch_gateway, tmp_path, "--kernel", "torch")
    assert r.returncode == 0, r.stderr
    assert "Installed kernelspec bitfusion-1gpu-1024mib (torch · 1 GPU × 1 GiB)" in r.stdout
    assert r.stderr == ""


def test_a_kernel_no_server_offers_is_refused_and_nothing_is_installed(torch_gateway, tmp_path):
    r = _install(torch_gateway, tmp_path, "--kernel", "julia")
    assert r.returncode == 2 and "Traceback" not in r.stderr  # a usage error, as the others
    assert (
        f"No server offers a kernel named 'julia' ({torch_gateway.address} offers python3, "
        "torch); name one of those with --kernel" in r.stderr
    )
    assert not (tmp_path / "data" / "kernels").exists()


def test_a_server_that_does_not_answer_leaves_the_kernel_unchecked(torch_gateway, tmp_path):
    silent = f"127.0.0.1:{free_port()}"
    r = _install(
        torch_gateway, tmp_path, "--kernel", "julia", "-l", f"{torch_gateway.address},{silent}"
    )
    assert r.returncode == 0, r.stderr
    assert f"Note: {silent} did not answer, so --kernel julia was not checked" in r.stderr
    assert (tmp_path / "data" / "kernels" / "bitfusion-1gpu-1024mib" / "kernel.json").exists()


def test_a_share_larger_than_any_gpu_is_refused_and_nothing_is_installed(torch_gateway, tmp_path):
    env = {**torch_gateway.env(), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    r = torch_gateway.bf("kernelspec", "install", "--user", "-m", "20000", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        f"No server could ever hold 1 GPU × 20000 MiB: on {torch_gateway.address}, it asks for "
        "20000 MiB per GPU and the largest GPU here has 16384 MiB. Change -n, -m, -p or --filter"
    ) in r.stderr
    assert not (tmp_path / "data" / "kernels").exists()


def test_presets_leave_out_what_the_pool_can_never_hold(torch_gateway, tmp_path):
    env = {**torch_gateway.env(), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    r = torch_gateway.bf("kernelspec", "install", "--user", "--presets", env=env)
    assert r.returncode == 0, r.stderr
    assert (
        "Left out bitfusion-2gpu: no server could ever hold 2 GPUs (whole): on "
        f"{torch_gateway.address}, it asks for 2 GPUs and this server has 1 that qualify."
    ) in r.stdout
    installed = sorted(p.name for p in (tmp_path / "data" / "kernels").iterdir())
    assert installed == ["bitfusion-1gpu", "bitfusion-half-gpu", "bitfusion-quarter-gpu"]


def test_a_share_only_a_silent_server_might_hold_is_installed_with_a_note(torch_gateway, tmp_path):
    silent = f"127.0.0.1:{free_port()}"
    r = _install(torch_gateway, tmp_path, "-n", "2", "-l", f"{torch_gateway.address},{silent}")
    assert r.returncode == 0, r.stderr
    assert (
        f"Note: no server that answered could ever hold 2 GPUs × 1024 MiB, and {silent} did "
        "not answer; installed anyway."
    ) in r.stderr
    assert (tmp_path / "data" / "kernels" / "bitfusion-2gpu-1024mib" / "kernel.json").exists()
