"""Shares held across commands of one shell session (`request_gpus` / `release_gpus`).

`request_gpus` records the share in ``<config dir>/held/<session>.json`` and leaves a small
holder process that renews its lease. The session is the shell that ran the command (the
CLI's parent process), or ``BITFUSION_SESSION`` when set; when that shell exits, the holder
releases the share by itself, so a closed terminal leaks nothing. Later `run`s in the same
session use the held share instead of asking for a new one.

Run as ``python -m bitfusion_jupyter.session_share SERVER SHARE_ID LEASE_S WATCH_PID FILE``,
this module is the holder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bitfusion_jupyter import config
from remoting.json_file import write_json
from remoting.messages import ErrorCode
from remoting.protocol import renew_every
from remoting.util.procs import pid_alive, running


@dataclass(frozen=True)
class SessionShare:
    server: str
    share_id: str
    lease_s: float
    holder_pid: int
    share: dict
    path: Path


def session_key() -> str:
    return os.environ.get("BITFUSION_SESSION") or str(os.getppid())


def _path() -> Path:
    return config.config_dir() / "held" / f"{session_key()}.json"


def held_by_this_session(on_lost: Callable[[str], None] | None = None) -> SessionShare | None:
    """The share this session holds, if its holder is still alive; ``on_lost`` hears one
    sentence when it held one whose holder has died since (its share is gone with it)."""
    path = _path()
    try:
        data = json.loads(path.read_text())
        held = SessionShare(
            data["server"],
            data["share_id"],
            data["lease_s"],
            data["holder_pid"],
            data["share"],
            path,
        )
    except (OSError, ValueError, KeyError):
        return None
    if not running(held.holder_pid):
        path.unlink(missing_ok=True)
        if on_lost is not None:
            on_lost(
                f"the share {held.share_id} this shell held on {held.server} is gone (its "
                "holder process ended); this command takes a share of its own."
            )
        return None
    return held


def start_holder(server: str, share: dict, lease_s: float) -> SessionShare:
    """Leave a holder process renewing the share and record it for this session."""
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    watch = int(session_key()) if session_key().isdigit() else os.getppid()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bitfusion_jupyter.session_share",
            server,
            share["share_id"],
            str(lease_s),
            str(watch),
            str(path),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    held = SessionShare(server, share["share_id"], lease_s, proc.pid, share, path)
    write_json(
        path,
        {
            "server": server,
            "share_id": held.share_id,
            "lease_s": lease_s,
            "holder_pid": proc.pid,
            "share": share,
        },
    )
    return held


def stop_holder(held: SessionShare) -> None:
    """Stop the holder (it releases the share on its way out) and forget the share."""
    try:
        os.kill(held.holder_pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    held.path.unlink(missing_ok=True)


def _hold(server: str, share_id: str, lease_s: float, watch_pid: int, path: Path) -> int:
    from remoting.client import GatewayConnection, GatewayError

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    conn = GatewayConnection(server, config.token_for(server))
    every = renew_every(lease_s)
    last_ok = time.monotonic()
    try:
        while not stop and pid_alive(watch_pid):
            try:
                conn.request("renew", share_id=share_id, timeout=every)
                last_ok = time.monotonic()
            except GatewayError as exc:
                if (
                    exc.code != ErrorCode.UNREACHABLE
                    or time.monotonic() - last_ok > lease_s + every
                ):
                    return 1  # the share is gone (released elsewhere or expired)
            deadline = time.monotonic() + every
            while not stop and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            conn.request("release", share_id=share_id, timeout=2.0)
        except GatewayError:
            pass
        return 0
    finally:
        _forget_if_mine(path)
        conn.close()


def _forget_if_mine(path: Path) -> None:
    # A newer request_gpus of the same session may have replaced the file: leave that one.
    try:
        if json.loads(path.read_text()).get("holder_pid") == os.getpid():
            path.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    server_arg, share_arg, lease_arg, watch_arg, file_arg = sys.argv[1:6]
    sys.exit(_hold(server_arg, share_arg, float(lease_arg), int(watch_arg), Path(file_arg)))
