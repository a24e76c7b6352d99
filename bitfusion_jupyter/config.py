"""Where the client finds its token and its servers.

- The config dir is ``~/.bitfusion`` (``BITFUSION_CONFIG_DIR`` overrides). ``bitfusion init``
  writes ``client.json`` there: a default token, and tokens per server when they differ.
- ``BITFUSION_TOKEN`` overrides the recorded token.
- Servers: ``-l`` wins, then ``BITFUSION_SERVERS``, else ``/etc/bitfusionio/servers.conf``
  followed by ``<config dir>/servers.conf`` (one ``host[:port]`` a line, ``#`` comments).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from remoting import tokens
from remoting.json_file import write_json
from remoting.protocol import DEFAULT_PORT
from remoting.servers_conf import ConfigError, normalise, parse_list, read_servers_conf

SYSTEM_SERVERS_CONF = Path(
    os.environ.get("BITFUSION_SYSTEM_SERVERS_CONF", "/etc/bitfusionio/servers.conf")
)


def config_dir() -> Path:
    return Path(os.environ.get("BITFUSION_CONFIG_DIR") or Path.home() / ".bitfusion")


def _client_file() -> Path:
    return config_dir() / "client.json"


def _read_client() -> dict:
    path = _client_file()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError
        return data
    except (OSError, ValueError):
        raise ConfigError(f"{path} is damaged; run 'bitfusion init --token TOKEN' again.") from None


def init(token_text: str, server: str | None) -> tuple[Path, bool]:
    """Record a token (and a server) for this user; the file written, and whether the server
    was new to servers.conf."""
    tok = tokens.parse(token_text)
    data = _read_client()
    if server:
        try:
            server = normalise(server)
        except ValueError as exc:
            raise ConfigError(f"--server {exc}.") from None
        data.setdefault("tokens", {})[server] = str(tok)
    if server is None or "token" not in data:
        data["token"] = str(tok)
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = _client_file()
    write_json(path, data, mode=0o600, indent=2)  # it holds tokens
    return path, add_server(server) if server else False


def add_server(server: str) -> bool:
    """Add ``server`` to this user's servers.conf; False when it was there already."""
    conf = config_dir() / "servers.conf"
    existing = [s for s, _ in read_servers_conf(conf)] if conf.exists() else []
    if server in existing:
        return False
    with conf.open("a") as f:
        f.write(f"{server}\n")
    return True


def token_for(server: str) -> tokens.Token:
    """The token to present to ``server``; raises ConfigError when there is none."""
    text = os.environ.get("BITFUSION_TOKEN")
    if not text:
        data = _read_client()
        text = data.get("tokens", {}).get(server) or data.get("token")
    if not text:
        raise ConfigError(
            "No token is configured; run 'bitfusion init --token TOKEN --server HOST:PORT' "
            "with a token from your admin, or set BITFUSION_TOKEN."
        )
    try:
        return tokens.parse(text)
    except tokens.TokenError as exc:
        source = "BITFUSION_TOKEN" if os.environ.get("BITFUSION_TOKEN") else str(_client_file())
        raise ConfigError(f"The token in {source}: {exc}") from None


@dataclass(frozen=True)
class ServerList:
    servers: list[str]
    source: str


def servers(cli_list: str | None = None) -> ServerList:
    """The servers to use, in order, with where they came from."""
    if cli_list:
        return ServerList(parse_list(cli_list, "-l/--server_list"), "-l")
    env = os.environ.get("BITFUSION_SERVERS")
    if env:
        return ServerList(parse_list(env, "BITFUSION_SERVERS"), "BITFUSION_SERVERS")
    found: list[str] = []
    sources = []
    for path in (SYSTEM_SERVERS_CONF, config_dir() / "servers.conf"):
        try:
            entries = read_servers_conf(path)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise ConfigError(f"{path} cannot be read (permission denied).") from None
        sources.append(str(path))
        found += [s for s, _ in entries if s not in found]
    if not found:
        raise ConfigError(
            f"No servers are configured: add 'host[:{DEFAULT_PORT}]' lines to "
            f"{config_dir() / 'servers.conf'}, set BITFUSION_SERVERS, or pass -l HOST:PORT."
        )
    return ServerList(found, ", ".join(sources))
