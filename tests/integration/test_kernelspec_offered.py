"""`bitfusion kernelspec install --kernel ENV` asks the servers whether they offer ENV, so a
typo is refused at install time, not when a notebook's kernel fails to start."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from gateway.spawned import free_port, stop_leftovers
from tests.conftest import start_gateway


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
