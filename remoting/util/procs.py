"""Small facts about and actions on OS processes, shared by the gateway and the client."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists (a process we may not signal still counts as alive)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as ended (it holds no memory and does
    nothing; only its parent has not looked yet)."""
    if not pid_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: trust kill()
    return stat.rpartition(")")[2].split()[0] != "Z"


def session_of(pid: int) -> int | None:
    """The session id of ``pid``; None when it is gone or not ours to ask about."""
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError, OverflowError):  # OverflowError: a huge pid
        return None


def kill_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid`` (or the process alone); gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
