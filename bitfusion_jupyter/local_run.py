"""`bitfusion local`: run a command on this GPU server inside a share, without the network.

The share still comes from the local gateway's ledger (so local users and remote ones never
overcommit a GPU), but the command is this process's own child: its stdio is the terminal's,
and the gateway only learns its pid so it can police it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping

from bitfusion_jupyter.pool import Grant
from remoting.client import GatewayError
from remoting.messages import ErrorCode
from remoting.protocol import renew_every


def merged_env(share_env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with the share's variables; PYTHONPATH entries are joined."""
    env = dict(os.environ)
    for key, value in share_env.items():
        if key == "PYTHONPATH" and env.get("PYTHONPATH"):
            env[key] = f"{value}{os.pathsep}{env['PYTHONPATH']}"
        else:
            env[key] = value
    return env


def run_local(grant: Grant, env: Mapping[str, str], argv: list[str]) -> int:
    try:
        child = subprocess.Popen(argv, env=merged_env(env), start_new_session=True)
    except OSError as exc:
        raise GatewayError(
            "local", f"Cannot run {argv[0]!r}: {exc.strerror}.", ErrorCode.SPAWN
        ) from None
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def forward(signum: int, frame: object) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        grant.conn.request("register_pid", share_id=grant.share_id, pid=child.pid)
        every = renew_every(grant.lease_s)
        next_renew = time.monotonic() + every
        while child.poll() is None:
            time.sleep(0.05)
            if time.monotonic() >= next_renew:
                try:
                    grant.conn.request("renew", share_id=grant.share_id, timeout=every)
                except GatewayError as exc:
                    if exc.code != ErrorCode.UNREACHABLE:
                        raise
                next_renew = time.monotonic() + every
        code = child.returncode
        return 128 - code if code < 0 else code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
