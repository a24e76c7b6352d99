"""What the service's parts share: the gateway's state (set up by gateway.service.core) and the
small types its handlers pass around.

Each part of the service (dispatch, access, lifecycle, ...) is a class of its own job's
methods over this state; gateway.service.core.Gateway composes them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from gateway import sandbox
from gateway.cluster_keys import ClusterKeys
from gateway.gpus import GpuInfo, GpuInventory
from gateway.history import History
from gateway.idle import IdleTracker
from gateway.kernels import KernelChannels
from gateway.ledger import Ledger
from gateway.log_limit import LogLimit
from gateway.nanny.relay import Relay
from gateway.police import Police
from gateway.service.config import GatewayConfig
from gateway.service.router import Router
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


class ServiceState:
    """The state every part of the service reads; Gateway.__init__ sets it."""

    cfg: GatewayConfig
    inventory: GpuInventory
    keys: ClusterKeys
    gpus: list[GpuInfo]
    run_dir: Path
    sandbox: sandbox.Verdict  # how shares are walled off, checked once at start
    sandbox_abi: int  # 0: no Landlock scopes for kernels
    sandbox_line: str
    layout: sandbox.Layout
    ledger: Ledger
    police: Police
    relays: dict[str, Relay]  # process id -> its link to the process's nanny
    kernels: dict[str, KernelState]
    queue: list[Waiter]
    ending: dict[str, asyncio.Event]  # shares being ended; set once gone
    launching: dict[str, int]  # share id -> processes being started in it
    launched: asyncio.Condition  # notified as each of those starts finishes
    usage: dict[str, dict[int, int]]  # share id -> GPU index -> MiB in use
    history: History
    idle: IdleTracker
    idle_timeout_s: float | None
    mps: bool
    ctx: zmq.asyncio.Context
    sock: zmq.asyncio.Socket
    router: Router
    started: float
    refusals: LogLimit  # every refusal is logged, a flood of them is counted
    last_ids: dict[bytes, int]  # connection -> its last request id (replays)
    check_replies: bool  # BITFUSION_CHECK_REPLIES: each reply is checked against its type
    _background: set[asyncio.Task[Any]]  # keeps fire-and-forget tasks alive

    # Shared by every part, defined by gateway.service.core.Gateway: sending, and tasks
    # beside the receive loop. Declared here (not defined) so each part can call them.
    _send: Callable[[bytes, list[bytes]], Awaitable[bool]]
    _reply: Callable[[bytes, Message, Mapping[str, Any]], Awaitable[None]]
    _error: Callable[[bytes, int, str, str], Awaitable[None]]
    _spawn_task: Callable[[Any], None]
