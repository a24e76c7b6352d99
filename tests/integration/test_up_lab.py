"""`bitfusion up` ends in JupyterLab wired to its gateway, and Ctrl-C stops both."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from urllib.request import Request, urlopen

import pytest

from gateway.spawned import free_port
from remoting.util.procs import running
from tests.support.env import base_env
from tests.support.waiting import wait_for

pytest.importorskip("jupyterlab")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_jupyterlab_with_the_pool_until_ctrl_c(tmp_path):
    env = {
        **base_env(tmp_path),
        "HOME": str(tmp_path),
        "BITFUSION_CONFIG_DIR": str(tmp_path / "cfg"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    gw_port, lab_port, web_port = free_port(), free_port(), free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "bitfusion_jupyter", "up", "--port", str(gw_port)]
        + ["--lab-port", str(lab_port), "--state-dir", str(tmp_path / "state")]
        + ["--web-port", str(web_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        lines = []
        for line in up.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "/lab?token=" in line:
                break
        out = "".join(lines)
        url = re.search(r"http://127\.0\.0\.1:(\d+)/lab\?token=(\w+)", out)
        assert url, out
        assert int(url.group(1)) == lab_port
        assert "bitfusion-quarter-gpu" in out  # the presets were installed for the user
        assert (tmp_path / ".local/share/jupyter/kernels/bitfusion-1gpu/kernel.json").exists()
        with urlopen(
            f"http://127.0.0.1:{lab_port}/bitfusion/api/pool?token={url.group(2)}", timeout=30
        ) as r:
            pool = json.load(r)
        (server,) = pool["servers"]
        assert server["state"] == "ok" and len(server["gpus"]) == 2
        assert all(g["simulated"] for g in server["gpus"])
        # The gateway's cluster dashboard, for the admin token it wrote.
        dash = re.search(r"dashboard is at (http://127\.0\.0\.1:(\d+)/)", out)
        assert dash, out
        assert int(dash.group(2)) == web_port
        admin = (tmp_path / "state" / "admin.token").read_text().strip()
        req = Request(
            dash.group(1) + "api/v1/cluster", headers={"Authorization": f"Bearer {admin}"}
        )
        with urlopen(req, timeout=30) as r:
            assert [len(s["gpus"]) for s in json.load(r)["servers"]] == [2]
        # A notebook's kernel on a share, as the launcher starts one: Ctrl-C must end it too.
        start = Request(
            f"http://127.0.0.1:{lab_port}/api/kernels?token={url.group(2)}",
            data=json.dumps({"name": "bitfusion-quarter-gpu"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urlopen(start, timeout=120).close()
        shares = Request(dash.group(1) + "api/v1/shares", headers=req.headers)

        def kernel_on_a_share() -> bool:
            with urlopen(shares, timeout=30) as r:
                return any(s["runs"].startswith("kernel") for s in json.load(r)["shares"])

        assert wait_for(kernel_on_a_share, 90), "the kernel never ran on a share"
    finally:
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        rest = up.communicate(timeout=60)[0]
    assert up.returncode == 0, rest
    deadline = time.monotonic() + 10
    ports = (lab_port, gw_port, web_port)
    while any(_port_open(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _port_open(web_port), "the dashboard outlived `bitfusion up`"
    assert not _port_open(lab_port), "JupyterLab outlived `bitfusion up`"
    assert not _port_open(gw_port), "the gateway outlived `bitfusion up`"
    assert "Stopping JupyterLab: its kernels end and give their shares back." in rest
    # Nothing of the kernel is left: its nanny, its sandbox, its ipykernel.
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "state" / "run").glob("*.json")]
    left = [s for s in statuses if running(s["nanny_pid"]) or running(s["child_pid"])]
    assert left == [], f"processes outlived `bitfusion up`: {left}"
