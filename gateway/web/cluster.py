"""Asking every gateway of the cluster one question, with the browser's token.

One short-lived encrypted connection per server and question, in threads, so a server that
does not answer costs one timeout (2 s), not one per server.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bitfusion_jupyter.pool_status import state_of
from remoting import tokens
from remoting.client import GatewayConnection, GatewayError

TIMEOUT_S = 2.0


@dataclass
class Reply:
    """One server's answer: ``data`` when it answered, else its state and one sentence."""

    server: str
    data: dict[str, Any] | None = None
    state: str = "ok"  # ok | unreachable | unauthorized | error
    error: str | None = None
    code: str | None = None  # the protocol's error code (denied, not_found, ...)
    rtt_ms: float | None = None  # hello's round trip on a connected socket (health)


def ask_one(server: str, token: tokens.Token, kind: str, **fields: Any) -> Reply:
    try:
        conn = GatewayConnection(server, token, TIMEOUT_S)
    except GatewayError as exc:
        return Reply(server, state=state_of(exc), error=str(exc), code=exc.code)
    try:
        data = conn.request(kind, **fields)
        if kind != "hello":
            return Reply(server, data)
        # The first hello includes connecting and the handshake; time a second one, as
        # `bitfusion health` does, so the figure is the network's round trip.
        start = time.perf_counter()
        conn.request("hello")
        return Reply(server, data, rtt_ms=round(1000 * (time.perf_counter() - start), 2))
    except GatewayError as exc:
        return Reply(server, state=state_of(exc), error=str(exc), code=exc.code)
    finally:
        conn.close()


def _ask_each(
    servers: list[str], token: tokens.Token, questions: list[tuple[str, dict[str, Any]]]
) -> dict[str, list[Reply]]:
    jobs = [(s, kind, fields) for s in servers for kind, fields in questions]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(jobs)))) as pool:
        replies = list(pool.map(lambda j: ask_one(j[0], token, j[1], **j[2]), jobs))
    out: dict[str, list[Reply]] = {s: [] for s in servers}
    for (server, _, _), reply in zip(jobs, replies, strict=True):
        out[server].append(reply)
    return out


async def ask(
    servers: list[str], token: tokens.Token, *questions: tuple[str, dict[str, Any]]
) -> dict[str, list[Reply]]:
    """Each server's replies to ``questions`` (in that order), off the event loop."""
    return await asyncio.to_thread(_ask_each, servers, token, list(questions))
