"""Kernels started both ways, through a real gateway: by the shim alone (the kernelspec's argv)
and by the `bitfusion-provisioner`, which takes the share in the Jupyter client's process and
hands it to the shim. Kernelspecs come from the real `bitfusion kernelspec install`, into a
private JUPYTER_PATH, and are started by name, as a Jupyter server starts them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
from jupyter_client import KernelManager

from bitfusion_jupyter.pool import Pool
from bitfusion_jupyter.provisioner import BitfusionProvisioner, ShareError
from bitfusion_jupyter.serverext import kernels
from bitfusion_jupyter.share_request import ShareRequest
from gateway.spawned import free_port
from tests.support.kernels import start_kernel
from tests.support.waiting import wait_for

WAYS = ["shim", "provisioner"]


@pytest.fixture
def install(client_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``install(name, *options)``: `bitfusion kernelspec install` into a JUPYTER_PATH of this
    test's own; every kernelspec here has --no-files (test kernels start in this checkout,
    which the test gateway runs from and so refuses to carry)."""
    prefix = tmp_path / "prefix"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))

    def run(name: str, *options: str) -> dict[str, Any]:
        r = client_env.bf(
            "kernelspec", "install", "--no-files", "--name", name, "--prefix", str(prefix),
            *options,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        path = prefix / "share" / "jupyter" / "kernels" / name / "kernel.json"
        return json.loads(path.read_text())

    return run


def grants(gateway) -> list[str]:
    """The share ids the gateway granted alice."""
    r = gateway.bf("list_shares", "--json")
    return [
        e["share_id"] for e in json.loads(r.stdout)[0]["data"]["events"] if e["kind"] == "grant"
    ]


def share_in_kernel(kc) -> tuple[str, str]:
    """The share id and MiB the kernel's own environment names (it runs inside the share)."""
    code = "import os; print(os.environ['BITFUSION_SHARE_ID'], os.environ['BITFUSION_MEMORY_MIB'])"
    outputs: list[dict] = []
    reply = kc.execute_interactive(code, timeout=60, output_hook=outputs.append)
    assert reply["content"]["status"] == "ok"
    text = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
    share_id, mib = text.split()
    return share_id, mib


def info_of(km: KernelManager) -> dict[str, Any]:
    return asyncio.run(km.provisioner.get_provisioner_info())


class OneKernel:
    """The part of a jupyter_server MappingKernelManager the server extension reads."""

    def __init__(self, km: KernelManager) -> None:
        self.km = km

    def list_kernel_ids(self) -> list[str]:
        return ["k1"]

    def get_kernel(self, kernel_id: str) -> KernelManager:
        return self.km


@contextlib.contextmanager
def kernel(name: str) -> Iterator[tuple[KernelManager, Any]]:
    """The kernel of kernelspec ``name``, started as a Jupyter server starts it, once ready;
    stopped on the way out unless the test stopped it."""
    km, kc = start_kernel(KernelManager(kernel_name=name))
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


@pytest.mark.parametrize("way", WAYS)
def test_a_kernel_holds_its_share_while_it_runs_and_frees_it_after(way, install, client_env):
    spec = install("gpu", "-m", "2048", *(["--provisioner"] if way == "provisioner" else []))
    assert spec["argv"][1:3] == ["-m", "bitfusion_jupyter.shim"]  # both ways: the shim runs
    with kernel("gpu") as (km, kc):
        provisioner = km.provisioner
        share_id, mib = share_in_kernel(kc)
        assert mib == "2048"
        [held] = client_env.shares()
        assert held["share_id"] == share_id
        # One grant: with the provisioner the shim took over its share rather than its own.
        assert grants(client_env) == [share_id]
        info = info_of(km)
        if way == "provisioner":
            assert isinstance(provisioner, BitfusionProvisioner)
            assert info["share"]["share_id"] == share_id
            assert info["share"]["server"] == client_env.address
            assert provisioner.share is not None and provisioner.share["share_id"] == share_id
        else:
            assert not isinstance(provisioner, BitfusionProvisioner)
            assert "share" not in info
        km.shutdown_kernel()
    assert client_env.no_shares_within(10), "the share outlived its kernel"
    if way == "provisioner":
        assert (
            provisioner.share is None
            and asyncio.run(provisioner.get_provisioner_info())["share"] is None
        )


@pytest.mark.parametrize("way", WAYS)
def test_a_restart_runs_on_a_fresh_share_and_frees_the_old(way, install, client_env):
    install("gpu", "-m", "1024", *(["--provisioner"] if way == "provisioner" else []))
    with kernel("gpu") as (km, kc):
        first, _ = share_in_kernel(kc)
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        second, mib = share_in_kernel(kc)
        assert second != first and mib == "1024"
        held = [s["share_id"] for s in client_env.shares()]
        if way == "provisioner":
            # Given back in cleanup, before the restart took the new one.
            assert held == [second]
            assert km.provisioner.share["share_id"] == second
        else:
            # The killed shim could not give it back: it goes when its lease runs out.
            assert held in ([second], [first, second], [second, first])
            assert wait_for(lambda: [s["share_id"] for s in client_env.shares()] == [second], 10)
        assert sorted(grants(client_env)) == sorted([first, second])
    assert client_env.no_shares_within(10)


@pytest.mark.parametrize("way", WAYS)
def test_a_graceful_restart_keeps_the_provisioners_share(way, install, client_env):
    """The provisioner owns the share: a restart runs the new kernel on it again. The shim
    alone gives its share back as it ends, so its restart takes a fresh one."""
    install("gpu", "-m", "1024", *(["--provisioner"] if way == "provisioner" else []))
    with kernel("gpu") as (km, kc):
        first, _ = share_in_kernel(kc)
        kc.execute_interactive("x = 42", timeout=30)
        km.restart_kernel(now=False)  # a shutdown_request, as JupyterLab's "Restart" sends
        kc.wait_for_ready(timeout=60)
        second, mib = share_in_kernel(kc)
        assert mib == "1024"
        said: list[dict] = []
        kc.execute_interactive("print('x' in dir())", timeout=30, output_hook=said.append)
        text = "".join(m["content"]["text"] for m in said if m["msg_type"] == "stream")
        assert text.strip() == "False"  # a fresh kernel: its variables are gone
        if way == "provisioner":
            assert second == first
            assert grants(client_env) == [first]  # one grant for both kernels
            [held] = client_env.shares()
            assert [p["kernel"] for p in held["processes"]] == ["python3"]  # the old one ended
        else:
            assert second != first
            assert [s["share_id"] for s in client_env.shares()] == [second]  # old one freed
    assert client_env.no_shares_within(10)


def test_the_provisioner_frees_the_share_of_a_killed_shim_at_once(install, client_env):
    """A shim killed with SIGKILL cannot give its share back; without the provisioner the
    gateway frees it only when its lease runs out."""
    install("gpu", "-m", "2048", "--provisioner")
    with kernel("gpu") as (km, kc):
        assert len(client_env.shares()) == 1
        km.shutdown_kernel(now=True)  # SIGKILL
        assert client_env.shares() == []  # released in cleanup, before shutdown returned


def test_the_server_extension_sees_the_provisioners_share(install, client_env):
    install("gpu", "-m", "2048", "--provisioner")
    with kernel("gpu") as (km, kc):
        share_id, _ = share_in_kernel(kc)

        [row] = kernels.running(OneKernel(km))
        assert row.sidecar == km.provisioner.share and row.sidecar["share_id"] == share_id
        assert "shim_pid" not in row.sidecar  # the provisioner's word, not the sidecar file's
        assert kernels.kernel_of([row]) == {(client_env.address, share_id): "k1"}


def test_after_the_magic_moves_the_kernel_the_panel_follows_the_shim(install, client_env):
    """%bitfusion in a provisioned kernel: the shim takes the new share and gives the
    provisioner's back; the server extension shows the new one, and shutting down frees it."""
    install("gpu", "-m", "1024", "--provisioner")
    with kernel("gpu") as (km, kc):
        first, _ = share_in_kernel(kc)
        reply = kc.execute_interactive("%bitfusion -m 2048", timeout=60)
        assert reply["content"]["status"] == "ok"

        def moved() -> bool:
            ids = [s["share_id"] for s in client_env.shares()]
            return len(ids) == 1 and ids != [first]

        assert wait_for(moved, 30), "the kernel did not move"
        [second] = [s["share_id"] for s in client_env.shares()]
        assert wait_for(lambda: km.provisioner.share is None, 10)  # it heard at a renewal
        assert wait_for(lambda: kernels.running(OneKernel(km))[0].sidecar is not None, 30)
        [row] = kernels.running(OneKernel(km))
        assert row.sidecar["share_id"] == second
        km.shutdown_kernel()
    assert client_env.no_shares_within(10)


def test_another_provisioner_takes_the_share_over_from_its_info(install, client_env):
    """What get_provisioner_info saves is enough for another server process to renew the
    share and give it back (load_provisioner_info)."""
    install("gpu", "-m", "2048", "--provisioner")
    with kernel("gpu") as (km, kc):
        share_id, _ = share_in_kernel(kc)
        info = info_of(km)
        other = BitfusionProvisioner(kernel_id=info["kernel_id"], kernel_spec=km.kernel_spec)
        share = json.loads(json.dumps(info["share"]))  # saved as JSON, like the rest
        asyncio.run(other.load_provisioner_info({**info, "share": share}))
        assert other.share is not None and other.share["share_id"] == share_id
        asyncio.run(other.cleanup())
        assert client_env.shares() == []
        asyncio.run(other.cleanup())  # a second release: nothing to do, no error


def test_a_share_that_cannot_be_had_stops_the_start_with_one_sentence(
    install, client_env, monkeypatch
):
    install("gpu", "-m", "2048", "--provisioner")
    pool = Pool.from_config(None)
    blocker = pool.allocate(ShareRequest(2), release_on_exit=True)  # both GPUs, whole
    try:
        km = KernelManager(kernel_name="gpu")
        with pytest.raises(ShareError) as raised:
            km.start_kernel()
        sentence = str(raised.value)
        assert sentence.startswith("No room for 1 GPU × 2048 MiB on ") and " now" in sentence
        assert "\n" not in sentence and "Traceback" not in sentence
        assert raised.value.status_code == 503
        assert [s["share_id"] for s in client_env.shares()] == [blocker.share_id]
        assert not km.has_kernel
    finally:
        blocker.release(3.0)
        pool.close()

    parts = os.environ["BITFUSION_TOKEN"].split(".")
    parts[4] = ("B" if parts[4][0] == "A" else "A") + parts[4][1:]  # a forged signature
    monkeypatch.setenv("BITFUSION_TOKEN", ".".join(parts))
    with pytest.raises(ShareError) as raised:
        KernelManager(kernel_name="gpu").start_kernel()
    assert "does not accept this token" in str(raised.value)
    assert raised.value.status_code == 403 and "\n" not in str(raised.value)


@contextlib.contextmanager
def jupyter_server(gateway, tmp_path: Path) -> Iterator[Any]:
    """A real `jupyter server` (what JupyterLab runs on), a client of ``gateway``, seeing the
    kernelspecs of ``install``; yields a function that calls its REST API: (status, body)."""
    port, token = free_port(), uuid.uuid4().hex
    env = {
        **gateway.env(),
        "JUPYTER_PATH": os.environ["JUPYTER_PATH"],
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "HOME": str(tmp_path),
    }
    base = f"http://127.0.0.1:{port}"

    def api(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        req = Request(
            f"{base}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        )
        try:
            with urlopen(req, timeout=60) as r:
                status, text = r.status, r.read()
        except HTTPError as exc:
            status, text = exc.code, exc.read()
        return status, json.loads(text) if text else None

    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={tmp_path}", "--allow-root",
             '--ServerApp.jpserver_extensions={"bitfusion_jupyter": True}'],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            assert wait_for(lambda: _answers(api), 60), (tmp_path / "server.log").read_text()
            yield api
        finally:
            proc.terminate()
            proc.wait(20)


def _answers(api: Any) -> bool:
    try:
        return api("GET", "/api/status")[0] == 200
    except OSError:
        return False


def test_in_a_jupyter_server_the_refusal_is_the_reply_and_the_panel_sees_the_share(
    install, client_env, tmp_path
):
    """As JupyterLab starts a kernel: a share that cannot be had is the start request's
    answer, one sentence (JupyterLab shows it in its "Error Starting Kernel" dialog)."""
    install("gpu", "-m", "2048", "--provisioner")
    with jupyter_server(client_env, tmp_path) as api:
        assert "gpu" in api("GET", "/api/kernelspecs")[1]["kernelspecs"]
        pool = Pool.from_config(None)
        blocker = pool.allocate(ShareRequest(2), release_on_exit=True)
        try:
            status, body = api("POST", "/api/kernels", {"name": "gpu"})
        finally:
            blocker.release(3.0)
            pool.close()
        assert status == 503, body
        assert body["message"].startswith("No room for 1 GPU × 2048 MiB on ")
        assert "\n" not in body["message"] and not body.get("traceback")

        status, started = api("POST", "/api/kernels", {"name": "gpu"})
        assert status == 201, started
        [share] = client_env.shares()
        # The server extension (the panel's API) shows the kernel's share as the
        # provisioner holds it.
        rows = api("GET", "/bitfusion/api/kernels")[1]["kernels"]
        assert [(r["kernel_id"], r["share"]["share_id"]) for r in rows] == [
            (started["id"], share["share_id"])
        ]
        assert rows[0]["share"]["gpus"][0]["mib"] == 2048
        assert api("DELETE", f"/api/kernels/{started['id']}")[0] == 204
        assert client_env.no_shares_within(10)
