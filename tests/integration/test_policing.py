"""Policing on the simulated pool: usage is seen, an over-share process is warned and stopped."""

import json
import signal
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from bitfusion_jupyter import share_sidecar
from tests.support.kernels import install_shim_kernelspec, reply_to, start_shim_kernel


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


def test_run_explains_the_exit_status_of_a_stopped_command(gateway):
    client = _alloc(gateway, 2048, 5000)
    _, err = client.communicate(timeout=40)
    assert client.returncode == 137
    assert (
        "the gateway's policing stopped the command: it used 5000 MiB of GPU memory on GPU 0, "
        "more than its share's 2048 MiB (exit status 137, 128+SIGKILL)" in err
    ), err
    assert "Traceback" not in err


def test_run_explains_a_command_killed_by_a_signal_it_was_not_sent(gateway):
    r = gateway.bf("run", "-m", "1024", "--", "sh", "-c", "kill -SEGV $$")
    assert r.returncode == 128 + signal.SIGSEGV
    assert "the command was killed by SIGSEGV (exit status 139, 128+SIGSEGV)." in r.stderr


def _notebook(*sources: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    return nb


def _stderr(cell) -> str:
    return "".join(o["text"] for o in cell.outputs if o.get("name") == "stderr")


@pytest.fixture
def shim_kernelspec(client_env, tmp_path, monkeypatch):
    install_shim_kernelspec(tmp_path / "share" / "jupyter", "-m", "2048", name="bf-2048")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    return "bf-2048"


def test_a_child_over_the_share_is_warned_and_stopped_in_the_cells_output(
    client_env, shim_kernelspec
):
    nb = _notebook(
        "import subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'gateway.simulated_alloc', '5000',"
        " '--seconds', '30'])\n"
        "print('child exit', r.returncode)",
        "print('the kernel lives on')",
    )
    NotebookClient(nb, kernel_name=shim_kernelspec, timeout=60).execute()
    err = _stderr(nb.cells[0])
    # The warning, with its numbers and the seconds left, then the stop, in the cell itself.
    assert (
        "uses 5000 MiB on GPU 0, more than its 2048 MiB; its processes will be stopped in 1 s"
        in err
    )
    assert "its processes on that GPU are being stopped" in err
    assert "child exit -9" in "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert nb.cells[1].outputs[0]["text"] == "the kernel lives on\n"
    assert client_env.no_shares_within(15)


def test_a_kernel_over_its_share_ends_its_cell_with_the_reason(client_env, shim_kernelspec):
    nb = _notebook(
        "from gateway.simulated_alloc import hold\nhold(5000)\nimport time\ntime.sleep(30)"
    )
    client = NotebookClient(nb, kernel_name=shim_kernelspec, timeout=60)
    with pytest.raises(CellExecutionError) as raised:
        client.execute()
    # nbclient reports the cell's error as the kernel gave it, not a dead kernel.
    assert "GPUShareExceeded" in str(raised.value)
    cell = nb.cells[0]
    assert "will be stopped in 1 s" in _stderr(cell)
    error = next(o for o in cell.outputs if o["output_type"] == "error")
    assert error["ename"] == "GPUShareExceeded"
    assert error["evalue"].startswith(
        "The gateway's policing stopped this kernel: it used 5000 MiB of GPU memory on GPU 0, "
        "more than its share's 2048 MiB (exit status 137)."
    )
    assert "%bitfusion -m MIB" in error["evalue"]
    assert client_env.no_shares_within(15)


def test_the_notices_carry_their_numbers_and_the_stop_outlives_the_kernel(client_env):
    """What the JupyterLab extension and the panel read: each notice's numbers in the
    message's metadata, and the stopped kernel's reason beside its connection file."""
    km, kc = start_shim_kernel("-m", "2048")
    try:
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(
            "from gateway.simulated_alloc import hold\nhold(3000)\nimport time\ntime.sleep(30)"
        )
        notices = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(notices) < 3:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") == msg_id and "bitfusion" in msg["metadata"]:
                notices.append(msg["metadata"]["bitfusion"]["notice"])
        assert [n["action"] for n in notices] == ["warn", "stop", "kernel_stopped"]
        warn = notices[0]
        assert (warn["gpu_index"], warn["used_mib"], warn["limit_mib"], warn["stop_in_s"]) == (
            0,
            3000,
            2048,
            1,
        )
        reply = reply_to(kc, msg_id)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "GPUShareExceeded"
        deadline = time.monotonic() + 10
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not km.is_alive()  # the shim ended with its kernel, as Jupyter expects
        kept = share_sidecar.read_notice(km.connection_file)
        assert kept is not None and kept["action"] == "kernel_stopped"
        assert "more than its share's 2048 MiB" in kept["message"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    share_sidecar.remove_notice(km.connection_file)
