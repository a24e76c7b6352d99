"""The jupyter_server extension against a real gateway on loopback (simulated pool): what the
JupyterLab panel reads and does through /bitfusion/api, in a real Jupyter server app."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any
from urllib.request import urlopen

import pytest

pytest.importorskip("pytest_jupyter")
pytest.importorskip("jupyter_server")

# pytest-jupyter's fixtures, for this module only: as a plugin its autouse fixtures would
# start a Jupyter server app around every test of the suite.
from pytest_jupyter.jupyter_server import *  # noqa: E402, F403

from bitfusion_jupyter import config, pool_model  # noqa: E402
from tests.support.gateways import start_web_gateway, stop_leftovers  # noqa: E402


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"bitfusion_jupyter": True}}}


@pytest.fixture
def client_of(monkeypatch, tmp_path):
    """Point this process (the Jupyter server, and kernels it starts) at a gateway."""
    monkeypatch.setattr(config, "SYSTEM_SERVERS_CONF", tmp_path / "no-system-servers.conf")

    def point(gateway, **extra: str) -> None:
        for key, value in gateway.env(**extra).items():
            if key.startswith("BITFUSION"):
                monkeypatch.setenv(key, value)

    return point


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


async def get(jp_fetch, *path: str) -> dict[str, Any]:
    r = await jp_fetch("bitfusion", "api", *path)
    return json.loads(r.body)


async def post(jp_fetch, *path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    r = await jp_fetch(
        "bitfusion", "api", *path, method="POST", body=json.dumps(body), raise_error=False
    )
    return r.code, json.loads(r.body)


def test_the_pool_shows_two_simulated_gpus(gateway, client_of, jp_fetch, jp_asyncio_loop):
    client_of(gateway)
    pool = run(jp_asyncio_loop, get(jp_fetch, "pool"))
    assert pool["configured"] is True and pool["message"] is None
    [server] = pool["servers"]
    assert server["address"] == gateway.address and server["state"] == "ok"
    assert server["simulated"] is True and server["error"] is None
    # The panel shows a badge only for a server whose shares are not sandboxed.
    assert server["sandbox"]["sandboxed"] is True and "bubblewrap" in server["sandbox"]["line"]
    assert server["dashboard_url"] is None  # this gateway serves no dashboard: no dead link
    assert [g["index"] for g in server["gpus"]] == [0, 1]
    for g in server["gpus"]:
        assert g["simulated"] is True
        assert g["memory_total_mib"] == 16384 and g["memory_free_mib"] == 16384
        assert g["mine"] == [] and g["others_mib"] == 0


def test_the_dashboard_link_names_the_port_the_gateway_serves_it_on(
    client_of, tmp_path, jp_fetch, jp_asyncio_loop
):
    gw, base = start_web_gateway(tmp_path, "--simulate-gpus", "1x8GiB")
    try:
        client_of(gw)
        [server] = run(jp_asyncio_loop, get(jp_fetch, "pool"))["servers"]
        assert server["dashboard_url"] == base + "/"
        with urlopen(server["dashboard_url"], timeout=5) as page:
            assert b"bitfusion" in page.read().lower()
    finally:
        gw.kill(signal.SIGTERM)
        stop_leftovers(gw.state_dir)


def test_no_servers_configured_says_how_to_fix_it(
    client_of, monkeypatch, tmp_path, jp_fetch, jp_asyncio_loop
):
    client_of  # noqa: B018 (only for its system servers.conf stand-in)
    monkeypatch.delenv("BITFUSION_SERVERS", raising=False)
    monkeypatch.setenv("BITFUSION_CONFIG_DIR", str(tmp_path / "empty-config"))
    pool = run(jp_asyncio_loop, get(jp_fetch, "pool"))
    assert pool == {"configured": False, "message": pool_model.NO_SERVERS, "servers": []}


def test_a_wrong_token_is_unauthorized(gateway, client_of, jp_fetch, jp_asyncio_loop):
    parts = gateway.token("alice").split(".")
    parts[4] = ("B" if parts[4][0] == "A" else "A") + parts[4][1:]  # a forged signature
    client_of(gateway, BITFUSION_TOKEN=".".join(parts))
    [server] = run(jp_asyncio_loop, get(jp_fetch, "pool"))["servers"]
    assert server["state"] == "unauthorized" and server["gpus"] == []
    assert "does not accept this token" in server["error"]


def test_a_stopped_gateway_is_unreachable(gateway, client_of, jp_fetch, jp_asyncio_loop):
    client_of(gateway)
    gateway.kill()
    [server] = run(jp_asyncio_loop, get(jp_fetch, "pool"))["servers"]
    assert server["state"] == "unreachable"
    assert "Could not connect" in server["error"] and gateway.address in server["error"]


def test_kernelspecs_are_made_once_and_bad_requests_refused(jp_fetch, jp_asyncio_loop):
    async def scenario() -> None:
        code, made = await post(jp_fetch, "kernelspecs", body={"gpus": 1, "mib": 3072})
        assert code == 200
        assert made == {
            "name": "bitfusion-1gpu-3072mib",
            "display_name": "Python 3 · 1 GPU × 3 GiB",
        }
        specs = json.loads((await jp_fetch("api", "kernelspecs")).body)["kernelspecs"]
        assert "bitfusion-1gpu-3072mib" in specs  # the server (and so the launcher) sees it
        presets = (await get(jp_fetch, "presets"))["presets"]
        assert presets == [
            {
                "name": "bitfusion-1gpu-3072mib",
                "display_name": "Python 3 · 1 GPU × 3 GiB",
                "gpus": 1,
                "mib": 3072,
                "fraction": None,
                "files": True,
            }
        ]
        assert await post(jp_fetch, "kernelspecs", body={"gpus": 1, "mib": 3072}) == (200, made)
        for bad, words in [
            ({"gpus": 1, "fraction": 1.5}, "fraction 1.5"),
            ({"gpus": 0}, "gpus 0 asks for no GPU"),
            ({"gpus": 1, "mib": 1024, "fraction": 0.5}, "not both"),
            ({"mib": 1024}, "how many GPUs"),
            ([1], "JSON object"),
        ]:
            code, reply = await post(jp_fetch, "kernelspecs", body=bad)
            assert code == 400 and words in reply["message"], (bad, reply)
        assert len((await get(jp_fetch, "presets"))["presets"]) == 1

    run(jp_asyncio_loop, scenario())


def test_a_share_no_server_could_ever_hold_gets_no_kernelspec(
    gateway, client_of, jp_fetch, jp_asyncio_loop
):
    client_of(gateway)  # two 16 GiB GPUs

    async def scenario() -> None:
        code, reply = await post(jp_fetch, "kernelspecs", body={"gpus": 1, "mib": 40000})
        assert code == 400, reply
        assert reply["message"].startswith(
            f"No server could ever hold 1 GPU × 40000 MiB: on {gateway.address}, it asks for "
            "40000 MiB per GPU and the largest GPU here has 16384 MiB."
        )
        code, reply = await post(jp_fetch, "kernelspecs", body={"gpus": 3})
        assert code == 400 and "this server has 2 that qualify" in reply["message"], reply
        assert (await get(jp_fetch, "presets"))["presets"] == []  # nothing was installed
        code, made = await post(jp_fetch, "kernelspecs", body={"gpus": 2, "mib": 16384})
        assert code == 200 and made["name"] == "bitfusion-2gpu-16384mib"

    run(jp_asyncio_loop, scenario())


async def _wait_for_share(jp_fetch, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [kernel] = (await get(jp_fetch, "kernels"))["kernels"]
        if kernel["share"] is not None:
            return kernel
        await asyncio.sleep(0.3)
    raise AssertionError("the kernel's share never showed in /bitfusion/api/kernels")


def test_a_kernel_on_a_share_is_seen_live_and_shut_down(
    gateway, client_of, jp_fetch, jp_ws_fetch, jp_asyncio_loop
):
    client_of(gateway)

    async def scenario() -> str:
        code, spec = await post(jp_fetch, "kernelspecs", body={"gpus": 1, "mib": 2048})
        assert code == 200
        r = await jp_fetch("api", "kernels", method="POST", body=json.dumps(spec))
        kid = json.loads(r.body)["id"]
        kernel = await _wait_for_share(jp_fetch)
        assert kernel["kernel_id"] == kid and kernel["name"] == spec["name"]
        share = kernel["share"]
        assert share["server"] == gateway.address and share["kernel"] == "python3"
        [gpu] = share["gpus"]
        assert gpu["mib"] == 2048 and gpu["simulated"] is True and gpu["used_mib"] == 0

        [server] = (await get(jp_fetch, "pool"))["servers"]
        mine = [m for g in server["gpus"] for m in g["mine"]]
        assert mine == [
            {"share_id": share["share_id"], "mib": 2048, "used_mib": 0, "kernel_id": kid}
        ]

        ws = await jp_ws_fetch("bitfusion", "api", "live")
        first = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        second = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        ws.close()
        for push in (first, second):
            assert push["kernels"]["kernels"][0]["share"]["share_id"] == share["share_id"]
            assert push["pool"]["servers"][0]["state"] == "ok"

        code, reply = await post(jp_fetch, "kernels", "no-such-kernel", "shutdown")
        assert code == 404 and "no-such-kernel" in reply["message"]
        assert await post(jp_fetch, "kernels", kid, "shutdown") == (200, {"shut_down": kid})
        assert (await get(jp_fetch, "kernels")) == {"kernels": []}
        return kid

    run(jp_asyncio_loop, scenario())
    assert gateway.no_shares_within(15), "shutting the kernel down did not free its share"
