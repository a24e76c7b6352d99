"""A real `jupyter server` (what JupyterLab and Notebook 7 run on) starts a bitfusion
kernelspec, runs a cell through its REST API and WebSocket, and shuts the kernel down."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from urllib.request import Request, urlopen

import pytest
from tornado.websocket import websocket_connect

from gateway.spawned import free_port

pytest.importorskip("jupyter_server")


@pytest.fixture
def server(gateway, tmp_path):
    kernels = tmp_path / "jupyter" / "kernels" / "bitfusion-1gpu"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [
                    sys.executable,
                    "-m",
                    "bitfusion_jupyter.shim",
                    "--connection-file",
                    "{connection_file}",
                    "-m",
                    "3072",
                ],
                "display_name": "Python 3 · 1 GPU × 3 GiB",
                "language": "python",
                "interrupt_mode": "signal",
            }
        )
    )
    port, token = free_port(), uuid.uuid4().hex
    project = tmp_path / "project"
    project.mkdir()
    env = {
        **gateway.env(),
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "HOME": str(tmp_path),
    }
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--no-browser",
                f"--port={port}",
                "--ServerApp.ip=127.0.0.1",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={project}",  # kernels carry it, as users' do
                "--allow-root",
                '--ServerApp.jpserver_extensions={"bitfusion_jupyter": True}',
                "--BitfusionExtension.busy_check_s=0.5",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        yield base, token
        proc.terminate()
        proc.wait(20)


def _api(base, token, method, path, body=None):
    req = Request(
        f"{base}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    with urlopen(req, timeout=60) as r:
        text = r.read()
    return json.loads(text) if text else None


async def _execute(base, token, kernel_id, code):
    ws = await websocket_connect(
        f"{base.replace('http', 'ws')}/api/kernels/{kernel_id}/channels?token={token}"
    )
    msg_id = uuid.uuid4().hex
    await ws.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "t",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": "",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": False,
                },
            }
        )
    )
    # Like JupyterLab, read until the kernel is idle again: the reply (shell) and the
    # output (iopub) travel on different sockets, and either may come first.
    out, status, idle = "", None, False
    deadline = time.monotonic() + 60
    while not (status and idle) and time.monotonic() < deadline:
        msg = json.loads(await asyncio.wait_for(ws.read_message(), 60))
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
        if msg["msg_type"] == "execute_reply":
            status = msg["content"]["status"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    ws.close()
    return status, out


def test_jupyter_server_runs_a_cell_on_a_share(server, gateway):
    base, token = server
    specs = _api(base, token, "GET", "/api/kernelspecs")
    assert "bitfusion-1gpu" in specs["kernelspecs"]
    # With its notebook's path, as JupyterLab starts one: it works in that folder.
    body = {"name": "bitfusion-1gpu", "path": "Untitled.ipynb"}
    kernel = _api(base, token, "POST", "/api/kernels", body)
    status, out = asyncio.run(
        _execute(base, token, kernel["id"], "import os; print(os.environ['BITFUSION_MEMORY_MIB'])")
    )
    assert status == "ok" and out == "3072\n"
    assert '"shares": []' not in gateway.bf("list_shares", "--json").stdout
    _api(base, token, "DELETE", f"/api/kernels/{kernel['id']}")
    assert gateway.no_shares_within(20), (
        "shutting the kernel down in the server did not free its share"
    )


def test_a_cell_busy_on_a_share_keeps_the_server_active(server, gateway):
    """A cell computing on a GPU sends nothing for as long as it runs; the server must still
    report activity (JupyterHub's idle culler stops servers that report none)."""
    base, token = server
    kernel = _api(base, token, "POST", "/api/kernels", {"name": "bitfusion-1gpu"})
    asyncio.run(_execute(base, token, kernel["id"], "1"))  # started and idle

    async def busy_then_watch() -> list[str]:
        ws = await websocket_connect(
            f"{base.replace('http', 'ws')}/api/kernels/{kernel['id']}/channels?token={token}"
        )
        header = {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "t",
                  "session": uuid.uuid4().hex, "version": "5.3", "date": ""}  # fmt: skip
        content = {"code": "import time; time.sleep(8)", "silent": False}
        await ws.write_message(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                                           "channel": "shell", "content": content}))  # fmt: skip
        await asyncio.sleep(2)  # busy by now, and silent from here on
        seen = []
        for _ in range(4):
            seen.append(_api(base, token, "GET", "/api/status")["last_activity"])
            await asyncio.sleep(1)
        ws.close()
        return seen

    seen = asyncio.run(busy_then_watch())
    assert len(set(seen)) >= 3, f"the server looked idle during a busy cell: {seen}"
    _api(base, token, "DELETE", f"/api/kernels/{kernel['id']}")
    assert gateway.no_shares_within(20)
