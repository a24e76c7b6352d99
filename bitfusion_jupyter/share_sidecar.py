"""Which share a kernel runs on, told by its shim in a file beside the connection file.

The Jupyter server knows each kernel's connection file but nothing of shares; the shim
knows its share. For ``.../kernel-ID.json`` the shim keeps ``.../kernel-ID.bitfusion.json``
while it holds a share, rewrites it when the kernel moves to another share, and removes it
when it ends or the kernel goes back to a local one. The server extension reads it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from remoting.json_file import write_json

SUFFIX = ".bitfusion.json"
NOTICE_SUFFIX = ".bitfusion-notice.json"  # policing's last word on the kernel, for the panel


def path_for(connection_file: str | Path) -> Path:
    return Path(connection_file).with_suffix(SUFFIX)


def write(connection_file: str | Path, server: str, share: dict[str, Any], kernel: str,
          lease_s: float) -> None:  # fmt: skip
    path = path_for(connection_file)
    content = {
        "server": server,
        "share_id": share["share_id"],
        "kernel": kernel,
        "shim_pid": os.getpid(),
        "since": time.time(),
        "lease_s": lease_s,
        "gpus": [
            {k: g[k] for k in ("index", "name", "uuid", "mib", "simulated")} for g in share["gpus"]
        ],
    }
    try:
        write_json(path, content)
    except OSError:
        pass  # a read-only runtime dir costs the panel its view, not the kernel its run


def read(connection_file: str | Path) -> dict[str, Any] | None:
    return _read(path_for(connection_file))


def remove(connection_file: str | Path) -> None:
    _remove(path_for(connection_file))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def notice_path_for(connection_file: str | Path) -> Path:
    return Path(connection_file).with_suffix(NOTICE_SUFFIX)


def write_notice(connection_file: str | Path, notice: dict[str, Any]) -> None:
    """Keep policing's last notice on this kernel; it outlives a restart after a stop (the
    restarted kernel has the same connection file), and goes when the kernel shuts down."""
    try:
        write_json(notice_path_for(connection_file), notice)
    except OSError:
        pass


def read_notice(connection_file: str | Path) -> dict[str, Any] | None:
    return _read(notice_path_for(connection_file))


def remove_notice(connection_file: str | Path) -> None:
    _remove(notice_path_for(connection_file))


def prune(directory: str | Path, older_than_s: float = 60.0) -> None:
    """Remove our files left beside connection files that are gone: a kernel stopped by
    policing keeps its notice for the restart that a frontend may never make."""
    now = time.time()
    for suffix in (SUFFIX, NOTICE_SUFFIX):
        for path in Path(directory).glob(f"kernel-*{suffix}"):
            connection_file = path.with_name(path.name[: -len(suffix)] + ".json")
            try:
                if not connection_file.exists() and now - path.stat().st_mtime > older_than_s:
                    path.unlink()
            except OSError:
                pass
