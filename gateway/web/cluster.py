"""Asking every gateway of the cluster some questions, with the browser's token.

One short-lived encrypted connection per server, its questions asked in turn, servers in
threads: a server that does not answer costs one timeout (2 s), not one per server or
question.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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


def ask_server(
    server: str, token: tokens.Token, questions: list[tuple[str, dict[str, Any]]]
) -> list[Reply]:
    """``server``'s replies to ``questions``, in order, over one connection (one handshake)."""
    try:
        conn = GatewayConnection(server, token, TIMEOUT_S)
    except GatewayError as exc:
        return [Reply(server, state=exc.state, error=str(exc), code=exc.code)] * len(questions)
    replies: list[Reply] = []
    try:
        for kind, fields in questions:
            # Once the server has stopped answering, the rest would only wait out the timeout.
            gone = replies and replies[-1].state == "unreachable"
            replies.append(replies[-1] if gone else _ask(conn, server, kind, fields))
        return replies
    finally:
        conn.close()


def _ask(conn: GatewayConnection, server: str, kind: str, fields: dict[str, Any]) -> Reply:
    try:
        data = conn.request(kind, **fields)
        if kind != "hello":
            return Reply(server, data)
        # The first hello on a connection may include the handshake; time a second one, as
        # `bitfusion health` does, so the figure is the network's round trip.
        start = time.perf_counter()
        conn.request("hello")
        return Reply(server, data, rtt_ms=round(1000 * (time.perf_counter() - start), 2))
    except GatewayError as exc:
        return Reply(server, state=exc.state, error=str(exc), code=exc.code)


def outcomes(replies: dict[str, list[Reply]]) -> dict[str, str]:
    """Each server's answer to one action sent to all: "ok", or why it did not take it."""
    return {s: "ok" if r.data is not None else (r.error or r.state) for s, [r] in replies.items()}


def ask_one(server: str, token: tokens.Token, kind: str, **fields: Any) -> Reply:
    return ask_server(server, token, [(kind, fields)])[0]


def ask_each(
    servers: list[str], token: tokens.Token, questions: list[tuple[str, dict[str, Any]]]
) -> dict[str, list[Reply]]:
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(servers)))) as pool:
        replies = pool.map(lambda s: ask_server(s, token, questions), servers)
        return dict(zip(servers, replies, strict=True))


async def ask(
    servers: list[str], token: tokens.Token, *questions: tuple[str, dict[str, Any]]
) -> dict[str, list[Reply]]:
    """Each server's replies to ``questions`` (in that order), off the event loop."""
    return await asyncio.to_thread(ask_each, servers, token, list(questions))
