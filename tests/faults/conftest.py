"""Fixtures of the fault suite: a client host and two GPU-server hosts, each a namespace.

The test process is the admin's console on its own port of the switch: it starts the
gateways, asks them what they hold, and pulls cables, while users' processes (the CLI, a
Jupyter frontend and its kernel shim) run on the client host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.spawned import stop_leftovers
from remoting.protocol import DEFAULT_PORT
from tests.faults.hosts import Host, Network, NetworkUnavailable
from tests.support.env import CLI, REPO, base_env
from tests.support.gateways import GatewayProcess
from tests.support.processes import PRINTS_ITS_PID
from tests.support.waiting import wait_for

LEASE_GRACE_S = 12.0  # longer than the 5 s cut the kernel must ride out
SHORT_LEASE_GRACE_S = 3.0


PRINTS_ITS_PID_AND_WAITS = f"{PRINTS_ITS_PID}\nimport time\ntime.sleep(300)\n"

# Makes FOLDER a tmpfs in this process's own mount namespace (`unshare --mount` before it),
# fills it with FILES, then runs ARGV there. What ARGV leaves in it is written to
# FOLDER.client.json at the end: the gateways' hosts never see any of it.
CLIENT_ONLY = r"""
import json, os, subprocess, sys
folder, files = sys.argv[1], json.loads(sys.argv[2])
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "client-only", folder], check=True)
for name, text in files.items():
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)
if sys.argv[3] == "--":
    code = subprocess.run(sys.argv[4:], cwd=folder).returncode
else:  # a frontend: it runs until the test ends it
    os.chdir(folder)
    code = subprocess.run(sys.argv[3:]).returncode
left = {n: open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, n))}
with open(folder + ".client.json", "w") as f:
    json.dump(left, f)
sys.exit(code)
"""


def client_only(folder: Path, files: dict[str, str], argv: list[str]) -> list[str]:
    """``argv`` run from ``folder``, which holds ``files`` on the client host alone."""
    folder.mkdir(parents=True)  # the empty mount point every host sees
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
            CLIENT_ONLY, str(folder), json.dumps(files), *argv]  # fmt: skip


def client_left(folder: Path) -> dict[str, str]:
    """What the client host's folder held when its command ended."""
    return json.loads(Path(f"{folder}.client.json").read_text())


FIGURES = REPO / "test-output" / "faults.json"


def seconds_until(predicate: Callable[[], Any], timeout: float, step: float = 0.1) -> float | None:
    """How long ``predicate`` took to hold, or None when it did not within ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(step)


@pytest.fixture(scope="session")
def _all_figures() -> Iterator[dict[str, dict[str, float]]]:
    found: dict[str, dict[str, float]] = {}
    yield found
    if found:
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text(json.dumps(found, indent=2) + "\n")


@pytest.fixture
def figures(request, _all_figures) -> dict[str, float]:
    """What this test measured, for RELIABILITY.md (written to test-output/faults.json).

    Only recorded, never asserted: timings on a shared 2-core machine are not verdicts."""
    return _all_figures.setdefault(request.node.name, {})


def alive(pid: int) -> bool:
    """True while ``pid`` runs (the hosts share one pid namespace, so the console sees all)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended; only its parent has not looked yet
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def network() -> Iterator[Network]:
    try:
        net = Network.build({"client": 1, "gpu1": 11, "gpu2": 12})
    except NetworkUnavailable as exc:
        pytest.skip(f"the multi-host fault tests need their own network namespaces: {exc}")
    yield net
    net.destroy()


