"""Per-share usage files: what a share's own processes may read about their share, live.

The gateway samples GPU memory per share about once a second for policing. It writes the
result for each share to a small JSON file whose path the share's processes get as
``BITFUSION_USAGE_FILE``, so a kernel's widget can show its usage without holding a token
or talking to the gateway. Written atomically (temporary file, then rename); removed when
the share ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from remoting import share_env
from remoting.json_file import write_json

ENV = share_env.USAGE_FILE


FILE_NAME = "usage.json"


def path_for(state_dir: Path, share_id: str) -> Path:
    """In a folder of the share's own, which its sandbox shows (read-only) and nothing else."""
    return state_dir / "usage" / share_id / FILE_NAME


def lease_state(lease_expires: float, lease_grace_s: float, now: float | None = None) -> str:
    """ "held" while the client renews; "grace" once it has missed about two renewals.

    Clients renew every quarter of the grace (at most 5 s), so a lease with less than half
    of the grace left has not been renewed for a while: the share ends when it runs out.
    """
    left = lease_expires - (time.time() if now is None else now)
    return "held" if left > lease_grace_s / 2 else "grace"


def record(
    *,
    share_id: str,
    server: str,
    lease: str,
    gpus: Sequence[Mapping[str, Any]],
    used_mib: Mapping[int, int],
    utilization: Mapping[int, int | None],
) -> dict[str, Any]:
    """The file's content; ``gpus`` are a share's public GPU rows (index, uuid, name, mib...)."""
    return {
        "share_id": share_id,
        "server": server,
        "updated": time.time(),
        "lease": lease,
        "simulated": any(g["simulated"] for g in gpus),
        "gpus": [
            {
                "index": g["index"],
                "uuid": g["uuid"],
                "name": g["name"],
                "mib": g["mib"],
                "used_mib": int(used_mib.get(g["index"], 0)),
                "utilization_pct": utilization.get(g["index"]),
                "memory_total_mib": g["total_mib"],
                "simulated": g["simulated"],
            }
            for g in gpus
        ],
    }


def write_all(state_dir: Path, records: Mapping[str, dict[str, Any]]) -> None:
    """Write each share's file, and remove those of shares not among them (ended)."""
    remove_all_but(state_dir, set(records))
    for share_id, content in records.items():
        path = path_for(state_dir, share_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_json(path, content)
        except FileNotFoundError:
            continue  # the share ended meanwhile, and its folder went with it


def remove(path: Path) -> None:
    """A share's file and its folder."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def remove_all_but(state_dir: Path, share_ids: set[str]) -> None:
    """Remove the files of shares that ended, say while the gateway was down."""
    folder = state_dir / "usage"
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name not in share_ids and path.is_dir():
                remove(path / FILE_NAME)
