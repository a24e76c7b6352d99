"""`bitfusion_jupyter.widget()`: a live ipywidgets view of this kernel's share, or of the pool.

In a kernel on a share it shows, per GPU, the share's size, the memory its processes use (the
gateway's NVML sampling, read from the file named by ``BITFUSION_USAGE_FILE``), utilisation
and the lease; in a local kernel it shows the pool of the configured servers. A daemon thread
refreshes it about once a second, also while the kernel runs a cell (ipykernel sends comm
messages from any thread), and stops when the widget is closed.

What is shown is decided by plain functions (`share_view`, `pool_rows`) that turn data into
a `View`; only `LiveView` knows ipywidgets, which is imported when a view is built.
"""

from __future__ import annotations

import html
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from remoting.share_env import USAGE_FILE as USAGE_FILE_ENV

INTERVAL_S = 1.0
STALE_S = 5.0  # the gateway samples every second; this long without a sample means trouble
SIM = "SIMULATED"


@dataclass(frozen=True)
class Row:
    """One GPU: a label, a bar (value of maximum) and a line of detail."""

    key: str
    label: str
    value: int
    maximum: int
    detail: str
    over: bool = False  # more in use than the share holds


@dataclass(frozen=True)
class View:
    title: str
    rows: list[Row] = field(default_factory=list)
    message: str | None = None  # a state the user should know of, in one sentence


def _gpu_label(server: str, gpu: dict[str, Any]) -> str:
    sim = f" ({SIM})" if gpu.get("simulated") else ""
    return f"{server} · GPU {gpu['index']}: {gpu['name']}{sim}"


def _pct(part: int, whole: int) -> int:
    return round(100 * part / whole) if whole > 0 else 0


def share_view(usage: dict[str, Any] | None, now: float) -> View:
    """This kernel's share, from the gateway's usage file (None: no sample yet)."""
    if usage is None:
        return View(
            "This kernel's share",
            message="No usage sample of this share yet; the gateway writes one about once a "
            "second, so wait a moment (or the share has ended: restart the kernel).",
        )
    server = usage["server"]
    title = f"This kernel's share {usage['share_id']} on {server}"
    if usage.get("simulated"):
        title += f" ({SIM} GPUs, no real GPU behind them)"
    lease = usage.get("lease", "held")
    rows = []
    for g in usage["gpus"]:
        used, mib = int(g["used_mib"]), int(g["mib"])
        util = "-" if g.get("utilization_pct") is None else f"{g['utilization_pct']}%"
        detail = (
            f"{used} of {mib} MiB used ({_pct(used, mib)}%) · GPU utilisation {util} · "
            f"lease {lease}"
        )
        rows.append(
            Row(str(g["index"]), _gpu_label(server, g), min(used, mib), mib, detail, used > mib)
        )
    message = None
    age = now - float(usage.get("updated", now))
    if age > STALE_S:
        message = f"The last usage sample is {age:.0f} s old: is the gateway on {server} running?"
    elif lease == "grace":
        message = (
            "The lease of this share is not being renewed: the share ends soon unless the "
            "kernel's shim reaches the gateway again."
        )
    return View(title, rows, message)


def pool_rows(pool: dict[str, Any]) -> View:
    """The pool, as `/bitfusion/api/pool` (pool_model.pool_view) describes it."""
    title = "GPU pool (this kernel runs locally; `%bitfusion -n 1 -m 2048` moves it onto a share)"
    if not pool["configured"]:
        return View(title, message=pool["message"])
    rows, problems = [], []
    for server in pool["servers"]:
        if server["state"] != "ok":
            problems.append(f"{server['address']}: {server['error']}")
            continue
        for g in server["gpus"]:
            total, granted = int(g["memory_total_mib"]), int(g["memory_granted_mib"])
            n = g["shares"]
            detail = (
                f"{granted} MiB granted in {n} share{'' if n == 1 else 's'}, "
                f"{g['memory_free_mib']} MiB free of {total} MiB"
            )
            mine = sum(m["mib"] for m in g["mine"])
            if mine:
                detail += f" ({mine} MiB yours)"
            rows.append(
                Row(
                    f"{server['address']}/{g['index']}",
                    _gpu_label(server["address"], g),
                    granted,
                    total,
                    detail,
                )  # fmt: skip
            )
    if not rows and not problems:
        problems.append("The configured servers have no GPUs.")
    return View(title, rows, " ".join(problems) or None)


