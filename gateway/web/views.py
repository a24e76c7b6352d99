"""The JSON the dashboard serves, made from the gateways' replies (shapes: openapi.py)."""

from __future__ import annotations

import time
from typing import Any

from gateway.web.cluster import Reply
from remoting import messages


def server_view(
    address: str, gpus: Reply, shares: Reply, hello: Reply | None = None
) -> dict[str, Any]:
    """One server: its health, and per GPU the memory map (every share's size, anonymous,
    and the details of the shares this token may see)."""
    row: dict[str, Any] = {
        "address": address,
        "state": gpus.state,
        "error": gpus.error,
        "reachable": gpus.state != "unreachable",
        "rtt_ms": hello.rtt_ms if hello else None,
        "uptime_s": (hello.data or {}).get("uptime_s") if hello else None,
        "hostname": None,
        "version": None,
        "simulated": False,
        "sandbox": None,
        "idle_timeout_s": None,
        "queued": 0,
        "counters": {},
        "gpus": [],
    }
    if gpus.data is None:
        return row
    data = gpus.data
    visible = (shares.data or {}).get("shares", [])
    row.update(
        hostname=data["server"],
        version=data["version"],
        simulated=bool(data["simulated"]),
        sandbox=data.get("sandbox"),
        idle_timeout_s=data.get("idle_timeout_s"),
        queued=data.get("queued", 0),
        counters=data.get("counters", {}),
        gpus=[
            {
                **messages.gpu_view(g),
                "draining": bool(g["draining"]),
                "share_sizes_mib": g.get("share_sizes_mib", []),
                "shares": messages.shares_on(visible, g["index"]),
            }
            for g in data["gpus"]
        ],
    )
    return row


def what_runs(share: dict[str, Any]) -> str:
    procs = share.get("processes") or []
    if not procs:
        return "nothing (held)"
    parts = [
        f"kernel {p['kernel']}" if p.get("kernel") else " ".join(p["argv"])[:120] for p in procs
    ]
    return "; ".join(parts)


def shares_view(replies: dict[str, Reply], now: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now is None else now
    out = []
    for address, reply in replies.items():
        for s in (reply.data or {}).get("shares", []):
            out.append(
                {
                    "server": address,
                    "hostname": reply.data["server"] if reply.data else None,
                    "share_id": s["share_id"],
                    "owner": s["owner"],
                    "client_host": s["client_host"],
                    "runs": what_runs(s),
                    "age_s": round(max(0.0, now - s["created"]), 1),
                    "idle_s": s.get("idle_s", 0.0),
                    "gpus": [
                        {
                            "index": g["index"],
                            "name": g["name"],
                            "mib": g["mib"],
                            "used_mib": messages.used_mib(s, g["index"]),
                            "simulated": bool(g["simulated"]),
                        }
                        for g in s["gpus"]
                    ],
                }
            )
    return sorted(out, key=lambda r: (r["server"], -r["age_s"]))


def events_view(replies: dict[str, Reply], limit: int = 50) -> list[dict[str, Any]]:
    out = [
        {"server": address, **e}
        for address, reply in replies.items()
        for e in (reply.data or {}).get("events", [])
    ]
    return sorted(out, key=lambda e: -e["ts"])[:limit]
