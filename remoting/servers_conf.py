"""servers.conf: one ``host[:port]`` a line, ``#`` comments. One format, read by the client
(its servers) and by a gateway (its peers, for the cluster dashboard)."""

from __future__ import annotations

from pathlib import Path

from remoting.client import split_address


class ConfigError(Exception):
    """A setting the user must fix; the text says what and where."""


def normalise(address: str) -> str:
    """``host:port``, the port filled in; ValueError says what is wrong with ``address``."""
    host, port = split_address(address)
    return f"{host}:{port}"


def read_servers_conf(path: Path) -> list[tuple[str, int]]:
    """The servers ``path`` names, each with its line number."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            out.append((normalise(text), number))
        except ValueError as exc:
            raise ConfigError(f"{path}, line {number}: {exc}; fix or remove that line.") from None
    return out


def parse_list(text: str, source: str) -> list[str]:
    """A comma-separated list of servers (``-l``, BITFUSION_SERVERS), named by ``source``."""
    out = []
    for item in text.split(","):
        if item.strip():
            try:
                out.append(normalise(item))
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}.") from None
    return out
