"""The live widget in a real kernel on a share (through the shim and a real gateway): what a
notebook frontend receives on iopub while the kernel is busy, and the refresh thread ends with
the widget."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.kernels import point_client_at, reply_to, start_local_kernel

pytest.importorskip("ipywidgets")


def read_iopub_until(kc, seen: Callable[[dict[str, Any]], bool], timeout: float) -> list[dict]:
    """iopub messages, whatever cell they belong to, up to the first one ``seen`` accepts."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            break
        got.append(msg)
        if seen(msg):
            return got
    raise AssertionError(f"not seen within {timeout} s; got {[m['msg_type'] for m in got]}")


def _bar_state(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The state a message gives an IntProgress (comm_open) or sends it (comm_msg update)."""
    content = msg["content"]
    if msg["msg_type"] == "comm_open":
        state = content["data"].get("state", {})
        return state if state.get("_model_name") == "IntProgressModel" else None
    if msg["msg_type"] == "comm_msg" and content["data"].get("method") == "update":
        return content["data"]["state"]
    return None


def _update(msg: dict[str, Any]) -> dict[str, Any] | None:
    data = msg["content"].get("data") or {}
    return data.get("state") if msg["msg_type"] == "comm_msg" else None


def test_the_widget_shows_the_share_and_its_usage_while_the_kernel_is_busy(kernel):
    km, kc = kernel
    first = kc.execute("import bitfusion_jupyter\nw = bitfusion_jupyter.widget()")
    shown = read_iopub_until(
        kc, lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "idle", 30
    )
    bars = [s for m in shown if (s := _bar_state(m)) and m["msg_type"] == "comm_open"]
    if not bars:  # no usage sample yet at the first look: the next refresh builds the rows
        shown += read_iopub_until(kc, lambda m: "children" in (_update(m) or {}), 10)
        bars = [s for m in shown if (s := _bar_state(m)) and m["msg_type"] == "comm_open"]
    assert bars[0]["max"] == 2048 and bars[0]["value"] == 0  # the share's size, nothing used
    texts = " ".join(
        str(m["content"]["data"].get("state", {}).get("value", ""))
        for m in shown
        if m["msg_type"] == "comm_open"
    )
    assert "SIMULATED" in texts and "0 of 2048 MiB used" in texts
    displays = [m for m in shown if m["msg_type"] == "display_data"]
    assert len(displays) == 1  # `w = widget()` displays one view, not one per reference
    assert "application/vnd.jupyter.widget-view+json" in displays[0]["content"]["data"]

    assert reply_to(kc, first)["content"]["status"] == "ok"

    # Busy for 5 s while a process in the share holds 700 simulated MiB: the bar follows.
    busy = kc.execute(
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'gateway.simulated_alloc', '700',"
        " '--seconds', '30'])\n"
        "time.sleep(5)\n"
    )
    during = read_iopub_until(kc, lambda m: (_bar_state(m) or {}).get("value") == 700, 15)
    during += read_iopub_until(kc, lambda m: "700 of 2048 MiB used" in str(_update(m)), 5)
    finished = [
        m
        for m in during
        if m["msg_type"] == "status"
        and m["content"]["execution_state"] == "idle"
        and m["parent_header"].get("msg_id") == busy
    ]
    assert finished == []  # the update came while the cell still ran
    assert reply_to(kc, busy)["content"]["status"] == "ok"

    reply = kc.execute_interactive(
        "p.terminate(); p.wait(); w.close(); time.sleep(1.5)\n"
        "import threading\n"
        "print(w.running, [t.name for t in threading.enumerate() if 'bitfusion' in t.name])",
        timeout=30,
        output_hook=lambda m: shown.append(m),
    )
    assert reply["content"]["status"] == "ok"
    out = "".join(m["content"]["text"] for m in shown if m["msg_type"] == "stream")
    assert out.endswith("False []\n"), out  # no refresh thread left behind

    # `%bitfusion` alone shows the same live view.
    outputs: list[dict] = []
    reply = kc.execute_interactive("%bitfusion", timeout=30, output_hook=outputs.append)
    assert reply["content"]["status"] == "ok"
    [display] = [m for m in outputs if m["msg_type"] == "display_data"]
    assert "application/vnd.jupyter.widget-view+json" in display["content"]["data"]
    outputs.clear()
    kc.execute_interactive(
        "import ipywidgets; ipywidgets.Widget.close_all(); time.sleep(1.5)\n"
        "print([t.name for t in threading.enumerate() if 'bitfusion' in t.name])",
        timeout=30,
        output_hook=outputs.append,
    )
    assert [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"] == ["[]\n"]


def test_in_a_local_kernel_the_widget_shows_the_pool(gateway, monkeypatch):
    point_client_at(gateway, monkeypatch)
    km, kc = start_local_kernel()
    try:
        kc.wait_for_ready(timeout=60)
        outputs: list[dict] = []
        reply = kc.execute_interactive(
            "import bitfusion_jupyter\nw = bitfusion_jupyter.widget()\nw.close()",
            timeout=30,
            output_hook=outputs.append,
        )
        assert reply["content"]["status"] == "ok"
        texts = [
            m["content"]["data"]["state"].get("value")
            for m in outputs
            if m["msg_type"] == "comm_open"
        ]
        assert f"{gateway.address} · GPU 0: Simulated GPU 16 GiB (SIMULATED)" in texts
        assert f"{gateway.address} · GPU 1: Simulated GPU 16 GiB (SIMULATED)" in texts
        assert "0 MiB granted in 0 shares, 16384 MiB free of 16384 MiB" in texts
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
