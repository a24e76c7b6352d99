"""Fixtures of the integration tests that run kernels on a share."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec


def shim_spec(*share_args: str, carry: bool = False) -> KernelSpec:
    """A kernelspec as `bitfusion kernelspec install` writes it. Unless ``carry``, with
    `--no-files`: test kernels start in this checkout, which the test gateway runs from and
    so cannot show at its own path, and most tests are about something else (test_files.py
    and the fault suite start kernels in project folders, without it, as users do)."""
    return KernelSpec(
        argv=[
            sys.executable,
            "-m",
            "bitfusion_jupyter.shim",
            "--connection-file",
            "{connection_file}",
            *share_args,
            *([] if carry else ["--no-files"]),
        ],
        display_name="Python 3 · test share",
        language="python",
        interrupt_mode="signal",
    )


def point_client_at(gateway, monkeypatch) -> None:
    """Make this test process a client of ``gateway`` (kernels it starts inherit this)."""
    for key, value in gateway.env().items():
        if key.startswith("BITFUSION") or key == "PYTHONPATH":
            monkeypatch.setenv(key, value)


def start_kernel(km: KernelManager, cwd: Path | None = None) -> tuple[KernelManager, object]:
    """Start ``km``'s kernel, as a Jupyter server does (in its notebook's folder ``cwd``),
    and return it with a client."""
    km.start_kernel(**({"cwd": str(cwd)} if cwd is not None else {}))
    kc = km.client()
    kc.start_channels()
    return km, kc


def start_shim_kernel(*share_args: str) -> tuple[KernelManager, object]:
    """A kernel started through the shim, and its client."""
    km = KernelManager()
    km._kernel_spec = shim_spec(*share_args)
    return start_kernel(km)


def start_local_kernel(cwd: Path | None = None) -> tuple[KernelManager, object]:
    """A plain local python3 kernel (what a notebook has before `%bitfusion`), and its client."""
    return start_kernel(KernelManager(kernel_name="python3"), cwd)


def reply_to(kc, msg_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The shell reply to ``msg_id``, skipping any other: ``wait_for_ready`` sends another
    kernel_info each second it waits, and the late replies stay queued, as in any client."""
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


@contextlib.contextmanager
def ready(started: tuple[KernelManager, Any]) -> Iterator[tuple[KernelManager, Any]]:
    """A started kernel and its client, once ready; stopped on the way out, whatever failed."""
    km, kc = started
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture
def client_env(gateway, monkeypatch):
    point_client_at(gateway, monkeypatch)
    return gateway


@pytest.fixture
def kernel(client_env):
    km, kc = start_shim_kernel("-m", "2048")
    kc.wait_for_ready(timeout=60)
    yield km, kc
    kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel(now=True)
