"""Writing a small JSON state file so that readers never see half of it.

Both ends keep such files (the client its token and held shares, the gateway its usage
files, a kernel shim its sidecar), and other processes read them at any moment: the data
goes to a temporary file beside the target, which then replaces it in one rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, *, mode: int = 0o644, indent: int | None = None) -> None:
    """Replace ``path`` with ``data`` as JSON; ``mode`` applies when the file is new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:  # a signal or a full disk: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
