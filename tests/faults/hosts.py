"""Several hosts on one machine: network namespaces joined by a switch, with cables to pull.

    switch namespace (a Linux bridge)
      ├── client host   10.N.0.1   (CPU only: the `bitfusion` CLI, a Jupyter frontend, shims)
      ├── gpu1 host     10.N.0.11  (a gateway)
      ├── gpu2 host     10.N.0.12  (a gateway)
      └── this process  10.N.0.254 (the test: an admin console on its own port of the switch)

Every host has its own loopback, so a kernel's local ports and a gateway's nannies stay on
their own host. ``Host.cut()`` takes the host's port on the switch down, like pulling its
cable: TCP connections are not reset, their packets are just lost until ``restore()``. Only
root can build this; ``Network.build`` raises NetworkUnavailable with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


class NetworkUnavailable(RuntimeError):
    """Namespaces cannot be made here; the text says why."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    name: str
    ns: str
    address: str
    switch_port: str  # the interface on the switch side of this host's cable
    switch_ns: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def cut(self) -> None:
        _ip("-n", self.switch_ns, "link", "set", self.switch_port, "down")

    def restore(self) -> None:
        _ip("-n", self.switch_ns, "link", "set", self.switch_port, "up")


@dataclass
class Network:
    tag: str
    subnet: str  # "10.N.0"
    hosts: dict[str, Host] = field(default_factory=dict)
    _made: list[str] = field(default_factory=list)  # namespaces to delete
    _links: list[str] = field(default_factory=list)  # root-namespace interfaces to delete

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    @classmethod
    def build(cls, names: dict[str, int]) -> Network:
        """A switch and one host per name (name -> last octet of its address)."""
        if os.geteuid() != 0:
            raise NetworkUnavailable("building network namespaces needs root")
        if shutil.which("ip") is None:
            raise NetworkUnavailable("the 'ip' tool (iproute2) is not installed")
        tag = f"bf{os.getpid() % 100000}"
        net = cls(tag, f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}")
        try:
            net._add_switch()
            for name, octet in names.items():
                net._add_host(name, octet)
            net._attach_console()
        except (subprocess.CalledProcessError, OSError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            net.destroy()
            raise NetworkUnavailable(
                f"could not build network namespaces: {detail.strip()}"
            ) from None
        return net

    def _add_switch(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def _cable(self, inside: str, port: str, ns: str | None) -> None:
        """A veth pair: ``inside`` moves to ``ns`` (None: stays here), ``port`` to the switch."""
        _ip("link", "add", inside, "type", "veth", "peer", "name", port)
        if ns is None:
            self._links.append(inside)
        else:
            _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")

    def _add_host(self, name: str, octet: int) -> None:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self._made.append(ns)
        n = len(self.hosts)  # interface names are short (15 bytes) and must not collide
        inside, port = f"{self.tag}h{n}", f"{self.tag}s{n}"
        self._cable(inside, port, ns)
        address = f"{self.subnet}.{octet}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = Host(name, ns, address, port, self.switch)

    def _attach_console(self) -> None:
        inside, port = f"{self.tag}cons", f"{self.tag}cons-s"[:15]
        self._cable(inside, port, None)
        _ip("addr", "add", f"{self.subnet}.254/24", "dev", inside)
        _ip("link", "set", inside, "up")

    def destroy(self) -> None:
        for link in self._links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._links.clear()
        self._made.clear()
