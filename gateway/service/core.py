"""The gateway's service: one CurveZMQ ROUTER socket, the share ledger, leases and processes.

Everything runs on one asyncio loop, so handlers never race each other over the ledger.
A message that does not follow the protocol is logged and answered (when it has an id) with a
clear error; it never reaches a handler and never stops the loop for other clients.

Gateway owns the state and the sockets; each job is a part of its own (gateway.service.*),
and gateway.service.dispatch.HANDLERS says which part answers which message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from gateway import handshakes, sandbox
from gateway.cluster_keys import ClusterKeys
from gateway.gpus import GpuInventory
from gateway.history import History
from gateway.idle import IdleTracker
from gateway.ledger import Ledger
from gateway.log_limit import LogLimit
from gateway.mps import mps_running
from gateway.nanny import launcher
from gateway.nanny.link import NannyGone
from gateway.nanny.relay import Relay
from gateway.police import Police
from gateway.service.access import Access
from gateway.service.admin import Admin
from gateway.service.config import GatewayConfig
from gateway.service.dispatch import Dispatch
from gateway.service.housekeeping import Housekeeping
from gateway.service.inventory import Inventory
from gateway.service.kernel_sessions import KernelSessions
from gateway.service.lifecycle import Lifecycle
from gateway.service.processes import Processes
from gateway.service.queue import AllocationQueue
from gateway.service.router import Router
from gateway.service.state import KernelState, Waiter
from remoting import messages, protocol, state_dir
from remoting.protocol import Message
from remoting.util.procs import pid_alive

log = logging.getLogger("bitfusion.gateway")


class Gateway(
    Dispatch,
    Access,
    Inventory,
    AllocationQueue,
    Lifecycle,
    Processes,
    KernelSessions,
    Admin,
    Housekeeping,
):
    def __init__(self, config: GatewayConfig, inventory: GpuInventory, keys: ClusterKeys):
        self.cfg = config
        self.inventory = inventory
        self.keys = keys
        self.gpus = inventory.gpus()
        run_dir = config.state_dir / state_dir.RUN
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run_dir = run_dir
        # How shares are walled off (said at start, in localhealth, on the dashboard).
        self.sandbox = sandbox.check(config.confine)
        self.sandbox_abi = self.sandbox.landlock_abi  # 0: no Landlock scopes for kernels
        self.sandbox_line = self.sandbox.line
        self.layout = sandbox.Layout.for_gateway(
            config.state_dir,
            config.homes_dir or config.state_dir / state_dir.HOMES,
            [k.argv[0] for k in config.kernels.values()],
        )
        self.ledger = Ledger(config.state_dir / state_dir.LEDGER, self.gpus)
        self.police = Police(config.police_mode, config.police_grace_s)
        self.relays: dict[str, Relay] = {}
        self.kernels: dict[str, KernelState] = {}
        self.queue: list[Waiter] = []
        self.ending: dict[str, asyncio.Event] = {}  # shares being ended; set once gone
        self.launching: dict[str, int] = {}  # share id -> processes being started in it
        self.launched = asyncio.Condition()  # notified as each of those starts finishes
        self.usage: dict[str, dict[int, int]] = {}  # share id -> GPU index -> MiB in use
        self.history = History(self.ledger.db)
        self.idle = IdleTracker()
        self.idle_timeout_s: float | None = self.ledger.setting("idle_timeout_s")
        self.mps = mps_running()
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.curve_server = True
        self.sock.curve_secretkey = keys.secret
        self.sock.curve_publickey = keys.public
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_PAYLOAD_BYTES + 2 * 1024 * 1024)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.router = Router(self.sock)  # every client message in and out goes through it
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()  # keeps fire-and-forget tasks alive
        self.started = time.time()
        self.refusals = LogLimit(log)  # every refusal is logged, a flood of them is counted
        self.last_ids: dict[bytes, int] = {}  # connection -> its last request id (replays)
        self.check_replies = bool(os.environ.get("BITFUSION_CHECK_REPLIES"))

    def bind(self) -> None:
        self.sock.bind(f"tcp://{self.cfg.bind}:{self.cfg.port}")

    async def serve(self) -> None:
        launcher.prepare_spare()
        await self._adopt()
        web = self._start_web() if self.cfg.web_port else None
        self.router.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        self._tasks = [
            asyncio.create_task(self._receive_loop()),
            asyncio.create_task(self._tick_loop()),
            asyncio.create_task(self._police_loop()),
            asyncio.create_task(handshakes.watch(self.sock, self.refusals)),
        ]
        await self._stop.wait()
        for t in self._tasks:
            t.cancel()
        if web is not None:
            web.stop()
        # Processes in shares outlive the gateway on purpose; only our own links close.
        for kernel in self.kernels.values():
            kernel.channels.close()
        for relay in list(self.relays.values()):
            await relay.close()
        self.router.stop()
        self.sock.close(0)
        launcher.discard_spare()
        self.ledger.close()
        self.inventory.close()

    def stop(self) -> None:
        self._stop.set()

    def _start_web(self) -> Any:
        """The dashboard and /metrics (tornado, on this loop): a client of this gateway and
        its peers like any other, with the token the browser logged in with."""
        from gateway.web.app import make_app  # tornado is loaded only when serving the web

        host = "127.0.0.1" if self.cfg.bind in ("0.0.0.0", "") else self.cfg.bind
        app = make_app(
            own_address=f"{host}:{self.cfg.port}",
            peers=[p for p in self.cfg.peers if p != f"{host}:{self.cfg.port}"],
            keys=self.keys,
            state_dir=self.cfg.state_dir,
        )
        logging.getLogger("tornado.access").setLevel(logging.WARNING)  # a line a poll is noise
        server = app.listen(self.cfg.web_port, address=self.cfg.bind)
        log.info("dashboard on http://%s:%d/", self.cfg.bind, self.cfg.web_port)
        return server

    async def _adopt(self) -> None:
        """After a restart: reconnect to the nannies of processes still running."""
        self.ledger.extend_all(self.cfg.lease_grace_s)
        for share_id in self.ledger.shares:  # idle time restarts with the gateway
            self.idle.touch(share_id)
        for proc in list(self.ledger.processes.values()):
            if proc.socket_path is None:  # a `bitfusion local` process, watched by its client
                if proc.pid is None or not pid_alive(proc.pid):
                    self.ledger.finish_process(proc.id, None)
                continue
            try:
                await self._start_relay(proc, out_from=1)
                if proc.kernel:
                    self._open_kernel(proc, None)
                log.info("adopted process %s of share %s", proc.id, proc.share_id)
            except (OSError, NannyGone, TimeoutError):
                status = launcher.read_status(Path(proc.status_path or ""))
                code = status.get("exit_code") if status else None
                if status and code is None:
                    launcher.kill_orphan(status)
                self.ledger.finish_process(proc.id, code)
                log.info("process %s ended while the gateway was away (exit %s)", proc.id, code)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, ident: bytes, frames: list[bytes]) -> bool:
        try:
            self.router.send([ident, *frames])
            return True
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or too slow (EAGAIN)
            log.debug("could not deliver to a client: %s", exc)
            return False

    async def _reply(self, ident: bytes, request: Message, data: Mapping[str, Any]) -> None:
        if self.check_replies:  # the test suite's gateways: every reply matches its type
            messages.check_reply(request.type, dict(data))
        await self._send(ident, protocol.encode("reply", id=request["id"], ok=True, data=data))

    async def _error(self, ident: bytes, msg_id: int, code: str, message: str) -> None:
        await self._send(
            ident,
            protocol.encode(
                "reply", id=msg_id, ok=False, code=code, error=message, server=self.cfg.hostname
            ),
        )

    async def _deliver(self, ident: bytes, kind: str, fields: dict, payload: bytes | None) -> None:
        self._touch_proc(fields.get("proc_id"))
        await self._send(
            ident, protocol.encode(kind, [payload] if payload is not None else [], **fields)
        )
