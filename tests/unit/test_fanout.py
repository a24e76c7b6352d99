"""remoting.fanout: the one way the CLI, the extension and the dashboard ask every gateway."""

from __future__ import annotations

import asyncio
import threading
import time

from remoting import fanout
from remoting.servers_conf import ConfigError


def test_each_asks_at_once_and_keeps_the_order():
    started: list[str] = []
    barrier = threading.Barrier(3, timeout=5)  # all three must be asked before any answers

    def ask(server: str) -> str:
        started.append(server)
        barrier.wait()
        return server.upper()

    assert fanout.each(["a", "b", "c"], ask) == ["A", "B", "C"]
    assert sorted(started) == ["a", "b", "c"]
    assert fanout.each([], ask) == []


def test_a_server_without_a_token_is_unauthorized_with_the_sentence():
    def token_for(server: str):
        raise ConfigError(f"No token for {server}; run 'bitfusion init'.")

    replies = fanout.ask_each(["gpu1:1", "gpu2:1"], token_for, [("list_gpus", {}), ("hello", {})])
    for server, said in replies.items():
        assert [r.state for r in said] == ["unauthorized", "unauthorized"]
        assert said[0].error == f"No token for {server}; run 'bitfusion init'."


def test_a_cache_asks_once_per_ttl_and_once_for_callers_arriving_together():
    rounds: list[list[str]] = []

    def compute(keys: list[str]) -> dict[str, str]:
        rounds.append(keys)
        time.sleep(0.05)  # a slow gateway: the other callers wait for this round
        return {k: f"{k}@{len(rounds)}" for k in keys}

    async def scenario() -> None:
        cache: fanout.TtlCache[str, str] = fanout.TtlCache(ttl=0.3)
        together = await asyncio.gather(*(cache.get_many(["a", "b"], compute) for _ in range(5)))
        assert all(answer == {"a": "a@1", "b": "b@1"} for answer in together)
        assert rounds == [["a", "b"]]
        assert await cache.get_many(["b", "c"], compute) == {"b": "b@1", "c": "c@2"}
        assert rounds[-1] == ["c"]  # only what it did not hold
        await asyncio.sleep(0.35)
        assert await cache.get("a", lambda: "fresh") == "fresh"
        cache.clear()
        assert await cache.get_many(["b"], compute) == {"b": "b@3"}

    asyncio.run(scenario())


def test_a_cache_of_many_callers_starts_again_rather_than_grow():
    async def scenario() -> None:
        cache: fanout.TtlCache[int, int] = fanout.TtlCache(ttl=60, max_entries=10)
        for key in range(25):
            await cache.get(key, lambda key=key: key)
        assert len(cache._entries) <= 10

    asyncio.run(scenario())
