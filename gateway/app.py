"""`bitfusion gateway ...` (also `python -m gateway`): run the server side, manage tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from gateway import cluster_keys, state_lock
from remoting import protocol, tokens
from remoting.util.cli import Command

# The server, NVML and asyncio are imported where the gateway starts, not here: this module
# also builds the `bitfusion gateway` options for `bitfusion --help`, which must start fast.


class UsageError(Exception):
    """A bad option or setting; the text is one sentence for the admin."""


def default_state_dir() -> Path:
    if os.environ.get("BITFUSION_STATE_DIR"):
        return Path(os.environ["BITFUSION_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/bitfusion")
    return Path.home() / ".bitfusion" / "gateway"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's options, shared by `bitfusion gateway` and `python -m gateway`."""
    from gateway.kernels import CHANNEL_MODES  # here: zmq.asyncio is not every command's cost

    parser.add_argument(
        "--simulate-gpus",
        metavar="SPEC",
        help="serve a simulated pool instead of NVML, e.g. 2x16GiB or 1x80GiB,1x24GiB",
    )
    parser.add_argument("--bind", default="0.0.0.0", metavar="ADDR", help="address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=protocol.DEFAULT_PORT,
        help=f"client port (default {protocol.DEFAULT_PORT})",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="ledger, keys and tokens (default /var/lib/bitfusion as root, "
        "else ~/.bitfusion/gateway; BITFUSION_STATE_DIR overrides)",
    )
    parser.add_argument(
        "--name", default=None, help="server name shown to clients (default: hostname)"
    )
    parser.add_argument(
        "--lease-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="free a share this long after its holder stops renewing (default 30)",
    )
    parser.add_argument(
        "--police",
        choices=("stop", "warn"),
        default="stop",
        help="over-share processes: warn, then stop them (default) or only warn",
    )
    parser.add_argument(
        "--police-grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a process may stay over its share after the warning",
    )
    parser.add_argument(
        "--homes",
        type=Path,
        default=None,
        metavar="DIR",
        help="where users' homes on this server live, one folder per user, each the $HOME "
        "of that user's shares (default: STATE_DIR/homes)",
    )
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # gone: see run()
    parser.add_argument(
        "--unconfined",
        dest="confine",
        action="store_false",
        help="run shares WITHOUT their bubblewrap sandbox, on purpose (containers that forbid "
        "user namespaces): code in a share can then read the state directory and every "
        "other user's files; every view says UNCONFINED",
    )
    parser.add_argument(
        "--kernel-channels",
        choices=CHANNEL_MODES,
        default="auto",
        help="how kernels' channels are kept from other shares: auto (unix sockets that "
        "Landlock scopes to the share, else CurveZMQ), curve (always TCP with CurveZMQ), or "
        "plain (TCP, unencrypted: any share can listen)",
    )
    parser.add_argument(
        "--kernels",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON {name: argv} of kernel environments offered besides python3 "
        "(this Python with ipykernel); argv must contain {connection_file}",
    )
    parser.add_argument(
        "--web-port",
        type=int,
        default=protocol.DASHBOARD_PORT,
        metavar="PORT",
        help=f"the cluster dashboard and /metrics (default {protocol.DASHBOARD_PORT}; 0: none)",
    )
    parser.add_argument(
        "--peers",
        type=Path,
        default=None,
        metavar="FILE",
        help="the cluster's other gateways for the dashboard, servers.conf format "
        "(default STATE_DIR/servers.conf when it exists)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="gateway_command")
    token = sub.add_parser("token", help="create or revoke access tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="print a new token")
    create.add_argument("--user", default=os.environ.get("USER", "user"))
    create.add_argument("--admin", action="store_true", help="a token that sees every share")
    create.add_argument(
        "--expires",
        metavar="DURATION",
        default=None,
        help="refuse the token after this long, e.g. 90m, 8h or 30d (default: never)",
    )
    create.add_argument("--state-dir", type=Path, default=None, dest="token_state_dir")
    revoke = token_sub.add_parser(
        "revoke", help="revoke a token here and on the peers (the rest of the cluster)"
    )
    revoke.add_argument("token")
    revoke.add_argument("--state-dir", type=Path, default=None, dest="token_state_dir")
    revoke.add_argument(
        "--peers",
        type=Path,
        default=None,
        metavar="FILE",
        dest="token_peers",
        help="the cluster's other gateways, as the gateway's own --peers "
        "(default STATE_DIR/servers.conf when it exists)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point after argument parsing; returns the exit code."""
    state_dir = getattr(args, "token_state_dir", None) or args.state_dir or default_state_dir()
    if args.gateway_command == "token":
        return _token(args, state_dir)
    return _serve(args, state_dir)


def _prepare_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # 0700 whoever made it: it holds the keys, tokens, the ledger (who runs what) and
        # users' homes. Tighter only: a folder of someone else's is left as it is.
        if state_dir.stat().st_uid == os.geteuid() and state_dir.stat().st_mode & 0o077:
            state_dir.chmod(0o700)
        probe = state_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"The state dir {state_dir} cannot be written ({exc.strerror}); "
            "pick another with --state-dir."
        ) from None


def _token(args: argparse.Namespace, state_dir: Path) -> int:
    _prepare_state_dir(state_dir)
    keys = cluster_keys.load_or_create(state_dir)
    if args.token_command == "create":
        expires = None
        if args.expires is not None:
            try:
                expires = int(time.time()) + tokens.parse_duration(args.expires)
            except tokens.TokenError as exc:
                raise UsageError(f"--expires {exc}") from None
        try:
            tok = tokens.mint(keys.token_secret, keys.public, args.user, args.admin, expires)
        except tokens.TokenError as exc:
            raise UsageError(str(exc)) from None
        print(tok)
        if expires is not None:  # on stderr: stdout is the token alone, for `> alice.token`
            print(f"This token of {tok.user} expires on {tok.expires_text}.", file=sys.stderr)
        return 0
    return _revoke(tokens.parse(args.token), state_dir, keys, args.token_peers)


def _revoke(
    tok: tokens.Token, state_dir: Path, keys: cluster_keys.ClusterKeys, peers_file: Path | None
) -> int:
    """Revoke in this server's ledger (its gateway need not run), then on every peer, as the
    dashboard does: a token revoked on one server only would still work on the others."""
    from gateway.ledger import Ledger

    peers = _peers(peers_file, state_dir)
    ledger = Ledger(state_dir / "ledger.sqlite3", [])
    ledger.revoke(tok.nonce)
    ledger.event("revoke", tok.user, None, "token revoked")
    ledger.close()
    if not peers:
        print(f"Revoked the token of {tok.user}.")
        return 0
    from gateway.web.cluster import ask_each, outcomes
    from remoting.util.tables import render

    admin = tokens.parse(admin_token(state_dir, keys).read_text(encoding="ascii").strip())
    said = outcomes(ask_each(peers, admin, [("revoke", {"nonce": tok.nonce})]))
    missed = [s for s, text in said.items() if text != "ok"]
    n = len(peers) - len(missed)
    print(f"Revoked the token of {tok.user} here and on {n} of {len(peers)} peers.")
    rows = [[s, "revoked" if text == "ok" else text] for s, text in said.items()]
    print(render(["SERVER", "ANSWER"], [["this server", "revoked"], *rows]))
    if missed:
        print(
            f"bitfusion: the token still works on {', '.join(missed)}; run this again when "
            "they answer.",
            file=sys.stderr,
        )
        return 1
    return 0


def admin_token(state_dir: Path, keys: cluster_keys.ClusterKeys) -> Path:
    """The admin token file, written on first start (mode 0600)."""
    path = state_dir / "admin.token"
    if not path.exists():
        tok = tokens.mint(keys.token_secret, keys.public, "admin", admin=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{tok}\n")
    return path


def _serve(args: argparse.Namespace, state_dir: Path) -> int:
    from gateway.gpus import InventoryError, open_inventory, parse_simulate_spec
    from gateway.kernels import KernelConfigError, load_kernels
    from gateway.server import Gateway, GatewayConfig

    if args.workdir is not None:
        raise UsageError(
            "--workdir is gone: each user's shares now work in that user's own home on this "
            "server; --homes DIR sets where those homes live."
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port; give 1 to 65535.")
    if not 0 <= args.web_port <= 65535:
        raise UsageError(f"--web-port {args.web_port} is not a TCP port; give 1 to 65535, or 0.")
    if args.lease_grace <= 0:
        raise UsageError("--lease-grace must be more than 0 seconds.")
    if args.simulate_gpus:
        try:
            parse_simulate_spec(args.simulate_gpus)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        kernels = load_kernels(args.kernels)
    except KernelConfigError as exc:
        raise UsageError(str(exc)) from None
    _prepare_state_dir(state_dir)
    try:
        lock = state_lock.hold(state_dir)  # held until this process ends
    except state_lock.StateInUse as exc:
        raise UsageError(str(exc)) from None
    keys = cluster_keys.load_or_create(state_dir)
    config = GatewayConfig(
        kernels=kernels,
        kernel_channels=args.kernel_channels,
        state_dir=state_dir,
        bind=args.bind,
        port=args.port,
        lease_grace_s=args.lease_grace,
        police_mode=args.police,
        police_grace_s=args.police_grace,
        homes_dir=args.homes.resolve() if args.homes else None,
        confine=args.confine,
        web_port=args.web_port,
        peers=_peers(args.peers, state_dir),
    )
    if args.name:
        config.hostname = args.name
    try:
        inventory = open_inventory(args.simulate_gpus, state_dir, config.hostname)
    except InventoryError as exc:
        raise UsageError(str(exc)) from None
    try:
        gateway = Gateway(config, inventory, keys)
    except sqlite3.DatabaseError as exc:
        raise UsageError(
            f"The gateway's state database in {state_dir} cannot be used ({exc}); move "
            "ledger.sqlite3 away to start afresh (its running processes are then not adopted)."
        ) from None
    try:
        gateway.bind()
    except Exception as exc:  # zmq.ZMQError: address in use, bad address
        raise UsageError(
            f"Cannot listen on {args.bind}:{args.port} ({exc}); is another gateway running? "
            "Pick another --port or --bind."
        ) from None
    token_path = admin_token(state_dir, keys)
    _banner(gateway, token_path)
    # Marked after the banner: whoever waits for the mark (tests, `bitfusion up`) then
    # finds the banner already in the log.
    state_lock.mark_listening(lock)
    try:
        asyncio.run(gateway.serve())
    except OSError as exc:  # the dashboard's port
        raise UsageError(
            f"Cannot serve the dashboard on {args.bind}:{args.web_port} ({exc.strerror}); pick "
            "another --web-port, or 0 for none."
        ) from None
    return 0


def _peers(path: Path | None, state_dir: Path) -> list[str]:
    """The other gateways of the cluster, from a servers.conf of the gateway's own."""
    from remoting.servers_conf import ConfigError, read_servers_conf

    if path is None:
        path = state_dir / "servers.conf"
        if not path.exists():
            return []
    try:
        return [server for server, _ in read_servers_conf(path)]
    except FileNotFoundError:
        raise UsageError(f"--peers {path} does not exist; give a servers.conf file.") from None
    except (OSError, ConfigError) as exc:
        raise UsageError(str(exc)) from None


def _banner(gateway: Any, token_path: Path) -> None:
    from gateway.kernels import kernels_line

    cfg, inv = gateway.cfg, gateway.inventory
    kind = (
        "SIMULATED pool (no real GPU is used)"
        if inv.simulated
        else f"NVML, driver {inv.driver_version()}"
    )
    lines = [
        f"bitfusion gateway {protocol.VERSION} on {cfg.hostname}, port {cfg.port}: {kind}",
        f"  {'GPU':<4}{'NAME':<28}{'MEMORY':>12}",
    ]
    for g in gateway.gpus:
        tag = "  (simulated)" if g.simulated else ""
        lines.append(f"  {g.index:<4}{g.name:<28}{g.memory_total_mib:>8} MiB{tag}")
    lines += [
        f"  shares: {gateway.sandbox_line}",
        f"  users' homes on this server: {gateway.layout.homes_dir}/USER",
        f"  kernels: {kernels_line(cfg.kernels, cfg.kernel_channels, gateway.sandbox_abi)}",
        f"  state dir {cfg.state_dir}; admin token in {token_path}",
        f"  user tokens: bitfusion gateway token create --state-dir {cfg.state_dir} --user NAME",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UsageError, tokens.TokenError) as exc:
        print(f"bitfusion gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# `bitfusion gateway`, found by the client's CLI through the entry point group
# bitfusion.commands (pyproject.toml), as `localhealth` and `up` are.
COMMAND = Command(
    "run the gateway on a GPU server (or manage its tokens)", add_arguments, run, (UsageError,)
)
