"""Claims of simulated GPU memory: where a share's processes write them, and whose they are.

On a simulated pool a process "allocates" GPU memory by writing a claim file
(``gateway.simulated_alloc``), which the SimulatedInventory reads as NVML would report the
process. Each share writes in a folder of its own, which its sandbox shows and nothing else.
A process in a sandbox knows only its pid there, while NVML (and so policing) speaks of host
pids: a claim is named ``<pid namespace inode>-<pid>``, and the gateway finds the host pid of
that pair in /proc.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^(\d+)-(\d+)$")
_known: dict[str, int] = {}  # claim name -> host pid, checked again at each use


def dir_for(state_dir: Path, share_id: str) -> Path:
    return state_dir / "simulated-usage" / share_id


def remove(state_dir: Path, share_id: str) -> None:
    shutil.rmtree(dir_for(state_dir, share_id), ignore_errors=True)


def claim_name() -> str:
    """This process's claim name (the writer's side)."""
    return f"{os.stat('/proc/self/ns/pid').st_ino}-{os.getpid()}"


def is_claim_name(stem: str) -> bool:
    return _NAME.match(stem) is not None


def host_pid(stem: str) -> int | None:
    """The host pid of the process that a claim names; None when it is gone (or no claim)."""
    m = _NAME.match(stem)
    if m is None:
        return None
    ns, inner = int(m.group(1)), int(m.group(2))
    known = _known.get(stem)
    if known is not None and _is(known, ns, inner):
        return known
    _known.pop(stem, None)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _is(int(entry.name), ns, inner):
            _known[stem] = int(entry.name)
            return int(entry.name)
    return None


def _is(pid: int, ns: int, inner: int) -> bool:
    try:
        if os.stat(f"/proc/{pid}/ns/pid").st_ino != ns:
            return False
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1]) == inner
    except (OSError, ValueError):
        return False
    return False
