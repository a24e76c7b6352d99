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
    try:
        return json.loads(path_for(connection_file).read_text())
    except (OSError, ValueError):
        return None


def remove(connection_file: str | Path) -> None:
    try:
        path_for(connection_file).unlink(missing_ok=True)
    except OSError:
        pass
