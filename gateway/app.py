"""`bitfusion gateway ...` (also `python -m gateway`): run the server side, manage tokens.

The gateway's settings are traits of `GatewayApp` (and of `gateway.police.Police`), each
default written once, there. A setting's value comes from, the later winning: its trait's
default, ``/etc/bitfusion/bitfusion_gateway_config.{py,json}``,
``STATE_DIR/bitfusion_gateway_config.{py,json}``, then the command line. argparse still
parses the command line, so no flag and no error sentence changes: its options default to
`argparse.SUPPRESS`, and the flags given are copied onto the traits after the files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

from gateway import cluster_keys, state_lock
from gateway.kernels import CHANNEL_MODES
from gateway.police import Police
from gateway.settings import (
    CONFIG_NAME,
    FLAGS,
    SYSTEM_CONFIG_DIR,
    GatewayApp,
    UsageError,
    default_state_dir,
    option_help,
    prepare_state_dir,
    read_peers,
    trait_default,
)
from remoting import protocol, tokens
from remoting.util.cli import Command, Parser

# The server, NVML and asyncio's loop start only in _serve: this module also builds the
# `bitfusion gateway` options for `bitfusion --help`, which must start fast. (gateway.kernels
# brings zmq, which the kernel channel modes need; `bitfusion --help` always paid for it.)
__all__ = ["FLAGS", "GatewayApp", "UsageError", "add_arguments", "default_state_dir", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's options, shared by `bitfusion gateway` and `python -m gateway`.

    Every option defaults to SUPPRESS: an option not given is absent from the namespace, so
    it does not hide what a config file says (GatewayApp.from_args)."""
    from gateway import tokens_cli

    parser.epilog = (
        f"Settings can also be set in {SYSTEM_CONFIG_DIR / CONFIG_NAME}.py (or .json) and "
        f"STATE_DIR/{CONFIG_NAME}.py, e.g. c.GatewayApp.port = 56001; the options given here "
        "win."
    )
    unset = argparse.SUPPRESS  # not given: absent, so a config file's value stands
    parser.add_argument(
        "--simulate-gpus",
        metavar="SPEC",
        help=option_help("GatewayApp", "simulate_gpus", show_default=False),
        default=unset,
    )
    parser.add_argument(
        "--bind", metavar="ADDR", help=option_help("GatewayApp", "bind"), default=unset
    )
    parser.add_argument("--port", type=int, help=option_help("GatewayApp", "port"), default=unset)
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=option_help("GatewayApp", "state_dir", show_default=False),
        default=unset,
    )
    parser.add_argument(
        "--name", help=option_help("GatewayApp", "hostname", show_default=False), default=unset
    )
    parser.add_argument(
        "--lease-grace",
        type=float,
        metavar="SECONDS",
        help=option_help("GatewayApp", "lease_grace_s"),
        default=unset,
    )
    parser.add_argument(
        "--police", choices=Police.mode.values, help=option_help("Police", "mode"), default=unset
    )
    parser.add_argument(
        "--police-grace",
        type=float,
        metavar="SECONDS",
        help=option_help("Police", "grace_s"),
        default=unset,
    )
    parser.add_argument(
        "--homes",
        type=Path,
        metavar="DIR",
        help=option_help("GatewayApp", "homes_dir", show_default=False),
        default=unset,
    )
    parser.add_argument("--workdir", help=argparse.SUPPRESS, default=unset)  # gone: see _serve
    parser.add_argument(
        "--unconfined",
        dest="confine",
        action="store_false",
        help="run shares WITHOUT their bubblewrap sandbox, on purpose (containers that forbid "
        "user namespaces): code in a share can then read the state directory and every "
        "other user's files; every view says UNCONFINED",
        default=unset,
    )
    parser.add_argument(
        "--kernel-channels",
        choices=CHANNEL_MODES,
        help=option_help("GatewayApp", "kernel_channels"),
        default=unset,
    )
    parser.add_argument(
        "--kernels",
        type=Path,
        metavar="FILE",
        help=option_help("GatewayApp", "kernels_file", show_default=False),
        default=unset,
    )
    parser.add_argument(
        "--web-port",
        type=int,
        metavar="PORT",
        help=f"the cluster dashboard and /metrics "
        f"(default {trait_default('GatewayApp', 'web_port')}; 0: none)",
        default=unset,
    )
    parser.add_argument(
        "--peers",
        type=Path,
        metavar="FILE",
        help=option_help("GatewayApp", "peers_file", show_default=False),
        default=unset,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=option_help("GatewayApp", "verbose", show_default=False),
        default=unset,
    )
    sub = parser.add_subparsers(dest="gateway_command")
    tokens_cli.add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    """Entry point after argument parsing; returns the exit code."""
    if args.gateway_command == "token":
        from gateway import tokens_cli

        return tokens_cli.run(args)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    from gateway.gpus import InventoryError, open_inventory, parse_simulate_spec
    from gateway.kernels import KernelConfigError, load_kernels
    from gateway.service import Gateway
    from gateway.tokens_cli import admin_token

    if hasattr(args, "workdir"):
        raise UsageError(
            "--workdir is gone: each user's shares now work in that user's own home on this "
            "server; --homes DIR sets where those homes live."
        )
    app = GatewayApp.from_args(args)
    logging.basicConfig(
        level=logging.DEBUG if app.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if app.simulate_gpus:
        try:
            parse_simulate_spec(app.simulate_gpus)
        except ValueError as exc:
            raise UsageError(app.blame("simulate_gpus", str(exc))) from None
    try:
        kernels = load_kernels(app.kernels_file)
    except KernelConfigError as exc:
        raise UsageError(app.blame("kernels_file", str(exc))) from None
    state_dir = app.state_dir
    prepare_state_dir(state_dir)
    try:
        lock = state_lock.hold(state_dir)  # held until this process ends
    except state_lock.StateInUse as exc:
        raise UsageError(str(exc)) from None
    keys = cluster_keys.load_or_create(state_dir)
    config = app.gateway_config(kernels, read_peers(app.peers_file, state_dir, app))
    try:
        inventory = open_inventory(app.simulate_gpus, state_dir, config.hostname)
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
            f"Cannot listen on {config.bind}:{config.port} ({exc}); is another gateway "
            "running? Pick another --port or --bind."
        ) from None
    token_path = admin_token(state_dir, keys)
    _banner(gateway, token_path, app.loaded_files_line)
    # Marked after the banner: whoever waits for the mark (tests, `bitfusion up`) then
    # finds the banner already in the log.
    state_lock.mark_listening(lock)
    try:
        asyncio.run(gateway.serve())
    except OSError as exc:  # the dashboard's port
        raise UsageError(
            f"Cannot serve the dashboard on {config.bind}:{config.web_port} ({exc.strerror}); "
            "pick another --web-port, or 0 for none."
        ) from None
    return 0


def _banner(gateway: Any, token_path: Path, config_files: str) -> None:
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
        f"  config files: {config_files}",
        f"  state dir {cfg.state_dir}; admin token in {token_path}",
        f"  user tokens: bitfusion gateway token create --state-dir {cfg.state_dir} --user NAME",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    # One-line mistakes, as `bitfusion gateway` says them (the systemd unit runs this form).
    parser = Parser(prog="python -m gateway", description=__doc__.split("\n")[0])
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
