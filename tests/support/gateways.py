"""A real gateway process on loopback with a simulated pool, started by a test, with helpers
that run the real `bitfusion` CLI against it as a given user; and the ``GatewayFactory``
behind the ``gateway_factory`` fixture, which stops every gateway it started."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.spawned import SpawnedGateway, free_port, stop_leftovers
from tests.support.env import CLI, base_env
from tests.support.waiting import wait_for

__all__ = [
    "LONG_LEASE",
    "GatewayFactory",
    "GatewayProcess",
    "long_lease_gateway",
    "no_traceback",
    "start_gateway",
    "start_web_gateway",
    "stop_leftovers",
]

DASHBOARD_START_S = 10.0
# A pool whose leases outlast a test, for clients that renew nothing by themselves (the
# ``gateway`` fixture's 2 s grace could end a share under a loaded machine).
LONG_LEASE = ("--simulate-gpus", "2x16GiB", "--lease-grace", "120")


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


def _gateway(
    home: Path,
    *args: str,
    name: str = "gpuhost",
    keys_from: Path | None = None,
    env_extra: dict[str, str] | None = None,
) -> GatewayProcess:
    """A gateway in ``home``, not started yet (see start_gateway)."""
    home.mkdir(parents=True, exist_ok=True)
    if keys_from is not None:
        shutil.copytree(keys_from / "keys", home / "state" / "keys")
    return GatewayProcess(
        home / "state",
        free_port(),
        list(args),
        # Every reply is checked against its type (remoting.messages), so each test that
        # starts a gateway checks the reply shapes as well.
        process_env={**base_env(home), "BITFUSION_CHECK_REPLIES": "1", **(env_extra or {})},
        log_path=home / "gateway.log",
        name=name,
        home=home,
    )


def _dashboard(gw: GatewayProcess) -> str:
    """The base URL of ``gw``'s dashboard, once it answers."""
    from urllib.request import urlopen

    base = f"http://127.0.0.1:{gw.args[gw.args.index('--web-port') + 1]}"
    deadline = time.monotonic() + DASHBOARD_START_S
    while True:
        try:
            urlopen(base + "/", timeout=2).close()
            return base
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the dashboard did not start:\n{gw.log()}") from None
            time.sleep(0.1)


def start_gateway(
    tmp_path: Path,
    *args: str,
    name: str = "gpuhost",
    keys_from: Path | None = None,
    env_extra: dict[str, str] | None = None,
) -> GatewayProcess:
    """A gateway in ``tmp_path``; ``keys_from`` copies another's cluster keys (one pool; give
    its state dir); ``env_extra`` is added to the gateway process's environment. Whoever calls
    this stops it and its leftovers (``gateway_factory`` does both)."""
    gw = _gateway(tmp_path, *args, name=name, keys_from=keys_from, env_extra=env_extra)
    gw.start()
    return gw


def start_web_gateway(tmp_path: Path, *args: str, **kw: Any) -> tuple[GatewayProcess, str]:
    """A gateway serving its dashboard on a free port, and the dashboard's base URL."""
    gw = start_gateway(tmp_path, *args, "--web-port", str(free_port()), **kw)
    return gw, _dashboard(gw)


def no_traceback(r: Any) -> str:
    """The last line a refused CLI run printed, after checking it failed cleanly."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    return lines[-1]


class GatewayFactory:
    """Starts gateways for one test, with any flags, keys or name, and stops each (SIGTERM),
    and whatever share processes it left, when the test ends, whatever failed: the
    ``gateway_factory`` fixture, modelled on ipyparallel's ``Cluster`` fixture.

    ``gateway_factory("--simulate-gpus", "1x8GiB")`` starts one in the test's ``tmp_path``,
    as ``start_gateway(tmp_path, ...)`` does; later ones, unless given a ``home``, go to
    ``tmp_path/gateway-2``, ``gateway-3``... ``keys_from`` (a gateway or its state dir) puts
    one in the same pool as another."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[GatewayProcess] = []

    def __call__(
        self,
        *args: str,
        home: Path | None = None,
        name: str = "gpuhost",
        keys_from: SpawnedGateway | Path | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> GatewayProcess:
        if isinstance(keys_from, SpawnedGateway):
            keys_from = keys_from.state_dir
        gw = _gateway(
            home or self._free_home(), *args, name=name, keys_from=keys_from, env_extra=env_extra
        )
        self.started.append(gw)  # before it starts: one that fails halfway is stopped too
        gw.start()
        return gw

    def web(self, *args: str, **kw: Any) -> tuple[GatewayProcess, str]:
        """A gateway serving its dashboard on a free port, and the dashboard's base URL."""
        gw = self(*args, "--web-port", str(free_port()), **kw)
        return gw, _dashboard(gw)

    def _free_home(self) -> Path:
        taken = {gw.home for gw in self.started}
        if self.tmp_path not in taken:
            return self.tmp_path
        n = 2
        while (home := self.tmp_path / f"gateway-{n}") in taken:
            n += 1
        return home

    def stop_all(self) -> None:
        """Stop every gateway started here, the last first, and their leftovers; one that
        fails to stop does not keep the others running."""
        with contextlib.ExitStack() as stops:
            for gw in self.started:
                stops.callback(stop_leftovers, gw.state_dir)
                stops.callback(gw.kill, signal.SIGTERM)
        self.started.clear()


def long_lease_gateway(gateway_factory: GatewayFactory, *args: str) -> GatewayProcess:
    """A gateway whose leases outlast a test (``LONG_LEASE``), for clients that renew nothing
    by themselves, stopped by ``gateway_factory``."""
    return gateway_factory(*LONG_LEASE, *args)