def read_usage(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # not written yet, or the share has ended


def source_for_this_kernel() -> Callable[[], View]:
    """What this kernel's widget shows: its share if it runs on one, else the pool."""
    path = os.environ.get(USAGE_FILE_ENV)
    if path:
        return lambda: share_view(read_usage(path), time.time())

    def pool() -> View:
        from bitfusion_jupyter import pool_model

        return pool_rows(pool_model.snapshot())

    return pool


class LiveView:
    """The ipywidgets view and the thread that refreshes it; `close()` stops both.

    ``box`` is the ipywidgets VBox. Displaying a LiveView displays the box, except for the
    automatic display of the value `widget()` returns to the cell that created it (already
    displayed by `widget()`), so that `bitfusion_jupyter.widget()` shows one view, not two.
    """

    def __init__(self, source: Callable[[], View], interval: float = INTERVAL_S):
        import ipywidgets as w

        self._w = w
        self._source = source
        self._interval = interval
        self._stop = threading.Event()
        self._title = w.HTML()
        self._message = w.HTML()
        self._rows: dict[str, tuple[Any, Any, Any, Any]] = {}
        self.box = w.VBox([self._title, self._message])
        self._created_in: int | None = None
        self.apply(self._safe_read())
        self.box.observe(self._on_comm_change, names="comm")
        if self.box.comm is not None:
            self.box.comm.on_close(lambda _msg: self._stop.set())  # closed by the frontend
        self._thread = threading.Thread(target=self._run, name="bitfusion-widget", daemon=True)
        self._thread.start()

    # --- rendering -----------------------------------------------------------------------
    def _safe_read(self) -> View:
        try:
            return self._source()
        except Exception as exc:  # the view says what failed rather than freeze silently
            return View("bitfusion", message=f"This view could not be refreshed: {exc}")

    def apply(self, view: View) -> None:
        w = self._w
        self._title.value = f"<b>{html.escape(view.title)}</b>"
        self._message.value = (
            f"<span style='color:#b45309'>{html.escape(view.message)}</span>"
            if view.message
            else ""
        )
        if [r.key for r in view.rows] != list(self._rows):
            # Other GPUs (first sample, or pool changes): new row widgets, created with their
            # values so that the frontend's first sight of them is already right.
            old, self._rows = self._rows, {}
            for r in view.rows:
                label = w.HTML(html.escape(r.label), layout=w.Layout(width="40%"))
                bar = w.IntProgress(
                    value=r.value,
                    min=0,
                    max=max(r.maximum, 1),
                    bar_style="danger" if r.over else "",
                    layout=w.Layout(width="25%"),
                )
                detail = w.HTML(html.escape(r.detail))
                self._rows[r.key] = (label, bar, detail, w.HBox([label, bar, detail]))
            self.box.children = [self._title, self._message] + [
                row[3] for row in self._rows.values()
            ]
            for widgets in old.values():  # closed once no longer shown
                for widget in widgets:
                    widget.close()
            return
        for r in view.rows:
            label, bar, detail, _ = self._rows[r.key]
            label.value = html.escape(r.label)
            with bar.hold_sync():
                bar.max = max(r.maximum, 1)
                bar.value = r.value
                bar.bar_style = "danger" if r.over else ""
            detail.value = html.escape(r.detail)

    # --- life ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self.closed:
                break
            view = self._safe_read()
            if self._stop.is_set():
                break
            self.apply(view)

    @property
    def closed(self) -> bool:
        comm = self.box.comm
        return self._stop.is_set() or comm is None or getattr(comm, "_closed", False)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _on_comm_change(self, change: dict[str, Any]) -> None:
        if change["new"] is None:  # box.close() in the kernel
            self._stop.set()

    def close(self) -> None:
        """Stop refreshing and remove the view from the notebook."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for widgets in self._rows.values():
            for widget in widgets:
                widget.close()
        for widget in (self._title, self._message, self.box):
            widget.close()

    # --- display -------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        from IPython.display import display

        count = _execution_count()
        if count is not None and count == self._created_in:
            self._created_in = None  # the cell's own echo of `widget()`: shown already
            return
        display(self.box)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "live"
        return f"<bitfusion widget ({state}); .close() stops it>"


def _execution_count() -> int | None:
    try:
        from IPython.core.getipython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return None if shell is None else shell.execution_count


def widget(interval: float = INTERVAL_S) -> LiveView:
    """Show a live view of this kernel's share (or, in a local kernel, of the pool)."""
    from IPython.display import display

    view = LiveView(source_for_this_kernel(), interval)
    display(view.box)
    view._created_in = _execution_count()
    return view
