"""A gateway's state directory: where it is unless told, and what each name in it holds.

A contract between the gateway, the GPU server's own tools (`bitfusion localhealth`,
`bitfusion up`, the systemd unit, an admin's scripts) and the tests, written down once.
"""

from __future__ import annotations

import os
from pathlib import Path

ADMIN_TOKEN = "admin.token"  # the admin token `bitfusion gateway` made on its first start
KEYS = "keys"  # the cluster's CurveZMQ keys and token secret (copied to every gateway)
LEDGER = "ledger.sqlite3"  # shares, processes, events, revoked tokens, settings
LOCK = "gateway.pid"  # flock held while a gateway runs; its pid once it listens
RUN = "run"  # the nannies' sockets and status files, kernels' connection files
HOMES = "homes"  # users' homes on this server, HOMES/USER (unless --homes)
CONFIG = "bitfusion_gateway_config"  # .py or .json, read after /etc/bitfusion's


def default_state_dir() -> Path:
    """BITFUSION_STATE_DIR, else /var/lib/bitfusion for root, else ~/.bitfusion/gateway."""
    if os.environ.get("BITFUSION_STATE_DIR"):
        return Path(os.environ["BITFUSION_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/bitfusion")
    return Path.home() / ".bitfusion" / "gateway"


def listening_pid(state_dir: Path) -> int | None:
    """The pid of the gateway that holds ``state_dir`` and listens, if one does."""
    try:
        text = (state_dir / LOCK).read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
