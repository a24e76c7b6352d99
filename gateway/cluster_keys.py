"""The cluster's secrets in the state dir: the CurveZMQ key pair and the token-signing secret.

Gateways of one pool share these two files (copy ``keys/`` to every GPU server), so one token
and one server key serve the whole pool.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import zmq

from remoting import state_dir as layout


@dataclass(frozen=True)
class ClusterKeys:
    public: bytes  # z85
    secret: bytes  # z85, the Curve secret key
    token_secret: bytes  # HMAC key for tokens


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_or_create(state_dir: Path) -> ClusterKeys:
    """Read the keys under ``state_dir/keys``, making them on first use."""
    keys = state_dir / layout.KEYS
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    curve, token = keys / "server.curve", keys / "token.secret"
    if not curve.exists():
        public, secret = zmq.curve_keypair()
        try:
            _write_private(curve, public + b"\n" + secret + b"\n")
        except FileExistsError:  # another process made it first; use theirs
            pass
    if not token.exists():
        try:
            _write_private(token, secrets.token_hex(32).encode() + b"\n")
        except FileExistsError:
            pass
    public, secret = curve.read_bytes().split()[:2]
    return ClusterKeys(public, secret, token.read_bytes().strip())