class Frontend:
    """A Jupyter frontend on the client host (tests/faults/frontend.py), one command a line."""

    def __init__(self, host: Host, env: dict[str, str], prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            host.command([*(prefix or []), sys.executable, "-m", "tests.faults.frontend"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the frontend ended: {self.proc.stderr.read()}")
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"the frontend failed: {answer['error']}")
        return answer

    def call(self, op: str, **args: Any) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def send_cell(self, code: str, timeout: float = 60) -> None:
        """Send a cell and return once it left; ``outcome()`` then waits for its end."""
        assert "sent" in self.call("execute", code=code, timeout=timeout)

    def outcome(self) -> dict:
        return self._read()

    def run_cell(self, code: str, timeout: float = 60) -> dict:
        self.send_cell(code, timeout)
        return self.outcome()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("shutdown")
            except (AssertionError, OSError, ValueError):
                pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    """Two gateways of one pool on gpu1 and gpu2, and the client host that uses them."""

    network: Network
    home: Path
    lease_grace_s: float
    gateways: dict[str, GatewayProcess] = field(default_factory=dict)
    _frontends: list[Frontend] = field(default_factory=list)
    _clients: list[subprocess.Popen] = field(default_factory=list)

    @property
    def client(self) -> Host:
        return self.network.hosts["client"]

    def start_gateway(self, name: str, *args: str) -> GatewayProcess:
        host = self.network.hosts[name]
        first = next(iter(self.gateways.values()), None)
        state = self.home / name / "state"
        if first is not None:  # one pool: the same cluster keys, so one token serves both
            shutil.copytree(first.state_dir / "keys", state / "keys")
        gw = GatewayProcess(
            state,
            DEFAULT_PORT,
            ["--simulate-gpus", "1x16GiB", "--lease-grace", str(self.lease_grace_s), *args],
            process_env=base_env(self.home),
            log_path=self.home / name / "gateway.log",
            name=name,
            bind="0.0.0.0",
            host=host.address,
            prefix=["ip", "netns", "exec", host.ns],
            home=self.home,
        )
        (self.home / name).mkdir(parents=True, exist_ok=True)
        gw.start()
        self.gateways[name] = gw
        return gw

    def env(self, user: str = "alice") -> dict[str, str]:
        """The environment of ``user``'s shell on the client host, with both servers."""
        gw = next(iter(self.gateways.values()))
        servers = ",".join(g.address for g in self.gateways.values())
        return {**gw.env(user), "BITFUSION_SERVERS": servers}

    def bf(
        self, *args: str, user: str = "alice", timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run the `bitfusion` CLI on the client host and wait for it."""
        return subprocess.run(
            self.client.command([*CLI, *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(user),
            stdin=subprocess.DEVNULL,
        )

    def bf_background(
        self, *args: str, user: str = "alice", stdin: int = subprocess.DEVNULL
    ) -> subprocess.Popen:
        proc = subprocess.Popen(
            self.client.command([*CLI, *args]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=stdin,
            text=True,
            env=self.env(user),
        )
        self._clients.append(proc)
        return proc

    def run_python(
        self, code: str, *share_args: str, stdin: int = subprocess.DEVNULL
    ) -> subprocess.Popen:
        """`bitfusion run SHARE_ARGS -- python -u -c CODE` on the client host, in the background."""
        argv = ("run", *share_args, "--", sys.executable, "-u", "-c", code)
        return self.bf_background(*argv, stdin=stdin)

    def run_python_in(self, folder: Path, files: dict[str, str], code: str, *share_args: str
                      ) -> subprocess.Popen:  # fmt: skip
        """`run_python`, run from ``folder``, which only the client host has (holding
        ``files``): what the command sees there came over the files stream."""
        argv = [*CLI, "run", *share_args, "--", sys.executable, "-u", "-c", code]
        proc = subprocess.Popen(
            self.client.command(client_only(folder, files, ["--", *argv])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        )
        self._clients.append(proc)
        return proc

    def frontend(self, user: str = "alice", prefix: list[str] | None = None) -> Frontend:
        fe = Frontend(self.client, {**self.env(user), "PYTHONPATH": str(REPO)}, prefix)
        self._frontends.append(fe)
        return fe

    def shares(self) -> list[dict]:
        """Every share of both servers, as their admin sees them from the console."""
        return [s for gw in self.gateways.values() for s in gw.shares()]

    def expect_freed(
        self, figures: dict[str, float], label: str, since: float, pid: int | None = None
    ) -> None:
        """Wait until no server holds a share (within the lease grace, and some) and ``pid``,
        the share's process, has stopped; record the seconds since ``since`` as ``label``."""
        assert wait_for(lambda: not self.shares(), self.lease_grace_s + 10), "a share was kept"
        figures["lease grace s"] = self.lease_grace_s
        figures[label] = round(time.monotonic() - since, 2)
        if pid is not None:
            assert wait_for(lambda: not alive(pid), 10), "the share's process kept running"

    def close(self) -> None:
        for fe in self._frontends:
            fe.close()
        for proc in self._clients:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for host in self.network.hosts.values():
            host.restore()
        for gw in self.gateways.values():
            gw.kill(signal.SIGTERM)
            stop_leftovers(gw.state_dir)


def _cluster(network: Network, home: Path, lease_grace_s: float) -> Iterator[Cluster]:
    c = Cluster(network, home, lease_grace_s)
    try:
        c.start_gateway("gpu1")
        c.start_gateway("gpu2")
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster(network: Network, tmp_path: Path) -> Iterator[Cluster]:
    """Leases long enough to ride out a 5 s cut."""
    yield from _cluster(network, tmp_path, LEASE_GRACE_S)


@pytest.fixture
def short_lease_cluster(network: Network, tmp_path: Path) -> Iterator[Cluster]:
    """Leases short enough that a cut outlasts them within a test."""
    yield from _cluster(network, tmp_path, SHORT_LEASE_GRACE_S)
