"""Gateway answers shared by every request of the extension, asked at most once per TTL.

Several browser tabs (each polling, each with a live WebSocket) must not multiply the traffic
to the gateways, and a blocking gateway call must never hold up the server's event loop: the
extension's one `Survey` keeps each server's answer in a `remoting.fanout.TtlCache`. Both
timings are the extension's traits (`BitfusionExtension.survey_ttl_s`, ``gateway_timeout_s``).
"""

from __future__ import annotations

from bitfusion_jupyter import pool_model
from bitfusion_jupyter.pool_model import Answer
from remoting.fanout import TtlCache


class Survey:
    def __init__(self, ttl: float, timeout: float) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self._cache: TtlCache[str, Answer] = TtlCache(ttl)

    async def answers(self, servers: list[str]) -> dict[str, Answer]:
        """Each server's answer, asked now unless one younger than ``ttl`` is at hand."""

        def ask(stale: list[str]) -> dict[str, Answer]:
            return {a.address: a for a in pool_model.ask_all(stale, self.timeout)}

        return await self._cache.get_many(servers, ask)
