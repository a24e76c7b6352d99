"""Is an NVIDIA MPS control daemon running here? With one, memory caps per share are enforced
by the driver (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT) instead of only by policing."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
DAEMON = "nvidia-cuda-mps-control"


def mps_pipe_dir(env: Mapping[str, str] = os.environ) -> str | None:
    """The MPS pipe directory when it holds the daemon's ``control`` pipe, else None."""
    pipe_dir = env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
    try:
        mode = (Path(pipe_dir) / "control").stat().st_mode
    except OSError:
        return None
    return pipe_dir if stat.S_ISFIFO(mode) else None


def mps_running(env: Mapping[str, str] = os.environ, proc: Path = Path("/proc")) -> bool:
    return mps_pipe_dir(env) is not None or _daemon_process(proc)


def _daemon_process(proc: Path) -> bool:
    try:
        entries = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return False
    for entry in entries:
        try:
            # comm is cut at 15 characters ("nvidia-cuda-mps" is the server too): check argv.
            if not (entry / "comm").read_text().startswith(DAEMON[:15]):
                continue
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if os.path.basename(argv0) == DAEMON:
            return True
    return False
