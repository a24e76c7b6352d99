"""Small types the service's parts pass around, and the two pieces of state several of them
share: tasks beside the receive loop, and shares being ended or started in.

Each part (dispatch, access, lifecycle, ...) is an object handed only what it uses;
gateway.service.core.Gateway builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway.kernels import KernelChannels
from remoting import protocol
from remoting.protocol import Message
from remoting.shares import Want

MAX_CONNECTIONS_TRACKED = 10_000  # request ids remembered per connection, for replays


@dataclass
class Waiter:
    """A queued allocation (``--wait``), served first come, first served."""

    ident: bytes
    msg: Message
    owner: str
    want: Want
    eligible: list[int]
    deadline: float
    position: int = 0
    # Its client says "waiting" now and then (it may have reconnected, with a new ident);
    # one silent for a lease grace has gone, and must not hold the queue or win a share.
    ticket: str = field(default_factory=lambda: secrets.token_hex(8))
    heard: float = field(default_factory=time.monotonic)


@dataclass
class KernelState:
    """A kernel running in a share, its channels, and the shim connection it answers to."""

    kernel_id: str
    proc_id: str
    share_id: str
    channels: KernelChannels
    subscriber: bytes | None = None


class RequestError(Exception):
    """Ends a request with a clear error sentence and a protocol error code."""

    def __init__(self, code: str, message: str, replay: bool = False):
        super().__init__(message)
        self.code = code
        self.replay = replay  # a request id seen before on its connection


class Background:
    """Tasks beside the receive loop (a release that waits for processes to stop, a start),
    referenced until done: asyncio keeps only weak references to tasks."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Transitions:
    """Shares being ended, and processes being started in shares. The two must not cross: a
    start refuses a share that is ending, and ending a share first waits for the starts in it,
    so a process started meanwhile is ended with it."""

    def __init__(self) -> None:
        self.ending: dict[str, asyncio.Event] = {}  # set once the share is gone
        self._starting: dict[str, int] = {}  # share id -> processes being started in it
        self._started = asyncio.Condition()  # notified as each of those starts finishes

    @contextlib.asynccontextmanager
    async def starting_in(self, share_id: str, held: bool) -> AsyncIterator[None]:
        """A process being started in a share (``held``: the ledger still has it)."""
        if share_id in self.ending or not held:
            raise RequestError(
                protocol.E_NOT_FOUND, f"Share {share_id} ended before its process could start."
            )
        self._starting[share_id] = self._starting.get(share_id, 0) + 1
        try:
            yield
        finally:
            self._starting[share_id] -= 1
            if not self._starting[share_id]:
                del self._starting[share_id]
            async with self._started:
                self._started.notify_all()

    async def starts_done(self, share_id: str) -> None:
        async with self._started:
            await self._started.wait_for(lambda: share_id not in self._starting)
