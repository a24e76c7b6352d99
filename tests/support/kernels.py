"""Kernels in tests, started as Jupyter starts them: from the real ``kernel.json`` that
`bitfusion kernelspec install` writes (``kernelspecs.kernel_json``), installed in a temporary
JUPYTER_PATH and found there by name; and the helpers that drive them."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from bitfusion_jupyter import kernelspecs
from bitfusion_jupyter.share_request import ShareRequest, from_args


def _share(share_args: tuple[str, ...]) -> tuple[ShareRequest, str, str | None]:
    """The share, kernel and servers of shim options such as ``-m 2048 -l HOST``, read by
    the shim's own parser (the folder is ``carry``'s business)."""
    from bitfusion_jupyter import shim

    args = shim.parse_args(["--connection-file", "{connection_file}", *share_args])
    if args.files is not None or args.no_files:
        raise ValueError("say carry=True or False, not --files or --no-files")
    return from_args(args), args.kernel, args.server_list


def shim_kernel_json(*share_args: str, carry: bool = False) -> dict[str, Any]:
    """The kernel.json that `bitfusion kernelspec install SHARE_ARGS` writes. Unless ``carry``,
    as with `--no-files`: test kernels start in this checkout, which the test gateway runs from
    and so cannot show at its own path, and most tests are about something else (test_files.py
    and the fault suite start kernels in project folders, without it, as users do)."""
    request, kernel, servers = _share(share_args)
    shown = "Python 3" if kernel == kernelspecs.DEFAULT_KERNEL else kernel
    return kernelspecs.kernel_json(
        request,
        kernel=kernel,
        servers=servers,
        display_name=kernelspecs.display_name_for(request, shown)
        + ("" if carry else kernelspecs.NO_FILES_SUFFIX),
        files=carry,
    )


def install_shim_kernelspec(
    jupyter_path: Path, *share_args: str, name: str | None = None, carry: bool = False
) -> str:
    """Write ``shim_kernel_json(*share_args, carry=carry)`` as kernelspec ``name`` under
    ``jupyter_path`` (a JUPYTER_PATH entry) and return its name: by default the one `install`
    gives, with the spec's hash (one name per spec)."""
    text = json.dumps(shim_kernel_json(*share_args, carry=carry), indent=1, ensure_ascii=False)
    if name is None:
        request, _, _ = _share(share_args)
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        name = f"{kernelspecs.default_name(request)}{'' if carry else '-nofiles'}-{digest}"
    folder = jupyter_path / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(text + "\n", encoding="utf-8")
    return name


@functools.cache
def _jupyter_path() -> Path:
    """This process's own JUPYTER_PATH entry for the kernelspecs of shim_kernel_manager."""
    path = Path(tempfile.mkdtemp(prefix="bitfusion-test-jupyter-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def shim_kernel_manager(*share_args: str, carry: bool = False) -> KernelManager:
    """A KernelManager, not started, for the kernelspec ``install_shim_kernelspec`` writes for
    ``share_args`` in a temporary JUPYTER_PATH (and only there: no other kernelspec of this
    machine can stand in for it)."""
    path = _jupyter_path()
    name = install_shim_kernelspec(path, *share_args, carry=carry)
    specs = KernelSpecManager(kernel_dirs=[str(path / "kernels")])
    return KernelManager(kernel_name=name, kernel_spec_manager=specs)


def point_client_at(gateway, monkeypatch) -> None:
    """Make this test process a client of ``gateway`` (kernels it starts inherit this)."""
    for key, value in gateway.env().items():
        if key.startswith("BITFUSION") or key == "PYTHONPATH":
            monkeypatch.setenv(key, value)


# Each test process (pytest-xdist worker) takes its kernels' ports from a range of its own,
# below the ephemeral ports. jupyter_client picks a port by binding port 0, which gives an
# ephemeral one, and closes it; before the kernel binds it, a connection that another test
# process beside this one opens can take it as its source port, and the kernel dies with
# "Address already in use".
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORT_RANGE = 2000
_PORTS = itertools.cycle(range(20000 + _WORKER * _PORT_RANGE, 20000 + (_WORKER + 1) * _PORT_RANGE))


def _free_port(ip: str) -> int:
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable: the cycle never ends")


def _own_ports(km: KernelManager) -> None:
    km.cache_ports = False  # or jupyter_client picks its own again
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        setattr(km, name, _free_port(km.ip or "127.0.0.1"))


def start_kernel(km: KernelManager, cwd: Path | None = None) -> tuple[KernelManager, object]:
    """Start ``km``'s kernel, as a Jupyter server does (in its notebook's folder ``cwd``),
    and return it with a client."""
    if km.transport == "tcp":
        _own_ports(km)
    km.start_kernel(**({"cwd": str(cwd)} if cwd is not None else {}))
    kc = km.client()
    kc.start_channels()
    return km, kc


def start_shim_kernel(*share_args: str) -> tuple[KernelManager, object]:
    """A kernel started through the shim, from its kernelspec, and its client."""
    return start_kernel(shim_kernel_manager(*share_args))


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


def run_cell(kc, code, timeout=60, stdin_hook=None):
    """Run ``code``; its execute_reply's content and the messages it sent on iopub."""
    outputs = []
    reply = kc.execute_interactive(
        code,
        timeout=timeout,
        output_hook=outputs.append,
        stdin_hook=stdin_hook,
        allow_stdin=stdin_hook is not None,
    )
    return reply["content"], outputs


def stream_text(outputs):
    """What a cell's iopub messages (from ``run_cell``) printed, stdout and stderr."""
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")


def until(kc, code, want, timeout=60):
    """Run ``code`` until its stdout is ``want`` (a kernel that just moved needs a moment)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            kc.wait_for_ready(timeout=10)
            reply, outputs = run_cell(kc, code, timeout=15)
            last = stream_text(outputs)
            if last == want:
                return
        except (RuntimeError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{code!r} printed {last!r}, not {want!r}")
