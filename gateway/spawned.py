"""A gateway started as a child process on loopback: for `bitfusion up`, tests and benchmarks."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from remoting import state_dir as layout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnError(RuntimeError):
    """The gateway did not come up; the text says what it printed."""


@dataclass
class SpawnedGateway:
    state_dir: Path
    port: int
    args: list[str] = field(default_factory=list)
    process_env: Mapping[str, str] | None = None  # the gateway process's environment
    log_path: Path | None = None  # None: the gateway writes to our stderr
    name: str | None = None
    # Where it listens and is reached, and what runs it: tests that put a gateway on its own
    # host (a network namespace) give ``0.0.0.0``, that host's address and ``ip netns exec``.
    bind: str = "127.0.0.1"
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)
    # Its own session: a terminal's Ctrl-C then reaches only whoever started it, which can
    # stop what depends on the gateway first (`bitfusion up`: JupyterLab and its kernels).
    new_session: bool = False
    proc: subprocess.Popen | None = None
    _tokens: dict[str, str] = field(default_factory=dict)
    _log_from: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        argv = [
            *self.prefix,
            sys.executable,
            "-m",
            "gateway",
            "--bind",
            self.bind,
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            *self.args,
        ]
        if "--web-port" not in self.args:
            argv += ["--web-port", "0"]  # many gateways on one machine: no dashboard unless asked
        if self.name:
            argv += ["--name", self.name]
        out = self.log_path.open("a") if self.log_path else None
        self._log_from = out.tell() if out else 0  # earlier runs' lines are not this start's
        self.proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env=dict(self.process_env) if self.process_env is not None else None,
            start_new_session=self.new_session,
        )
        self.wait_listening(timeout)

    def wait_listening(self, timeout: float, what: str = "gateway") -> None:
        """Return once the gateway just started listens; SpawnError when it stops first or
        takes longer than ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SpawnError(f"The {what} stopped right after starting: {self._why()}")
            # Ours once it names itself as the listener: an open port alone may be another
            # gateway's, and ours would then fail to bind a moment later.
            if layout.listening_pid(self.state_dir) == self.proc.pid:
                with socket.socket() as s:
                    s.settimeout(1)
                    if s.connect_ex((self.host, self.port)) == 0:
                        return
            time.sleep(0.05)
        raise SpawnError(f"The {what} did not open port {self.port} within {timeout:g} s.")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def start_log(self) -> str:
        """What the gateway logged since this start; not the lines of earlier runs."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._log_from)
            return f.read().decode(errors="replace")

    def _why(self) -> str:
        """What this start printed: the gateway's own one-sentence error where it gave one."""
        if self.log_path is None:
            return "its error is above."
        lines = self.start_log().strip().splitlines()
        said = [line for line in lines if line.startswith("bitfusion gateway: ")]
        return said[-1].removeprefix("bitfusion gateway: ") if said else "\n".join(lines[-10:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def token(self, user: str, admin: bool = False, minter: bool = False) -> str:
        """A token for ``user`` (made once, then remembered); ``minter``: one that may only
        mint users' tokens and revoke tokens (a JupyterHub's)."""
        key = f"{user}{'!' if admin else ''}{'+' if minter else ''}"
        if key not in self._tokens:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "token",
                    "create",
                    "--state-dir",
                    str(self.state_dir),
                    "--user",
                    user,
                    *(["--admin"] if admin else []),
                    *(["--minter"] if minter else []),
                ],
                capture_output=True,
                text=True,
                check=True,
                env=dict(self.process_env) if self.process_env is not None else None,
            )
            self._tokens[key] = out.stdout.strip()
        return self._tokens[key]


def stop_leftovers(state_dir: Path) -> None:
    """Kill every share process (nanny and its child's group) recorded under ``state_dir``.

    For tests and benchmarks, so that one that fails halfway leaks no process.
    """
    from gateway.nanny import launcher

    run_dir = state_dir / layout.RUN
    for path in run_dir.glob("*.json") if run_dir.exists() else []:
        status = launcher.read_status(path)
        if status:
            launcher.kill_orphan(status)
