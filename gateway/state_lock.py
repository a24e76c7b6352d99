"""One gateway per state directory.

Two gateways on one state directory (a `bitfusion up` beside the systemd service, or a second
`up` on another port) would share one ledger while each believes it alone hands out the GPUs,
and each would adopt the other's processes. The gateway therefore holds an exclusive
``flock`` on ``gateway.pid`` for as long as it runs; the kernel drops it when the process
dies, however it dies. The file names the holder's pid once it listens, which is also how a
launcher knows that the gateway it started, not some other process, opened the port.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from remoting.state_dir import LOCK as LOCK_NAME
from remoting.state_dir import listening_pid

__all__ = ["LOCK_NAME", "StateInUse", "hold", "listening_pid", "mark_listening"]


class StateInUse(Exception):
    """Another gateway holds the state directory; the text says which and what to do."""


def hold(state_dir: Path) -> IO[str]:
    """Lock ``state_dir`` for this process; keep the returned file open while serving."""
    path = state_dir / LOCK_NAME
    handle = path.open("a+", encoding="ascii")  # not "w": that would empty the holder's pid
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StateInUse(
            f"Another gateway (pid {holder}) is using the state directory {state_dir}; stop "
            "it first, or give this gateway its own --state-dir."
        ) from None
    handle.truncate(0)  # a pid left by a gateway that died is not ours
    return handle


def mark_listening(handle: IO[str]) -> None:
    """Record our pid: the gateway is bound and about to serve."""
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
