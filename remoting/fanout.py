"""Asking every gateway of a pool the same questions, and keeping the answers a moment.

One short-lived encrypted connection per server, its questions asked in turn, servers in
threads: a server that does not answer costs one timeout, not one per server or question.
The CLI, the Jupyter server extension, the widget and the dashboard all ask this way, and the
two that serve many browser calls (the extension and the dashboard) keep each round for a
moment in a `TtlCache`, so several tabs do not multiply the traffic to the gateways.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from remoting import tokens
from remoting.client import GatewayConnection, GatewayError
from remoting.servers_conf import ConfigError

TIMEOUT_S = 2.0  # a browser or a table waits on this; a healthy gateway answers in ms
MAX_THREADS = 16

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Question = tuple[str, dict[str, Any]]  # a request type and its fields


@dataclass
class Reply:
    """One server's answer: ``data`` when it answered, else its state and one sentence."""

    server: str
    data: dict[str, Any] | None = None
    state: str = "ok"  # ok | unreachable | unauthorized | error
    error: str | None = None
    code: str | None = None  # the protocol's error code (denied, not_found, ...)
    rtt_ms: float | None = None  # hello's round trip on a connected socket (health)

    @classmethod
    def failed(cls, server: str, exc: GatewayError) -> Reply:
        return cls(server, state=exc.state, error=str(exc), code=exc.code)


def each(items: Sequence[T], ask: Callable[[T], R]) -> list[R]:
    """``ask(item)`` for every item at once, in threads; the answers in the items' order."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_THREADS, len(items))) as pool:
        return list(pool.map(ask, items))


def ask_server(
    server: str, token: tokens.Token, questions: Sequence[Question], timeout: float = TIMEOUT_S
) -> list[Reply]:
    """``server``'s replies to ``questions``, in order, over one connection (one handshake)."""
    try:
        conn = GatewayConnection(server, token, timeout)
    except GatewayError as exc:
        return [Reply.failed(server, exc)] * len(questions)
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
        return Reply.failed(server, exc)


def ask_each(
    servers: Sequence[str],
    token: tokens.Token | Callable[[str], tokens.Token],
    questions: Sequence[Question],
    timeout: float = TIMEOUT_S,
) -> dict[str, list[Reply]]:
    """Each server's replies to ``questions``. ``token``: one for all (the dashboard's
    caller), or a function giving each server's (the client's configuration); where it
    raises ConfigError (no token for that server), that server's replies are "unauthorized",
    with its sentence."""

    def ask(server: str) -> list[Reply]:
        try:
            tok = token(server) if callable(token) else token
        except ConfigError as exc:
            return [Reply(server, state="unauthorized", error=str(exc))] * len(questions)
        return ask_server(server, tok, questions, timeout)

    return dict(zip(servers, each(servers, ask), strict=True))


class TtlCache(Generic[K, V]):
    """Answers kept ``ttl`` seconds. Computed in a worker thread, so a blocking gateway call
    never holds up the event loop; callers arriving meanwhile wait for the same round."""

    def __init__(self, ttl: float, max_entries: int = 1000) -> None:
        # Imported here: the CLI imports this module, and asyncio would cost every
        # `bitfusion run` about 13 ms of its start (bench/run_overhead.py).
        import asyncio

        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self._lock = asyncio.Lock()

    async def get_many(
        self, keys: Iterable[K], compute: Callable[[list[K]], Mapping[K, V]]
    ) -> dict[K, V]:
        """The value of each key, computed now (all stale keys in one call) unless one younger
        than ``ttl`` is at hand."""
        wanted = list(dict.fromkeys(keys))
        async with self._lock:
            now = time.monotonic()
            stale = [
                k for k in wanted if k not in self._entries or now - self._entries[k][0] > self.ttl
            ]
            if stale:
                import asyncio

                fresh = await asyncio.to_thread(compute, stale)
                if len(self._entries) + len(fresh) > self.max_entries:
                    self._entries.clear()  # many callers' tokens: start again, not grow
                done = time.monotonic()
                self._entries.update({k: (done, v) for k, v in fresh.items()})
            return {k: self._entries[k][1] for k in wanted}

    async def get(self, key: K, compute: Callable[[], V]) -> V:
        return (await self.get_many([key], lambda _: {key: compute()}))[key]

    def clear(self) -> None:
        """Forget every answer (after an admin action, so its effect shows at once)."""
        self._entries.clear()
