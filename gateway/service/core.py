"""The gateway's service: one CurveZMQ ROUTER socket, the share ledger, leases and processes.

Everything runs on one asyncio loop, so handlers never race each other over the ledger.
A message that does not follow the protocol is logged and answered (when it has an id) with a
clear error; it never reaches a handler and never stops the loop for other clients.

Gateway owns the sockets and the ledger, and builds the parts (gateway.service.*), each an
object handed only what it uses; gateway.service.dispatch.handlers() says which part answers
which message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
from gateway.service.dispatch import Dispatch, handlers
from gateway.service.grants import Grants
from gateway.service.housekeeping import Housekeeping
from gateway.service.inventory import Inventory
from gateway.service.kernel_sessions import KernelSessions
from gateway.service.lifecycle import Lifecycle
from gateway.service.outbox import Outbox
from gateway.service.processes import Processes
from gateway.service.queue import AllocationQueue
from gateway.service.router import Router
from gateway.service.state import Background, Transitions
from remoting import protocol, state_dir
from remoting.util.procs import pid_alive

log = logging.getLogger("bitfusion.gateway")


class Gateway:
    def __init__(self, config: GatewayConfig, inventory: GpuInventory, keys: ClusterKeys):
        self.cfg = config
        self.inventory = inventory
        self.keys = keys
        self.gpus = gpus = inventory.gpus()
        run_dir = config.state_dir / state_dir.RUN
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # How shares are walled off (said at start, in localhealth, on the dashboard).
        self.sandbox = verdict = sandbox.check(config.confine)
        self.sandbox_abi = verdict.landlock_abi  # 0: no Landlock scopes for kernels
        self.sandbox_line = verdict.line
        self.layout = layout = sandbox.Layout.for_gateway(
            config.state_dir,
            config.homes_dir or config.state_dir / state_dir.HOMES,
            [k.argv[0] for k in config.kernels.values()],
        )
        self.ledger = ledger = Ledger(config.state_dir / state_dir.LEDGER, gpus)
        history = History(ledger.db)
        self.idle = idle = IdleTracker(ledger.setting("idle_timeout_s"))
        mps = mps_running()
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
        self.refusals = LogLimit(log)  # every refusal is logged, a flood of them is counted

        # The parts, each handed only what it uses. Shared between some of them: the links to
        # processes' nannies (by process id), each share's GPU memory in use (sampled by
        # policing), and the shares being ended or started in.
        self.relays: dict[str, Relay] = {}
        usage: dict[str, dict[int, int]] = {}
        transitions = Transitions()
        background = Background()
        out = Outbox(self.router, config.hostname, bool(os.environ.get("BITFUSION_CHECK_REPLIES")))
        access = Access(ledger, self.relays, self.refusals, config.hostname, verdict)
        simulated = inventory.simulated
        grants = Grants(config, ledger, gpus, idle, verdict, simulated=simulated, mps=mps)
        self.queue = AllocationQueue(config, ledger, gpus, out, grants)
        self.processes = Processes(
            config, ledger, gpus, access, grants, transitions, out=out, background=background,
            relays=self.relays, idle=idle, layout=layout, verdict=verdict, simulated=simulated,
            mps=mps, run_dir=run_dir,
        )  # fmt: skip
        self.kernels = KernelSessions(
            config, self.ctx, ledger, access, self.processes, grants, out=out, idle=idle,
            refusals=self.refusals, run_dir=run_dir, landlock_abi=verdict.landlock_abi,
        )  # fmt: skip
        self.lifecycle = Lifecycle(
            config, ledger, gpus, access, grants, self.queue, transitions, self.kernels,
            relays=self.relays, usage=usage, idle=idle, out=out, background=background,
        )  # fmt: skip
        info = Inventory(
            config, ledger, gpus, inventory, history, idle, self.queue, usage=usage,
            layout=layout, verdict=verdict, mps=mps,
        )  # fmt: skip
        admin = Admin(config, ledger, gpus, keys, access, idle)
        police = Police(config.police_mode, config.police_grace_s)
        self.house = Housekeeping(
            config, ledger, gpus, inventory, self.lifecycle, self.queue, police, idle, history,
            relays=self.relays, usage=usage, out=out, background=background, router=self.router,
        )  # fmt: skip
        table = handlers(info, self.queue, self.lifecycle, self.processes, self.kernels, admin)
        self.dispatch = Dispatch(
            config.hostname, keys, ledger, self.refusals, self.router, out, background, table
        )

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
            asyncio.create_task(self.dispatch.receive_loop()),
            asyncio.create_task(self.house.tick_loop()),
            asyncio.create_task(self.house.police_loop()),
            asyncio.create_task(handshakes.watch(self.sock, self.refusals)),
        ]
        await self._stop.wait()
        for t in self._tasks:
            t.cancel()
        if web is not None:
            web.stop()
        # Processes in shares outlive the gateway on purpose; only our own links close.
        self.kernels.close_all()
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
                await self.processes.start_relay(proc, out_from=1)
                if proc.kernel:
                    self.kernels.open(proc, None)
                log.info("adopted process %s of share %s", proc.id, proc.share_id)
            except (OSError, NannyGone, TimeoutError):
                status = launcher.read_status(Path(proc.status_path or ""))
                code = status.get("exit_code") if status else None
                if status and code is None:
                    launcher.kill_orphan(status)
                self.ledger.finish_process(proc.id, code)
                log.info("process %s ended while the gateway was away (exit %s)", proc.id, code)
