"""`bitfusion gateway token create|revoke`: a server's access tokens, with or without its
gateway running (split from gateway.app, which runs the gateway itself)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gateway import cluster_keys
from gateway.settings import GatewayApp, UsageError, prepare_state_dir, read_peers
from remoting import state_dir as layout
from remoting import tokens


def add_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`token create` and `token revoke`, under `bitfusion gateway`'s subcommands."""
    token = sub.add_parser("token", help="create or revoke access tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="print a new token")
    create.add_argument("--user", default=os.environ.get("USER", "user"))
    role = create.add_mutually_exclusive_group()
    role.add_argument("--admin", action="store_true", help="a token that sees every share")
    role.add_argument(
        "--minter",
        action="store_true",
        help="a token that may only mint users' tokens that expire and revoke tokens "
        "(for a JupyterHub: docs/jupyterhub.md)",
    )
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
    """`token create` or `token revoke`; the state dir is the token command's --state-dir,
    else the gateway's own setting (its flag, /etc/bitfusion's config file, the default)."""
    state_dir = args.token_state_dir or GatewayApp.from_args(args, state_dir_only=True).state_dir
    prepare_state_dir(state_dir)
    keys = cluster_keys.load_or_create(state_dir)
    if args.token_command == "create":
        return _create(args, keys)
    return _revoke(tokens.parse(args.token), state_dir, keys, args.token_peers)


def _create(args: argparse.Namespace, keys: cluster_keys.ClusterKeys) -> int:
    expires = None
    if args.expires is not None:
        try:
            expires = int(time.time()) + tokens.parse_duration(args.expires)
        except tokens.TokenError as exc:
            raise UsageError(f"--expires {exc}") from None
    try:
        tok = tokens.mint(
            keys.token_secret, keys.public, args.user, args.admin, expires, minter=args.minter
        )
    except tokens.TokenError as exc:
        raise UsageError(str(exc)) from None
    print(tok)
    if expires is not None:  # on stderr: stdout is the token alone, for `> alice.token`
        print(f"This token of {tok.user} expires on {tok.expires_text}.", file=sys.stderr)
    return 0


def _revoke(
    tok: tokens.Token, state_dir: Path, keys: cluster_keys.ClusterKeys, peers_file: Path | None
) -> int:
    """Revoke in this server's ledger (its gateway need not run), then on every peer, as the
    dashboard does: a token revoked on one server only would still work on the others."""
    from gateway.ledger import Ledger

    peers = read_peers(peers_file, state_dir)
    ledger = Ledger(state_dir / layout.LEDGER, [])
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
    path = state_dir / layout.ADMIN_TOKEN
    if not path.exists():
        tok = tokens.mint(keys.token_secret, keys.public, "admin", admin=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{tok}\n")
    return path
