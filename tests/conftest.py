"""Shared fixtures: a real gateway process on loopback with a simulated pool, and a helper that
runs the real `bitfusion` CLI against it as a given user."""

from __future__ import annotations

import json
import os
import signal
import site
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.spawned import SpawnedGateway, free_port, stop_leftovers

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "bitfusion_jupyter"]
# Python code that prints its pid so the host can find it: in a share's sandbox a process has
# a pid of its own namespace, so it prints that namespace too (see host_pid).
PRINTS_ITS_PID = (
    "import os; print(f\"{os.stat('/proc/self/ns/pid').st_ino}-{os.getpid()}\", flush=True)"
)
# Python code that echoes each line of its stdin as it comes, for the stdin tests.
ECHOES_ITS_STDIN = (
    "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\n"
)


@dataclass
class GatewayProcess(SpawnedGateway):
    """A gateway started by a test, with helpers to act as its users."""

    home: Path = Path(".")
    client_cwd: Path | None = None  # where the CLI runs (None: the test's own folder)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)

    def env(self, user: str = "alice", admin: bool = False, **extra: str) -> dict[str, str]:
        """The environment of a client shell of ``user`` pointed at this gateway."""
        cfg = self.home / f"client-{user}"
        cfg.mkdir(exist_ok=True)
        return {
            **base_env(self.home),
            "BITFUSION_CONFIG_DIR": str(cfg),
            "BITFUSION_TOKEN": self.token(user, admin),
            "BITFUSION_SERVERS": self.address,
            "BITFUSION_SESSION": f"test-{user}",
            **extra,
        }

    def bf(
        self,
        *args: str,
        user: str = "alice",
        admin: bool = False,
        input: str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run the real `bitfusion` CLI as ``user`` (in ``cwd``, the folder `run` carries)."""
        return subprocess.run(
            [*CLI, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env(user, admin),
            stdin=None if input is not None else subprocess.DEVNULL,
            cwd=cwd or self.client_cwd,
        )

    def bf_background(
        self,
        *args: str,
        user: str = "alice",
        env: dict[str, str] | None = None,
        stdin: int = subprocess.DEVNULL,
    ) -> subprocess.Popen:
        """Start the real `bitfusion` CLI as ``user`` and return at once (output piped)."""
        return subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=stdin,
            env=env or self.env(user),
            text=True,
            cwd=self.client_cwd,
        )

    def shares(self) -> list[dict]:
        """Every share the gateway holds, as its admin sees them."""
        r = self.bf("list_shares", "--json", user="root", admin=True)
        return json.loads(r.stdout)[0]["data"]["shares"]

    def no_shares_within(self, timeout: float) -> bool:
        """True once the gateway holds no share; False if that takes longer than ``timeout``."""
        return wait_for(lambda: not self.shares(), timeout)


def host_pid(printed: str) -> int:
    """The host pid of a process in a share that printed PRINTS_ITS_PID (while it runs)."""
    from gateway import simulated_claims

    pid = simulated_claims.host_pid(printed.strip())
    assert pid is not None, f"no running process printed {printed!r}"
    return pid


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.2) -> bool:
    """True once ``predicate()`` holds; False if it still does not after ``timeout`` seconds
    (it is asked once more when the time is up)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_")}
    env["PYTHONPATH"] = str(REPO)
    env["BITFUSION_SYSTEM_SERVERS_CONF"] = str(home / "no-system-servers.conf")
    return env


def start_gateway(
    tmp_path: Path,
    *args: str,
    name: str = "gpuhost",
    keys_from: Path | None = None,
    env_extra: dict[str, str] | None = None,
) -> GatewayProcess:
    """A gateway in ``tmp_path``; ``keys_from`` copies another's cluster keys (one pool);
    ``env_extra`` is added to the gateway process's environment."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if keys_from is not None:
        import shutil

        shutil.copytree(keys_from / "keys", tmp_path / "state" / "keys")
    gw = GatewayProcess(
        tmp_path / "state",
        free_port(),
        list(args),
        process_env={**base_env(tmp_path), **(env_extra or {})},
        log_path=tmp_path / "gateway.log",
        name=name,
        home=tmp_path,
    )
    gw.start()
    return gw


def start_web_gateway(tmp_path: Path, *args: str, **kw: Any) -> tuple[GatewayProcess, str]:
    """A gateway serving its dashboard on a free port, and the dashboard's base URL."""
    from urllib.request import urlopen

    port = free_port()
    gw = start_gateway(tmp_path, *args, "--web-port", str(port), **kw)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            urlopen(base + "/", timeout=2).close()
            return gw, base
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the dashboard did not start:\n{gw.log()}") from None
            time.sleep(0.1)


@pytest.fixture(autouse=True, scope="session")
def _no_user_site_kernelspecs(tmp_path_factory) -> Iterator[None]:
    """Jupyter also searches the user site's share/jupyter (~/.local/share/jupyter), beside
    JUPYTER_DATA_DIR, and `bitfusion up` installs its presets there: the tests that count
    kernelspecs in this process must see only their own."""
    patch = pytest.MonkeyPatch()
    patch.setattr(site, "USER_BASE", str(tmp_path_factory.mktemp("user-base")))
    yield
    patch.undo()


@pytest.fixture
def gateway(tmp_path):
    """A gateway on a simulated 2×16 GiB pool with a 2 s lease grace."""
    gw = start_gateway(
        tmp_path, "--simulate-gpus", "2x16GiB", "--lease-grace", "2", "--police-grace", "1"
    )
    yield gw
    gw.kill(signal.SIGTERM)
    stop_leftovers(gw.state_dir)
