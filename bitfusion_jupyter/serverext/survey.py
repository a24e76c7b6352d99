"""Gateway answers shared by every request of the extension, at most one round a second.

Several browser tabs (each polling, each with a live WebSocket) must not multiply the traffic
to the gateways, and a blocking gateway call must never hold up the server's event loop: one
`Survey` per server asks in a worker thread, keeps each answer for ``ttl`` seconds, and lets
concurrent callers wait for the same round.
"""

from __future__ import annotations

import asyncio
import time

from bitfusion_jupyter import pool_status
from bitfusion_jupyter.pool_status import Answer

TTL_S = 1.0


class Survey:
    def __init__(self, ttl: float = TTL_S, timeout: float = pool_status.TIMEOUT_S):
        self.ttl = ttl
        self.timeout = timeout
        self._answers: dict[str, tuple[float, Answer]] = {}
        self._lock = asyncio.Lock()

    async def answers(self, servers: list[str]) -> dict[str, Answer]:
        """Each server's answer, asked now unless one younger than ``ttl`` is at hand."""
        async with self._lock:
            now = time.monotonic()
            stale = [
                s
                for s in dict.fromkeys(servers)
                if s not in self._answers or now - self._answers[s][0] > self.ttl
            ]
            if stale:
                loop = asyncio.get_running_loop()
                fresh = await loop.run_in_executor(None, pool_status.ask_all, stale, self.timeout)
                done = time.monotonic()
                for answer in fresh:
                    self._answers[answer.address] = (done, answer)
            return {s: self._answers[s][1] for s in servers}
