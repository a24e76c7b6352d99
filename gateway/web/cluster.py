"""The dashboard's questions to every gateway of the cluster, with the browser's token
(remoting.fanout asks; this module adds the event-loop side and the outcome of an action)."""

from __future__ import annotations

import asyncio
from typing import Any

from remoting import tokens
from remoting.fanout import Reply, ask_each, ask_server

__all__ = ["Reply", "ask", "ask_each", "ask_one", "outcomes"]


def outcomes(replies: dict[str, list[Reply]]) -> dict[str, str]:
    """Each server's answer to one action sent to all: "ok", or why it did not take it."""
    return {s: "ok" if r.data is not None else (r.error or r.state) for s, [r] in replies.items()}


def ask_one(server: str, token: tokens.Token, kind: str, **fields: Any) -> Reply:
    return ask_server(server, token, [(kind, fields)])[0]


async def ask(
    servers: list[str], token: tokens.Token, *questions: tuple[str, dict[str, Any]]
) -> dict[str, list[Reply]]:
    """Each server's replies to ``questions`` (in that order), off the event loop."""
    return await asyncio.to_thread(ask_each, servers, token, list(questions))
