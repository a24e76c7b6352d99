"""What the widget and the server extension show, from data alone (no frontend, no gateway)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from bitfusion_jupyter import pool_model
from bitfusion_jupyter.live_widget import LiveView, View, pool_rows, share_view
from bitfusion_jupyter.pool_model import Answer
from bitfusion_jupyter.serverext import kernels, specs
from remoting.client import GatewayError


def usage(used: int = 700, lease: str = "held", updated: float | None = None) -> dict[str, Any]:
    return {
        "share_id": "s-1",
        "server": "gpu1:56001",
        "updated": time.time() if updated is None else updated,
        "lease": lease,
        "simulated": True,
        "gpus": [
            {
                "index": 1,
                "uuid": "GPU-1",
                "name": "Simulated GPU 16GiB",
                "mib": 2048,
                "used_mib": used,
                "utilization_pct": None,
                "memory_total_mib": 16384,
                "simulated": True,
            }
        ],
    }


def test_a_share_row_shows_size_use_and_lease_and_says_simulated():
    view = share_view(usage(), time.time())
    assert "s-1" in view.title and "SIMULATED" in view.title
    [row] = view.rows
    assert row.label == "gpu1:56001 · GPU 1: Simulated GPU 16GiB (SIMULATED)"
    assert (row.value, row.maximum, row.over) == (700, 2048, False)
    assert row.detail == "700 of 2048 MiB used (34%) · GPU utilisation - · lease held"
    assert view.message is None


def test_a_share_over_its_size_fills_the_bar_and_is_marked():
    [row] = share_view(usage(used=3000), time.time()).rows
    assert (row.value, row.maximum, row.over) == (2048, 2048, True)
    assert "3000 of 2048 MiB used (146%)" in row.detail


def test_share_states_are_said_in_a_sentence():
    assert "No usage sample" in share_view(None, time.time()).message
    stale = share_view(usage(updated=time.time() - 30), time.time()).message
    assert stale.startswith("The last usage sample is 30 s old")
    assert "not being renewed" in share_view(usage(lease="grace"), time.time()).message


def gpu_rows(granted: int = 0, shares: int = 0) -> dict[str, Any]:
    return {
        "server": "gpuhost",
        "simulated": True,
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-{i}",
                "name": "Simulated GPU 16GiB",
                "memory_total_mib": 16384,
                "memory_granted_mib": granted if i == 0 else 0,
                "memory_free_mib": 16384 - (granted if i == 0 else 0),
                "memory_used_mib": 0,
                "utilization_pct": None,
                "shares": shares if i == 0 else 0,
                "simulated": True,
                "draining": False,
            }
            for i in (0, 1)
        ],
    }


def share(share_id: str, owner: str, mib: int, used: int) -> dict[str, Any]:
    return {
        "share_id": share_id,
        "owner": owner,
        "gpus": [{"index": 0, "uuid": "GPU-0", "name": "x", "mib": mib, "simulated": True}],
        "usage_mib": {"0": used},
    }


def test_the_pool_view_splits_a_gpu_into_mine_and_others():
    answer = Answer(
        "gpu1:56001",
        gpus=gpu_rows(granted=6144, shares=2),
        shares={"shares": [share("a", "alice", 2048, 512), share("b", "bob", 4096, 0)]},
        user="alice",  # an admin token lists bob's share too: it is not alice's
    )
    pool = pool_model.pool_view(None, [answer], {("gpu1:56001", "a"): "k-1"})
    [server] = pool["servers"]
    assert server["hostname"] == "gpuhost" and server["simulated"] is True
    assert server["dashboard_url"] == "http://gpu1:54000/"  # a gateway that names no port
    gpu0, gpu1 = server["gpus"]
    assert gpu0["mine"] == [{"share_id": "a", "mib": 2048, "used_mib": 512, "kernel_id": "k-1"}]
    assert gpu0["others_mib"] == 4096 and gpu0["memory_free_mib"] == 10240
    assert gpu1["mine"] == [] and gpu1["others_mib"] == 0


def test_the_widget_lists_the_pool_one_row_per_gpu():
    answer = Answer("gpu1:56001", gpus=gpu_rows(2048, 1), shares={"shares": []}, user="alice")
    view = pool_rows(pool_model.pool_view(None, [answer]))
    assert [r.label for r in view.rows] == [
        "gpu1:56001 · GPU 0: Simulated GPU 16GiB (SIMULATED)",
        "gpu1:56001 · GPU 1: Simulated GPU 16GiB (SIMULATED)",
    ]
    assert (view.rows[0].value, view.rows[0].maximum) == (2048, 16384)
    assert view.rows[0].detail == "2048 MiB granted in 1 share, 14336 MiB free of 16384 MiB"
    assert view.message is None


def test_pool_states_are_said_in_a_sentence():
    unconfigured = pool_model.pool_view(pool_model.NO_SERVERS, [])
    assert unconfigured == {"configured": False, "message": pool_model.NO_SERVERS, "servers": []}
    assert pool_rows(unconfigured).message == pool_model.NO_SERVERS
    down = Answer("gpu2:56001", "unreachable", "Could not connect to gpu2:56001.")
    view = pool_rows(pool_model.pool_view(None, [down]))
    assert view.rows == [] and view.message == "gpu2:56001: Could not connect to gpu2:56001."
    assert pool_model.pool_view(None, [down])["servers"][0]["gpus"] == []


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (GatewayError("g:1", "The token is not accepted.", "auth"), "unauthorized"),
        (GatewayError("g:1", "The gateway refused the encrypted handshake."), "unauthorized"),
        (GatewayError("g:1", "Could not connect to gateway g:1."), "unreachable"),
        (GatewayError("g:1", "The gateway failed on this request.", "internal"), "error"),
    ],
)
def test_gateway_errors_become_states(error, state):
    assert error.state == state


def test_no_servers_configured_points_at_bitfusion_init(monkeypatch, tmp_path):
    from bitfusion_jupyter import config

    monkeypatch.delenv("BITFUSION_SERVERS", raising=False)
    monkeypatch.setenv("BITFUSION_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(config, "SYSTEM_SERVERS_CONF", tmp_path / "none.conf")
    assert pool_model.configured() == ([], pool_model.NO_SERVERS)


def test_a_kernel_is_matched_to_its_share_and_its_usage():
    sidecar = {
        "server": "gpu1:56001",
        "share_id": "a",
        "kernel": "python3",
        "shim_pid": 1,
        "since": 100.0,
        "lease_s": 30.0,
        "gpus": [{"index": 0, "name": "x", "uuid": "GPU-0", "mib": 2048, "simulated": True}],
    }
    running = [
        kernels.KernelShare("k-1", "bitfusion-1gpu", "busy", sidecar),
        kernels.KernelShare("k-2", "python3", "idle", None),
    ]
    answer = Answer("gpu1:56001", gpus={}, shares={"shares": [share("a", "alice", 2048, 300)]})
    view = kernels.kernels_view(running, {"gpu1:56001": answer})
    k1, k2 = view["kernels"]
    assert k1["share"]["gpus"][0]["used_mib"] == 300 and k1["execution_state"] == "busy"
    assert k2 == {
        "kernel_id": "k-2",
        "name": "python3",
        "execution_state": "idle",
        "share": None,
        "notice": None,
    }
    unknown = kernels.kernels_view(running[:1], {})["kernels"][0]["share"]["gpus"][0]
    assert unknown["used_mib"] is None  # the gateway did not answer: unknown, not zero
    assert kernels.kernel_of(running) == {("gpu1:56001", "a"): "k-1"}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"gpus": 1, "fraction": 1.5}, "fraction 1.5 is outside (0, 1]; give a fraction of a GPU"),
        ({"gpus": 0}, 'gpus 0 asks for no GPU; give "gpus": 1 or more.'),
        ({"gpus": True}, "gpus must be"),
        ({"gpus": 1, "mib": 2048, "fraction": 0.5}, "Give mib or fraction, not both."),
        ({"gpus": 1, "mib": "2048"}, "mib must be"),
        ({}, "how many GPUs"),
        (None, "JSON object"),
    ],
)
def test_bad_kernelspec_requests_are_refused_in_a_sentence(body, words):
    with pytest.raises(specs.SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        specs.read_request(body)


def test_a_good_kernelspec_request_reads_as_a_share_request():
    assert specs.read_request({"gpus": 2, "fraction": 0.5}).fraction == 0.5
    assert specs.read_request({"gpus": 1, "mib": 4096, "fraction": None}).mib == 4096


def _widget_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bitfusion-widget"]


def test_the_live_view_refreshes_and_its_thread_ends_with_it():
    pytest.importorskip("ipywidgets")
    seen = {"used": 100}
    view = LiveView(lambda: share_view(usage(used=seen["used"]), time.time()), interval=0.05)
    bar = view.box.children[2].children[1]
    assert (bar.value, bar.max) == (100, 2048)
    seen["used"] = 900
    deadline = time.monotonic() + 5
    while bar.value != 900 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bar.value == 900
    view.close()
    assert not view.running and view.closed and _widget_threads() == []


def test_closing_the_box_itself_stops_the_thread():
    pytest.importorskip("ipywidgets")
    view = LiveView(lambda: View("t", message="m"), interval=0.05)
    view.box.close()  # what happens when the widget's comm goes away
    view._thread.join(2)
    assert not view.running
    view.close()


def test_importing_the_package_loads_no_widget_until_one_is_asked_for():
    import subprocess
    import sys

    code = (
        "import sys, bitfusion_jupyter\n"
        "print('bitfusion_jupyter.live_widget' in sys.modules)\n"
        "from bitfusion_jupyter import widget\n"
        "print(widget.__name__, widget.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False", "widget bitfusion_jupyter.live_widget"]
