"""The gateway's service: one CurveZMQ ROUTER socket, the share ledger, leases and processes.

Everything runs on one asyncio loop, so handlers never race each other over the ledger.
A message that does not follow the protocol is logged and answered (when it has an id) with a
clear error; it never reaches a handler and never stops the loop for other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from gateway import handshakes, launcher, sandbox, simulated_claims, usage_files
from gateway.cluster_keys import ClusterKeys
from gateway.gpus import GpuInventory, GpuState
from gateway.history import RANGES, History
from gateway.idle import IdleTracker
from gateway.kernels import (
    KernelChannels,
    channel_info,
    channel_kind,
    write_connection_file,
)
from gateway.ledger import Ledger, Process, Share
from gateway.log_limit import LogLimit
from gateway.mps import mps_pipe_dir, mps_running
from gateway.nanny_link import NannyGone
from gateway.nanny_wire import FILES_FDS
from gateway.police import Police, PolicedShare, Verdict
from gateway.relay import Relay
from gateway.service.config import GatewayConfig
from gateway.share_env import ShareGpu, share_environment
from remoting import filters, protocol, tokens
from remoting.protocol import Message, ProtocolError
from remoting.shares import Want, never_fits, place
from remoting.util.procs import kill_group, pid_alive, session_of

log = logging.getLogger("bitfusion.gateway")
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


# Requests whose handlers wait for a process to start (tens of ms, more under load): they run
# beside the receive loop, so one user's start does not hold everyone else's messages.
BESIDE_THE_LOOP = frozenset({"spawn", "kernel_start"})


class RequestError(Exception):
    """Ends a request with a clear error sentence and a protocol error code."""

    def __init__(self, code: str, message: str, replay: bool = False):
        super().__init__(message)
        self.code = code
        self.replay = replay  # a request id seen before on its connection


class Gateway:
    def __init__(self, config: GatewayConfig, inventory: GpuInventory, keys: ClusterKeys):
        self.cfg = config
        self.inventory = inventory
        self.keys = keys
        self.gpus = inventory.gpus()
        run_dir = config.state_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run_dir = run_dir
        # How shares are walled off (said at start, in localhealth, on the dashboard).
        self.sandbox = sandbox.check(config.confine)
        self.sandbox_abi = self.sandbox.landlock_abi  # 0: no Landlock scopes for kernels
        self.sandbox_line = self.sandbox.line
        self.layout = sandbox.Layout.for_gateway(
            config.state_dir,
            config.homes_dir or config.state_dir / "homes",
            [k.argv[0] for k in config.kernels.values()],
        )
        self.ledger = Ledger(config.state_dir / "ledger.sqlite3", self.gpus)
        self.police = Police(config.police_mode, config.police_grace_s)  # type: ignore[arg-type]
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
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()  # keeps fire-and-forget tasks alive
        self.started = time.time()
        self.refusals = LogLimit(log)  # every refusal is logged, a flood of them is counted
        self.last_ids: dict[bytes, int] = {}  # connection -> its last request id (replays)

    # --- life cycle ----------------------------------------------------------------------
    def bind(self) -> None:
        self.sock.bind(f"tcp://{self.cfg.bind}:{self.cfg.port}")

    async def serve(self) -> None:
        launcher.prepare_spare()
        await self._adopt()
        web = self._start_web() if self.cfg.web_port else None
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

    # --- sending -------------------------------------------------------------------------
    async def _send(self, ident: bytes, frames: list[bytes]) -> bool:
        try:
            await self.sock.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or too slow (EAGAIN)
            log.debug("could not deliver to a client: %s", exc)
            return False

    async def _reply(self, ident: bytes, msg_id: int, **data: Any) -> None:
        await self._send(ident, protocol.encode("reply", id=msg_id, ok=True, data=data))

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

    # --- receiving -----------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while True:
            # Copied: what clients send is small (requests, stdin, cells); the large flow is
            # kernel output, which KernelChannels receives without a copy.
            frames = await self.sock.recv_multipart(copy=True)
            ident, body = frames[0], frames[1:]
            try:
                await self._handle(ident, body)
            except Exception:  # a bug in one handler must not stop the service
                log.exception("internal error while handling a message")
            # A ready message is received without yielding, so under a steady flow this loop
            # would keep the event loop to itself: starts, endings and kernel output beside
            # it would wait for a lull. Give them a turn after each message.
            await asyncio.sleep(0)

    async def _handle(self, ident: bytes, body: list[bytes]) -> None:
        try:
            msg = protocol.decode(body)
        except ProtocolError as exc:
            self.refusals.warning(
                "malformed", "dropped a malformed message (connection %s): %s", ident.hex(), exc
            )
            msg_id = _salvage_id(body)
            if msg_id is not None:
                await self._error(
                    ident, msg_id, protocol.E_BAD_REQUEST, f"Malformed request: {exc}"
                )
            return
        spec = protocol.MESSAGES[msg.type]
        if not spec.authenticated or msg.type == "reply":
            self.refusals.warning(
                "malformed",
                "dropped a %r message sent to the gateway (connection %s)",
                msg.type,
                ident.hex(),
            )
            return
        tok: tokens.Token | None = None
        try:
            tok = self._authenticate(msg["token"])
            if spec.request:
                self._check_fresh_id(ident, msg["id"])
        except RequestError as exc:
            await self._refuse(ident, msg, tok, exc)
            return
        except Exception:
            await self._failed(ident, msg)
            return
        run = self._run(ident, msg, tok)
        if msg.type in BESIDE_THE_LOOP:
            self._spawn_task(run)
        else:
            await run

    async def _run(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        """Run one authenticated message's handler and answer it, whatever happens."""
        spec = protocol.MESSAGES[msg.type]
        try:
            handler = getattr(self, f"_on_{msg.type}")
            result = await handler(ident, msg, tok)
            if spec.request and result is not None:
                await self._reply(ident, msg["id"], **result)
        except RequestError as exc:
            await self._refuse(ident, msg, tok, exc)
        except Exception:
            await self._failed(ident, msg)

    async def _failed(self, ident: bytes, msg: Message) -> None:
        # A bug, not the sender's fault: log it, and still answer so no client hangs.
        log.exception("internal error while handling %s", msg.type)
        if protocol.MESSAGES[msg.type].request:
            await self._error(
                ident,
                msg["id"],
                protocol.E_INTERNAL,
                f"The gateway failed on this {msg.type} request; its log says why.",
            )

    async def _refuse(
        self, ident: bytes, msg: Message, tok: tokens.Token | None, exc: RequestError
    ) -> None:
        # Who was refused what, on which connection: auth and denials are warnings (an
        # attack or a stale token); a request that merely cannot be served is info.
        security = exc.code in (protocol.E_AUTH, protocol.E_DENIED) or exc.replay
        self.refusals.line(
            logging.WARNING if security else logging.INFO,
            f"refused:{tok.user if tok else '?'}",
            "refused %s from %s (connection %s): %s",
            msg.type,
            f"user {tok.user}" if tok else _claimed(msg["token"]),
            ident.hex(),
            exc,
        )
        if protocol.MESSAGES[msg.type].request:
            await self._error(ident, msg["id"], exc.code, str(exc))

    def _authenticate(self, text: str) -> tokens.Token:
        try:
            tok = tokens.parse(text)
        except tokens.TokenError as exc:
            raise RequestError(protocol.E_AUTH, str(exc)) from None
        if not tokens.verify(self.keys.token_secret, tok):
            raise RequestError(
                protocol.E_AUTH,
                f"The gateway on {self.cfg.hostname} does not accept this token; ask your admin "
                "for a token of this pool and record it with 'bitfusion init'.",
            )
        if self.ledger.is_revoked(tok.nonce):
            raise RequestError(
                protocol.E_AUTH, "This token has been revoked; ask your admin for a new one."
            )
        if tok.expired():
            raise RequestError(
                protocol.E_AUTH,
                f"This token of {tok.user} expired on {tok.expires_text}; ask your admin for "
                "a new one.",
            )
        return tok

    def _check_fresh_id(self, ident: bytes, msg_id: int) -> None:
        """Refuse a request id at or below the last one on this connection: a replayed or
        duplicated request (clients count ids up from 1 on each connection). One int per
        connection, the oldest forgotten past MAX_CONNECTIONS_TRACKED."""
        last = self.last_ids.pop(ident, None)
        if last is not None and msg_id <= last:
            self.last_ids[ident] = last
            raise RequestError(
                protocol.E_BAD_REQUEST,
                f"Request id {msg_id} was already used on this connection (a replayed or "
                "duplicated request); it was not carried out.",
                replay=True,
            )
        self.last_ids[ident] = msg_id
        if len(self.last_ids) > MAX_CONNECTIONS_TRACKED:
            del self.last_ids[next(iter(self.last_ids))]

    # --- ownership -----------------------------------------------------------------------
    def _share(self, share_id: str, tok: tokens.Token) -> Share:
        share = self.ledger.shares.get(share_id)
        # Someone else's share looks exactly like a missing one, so ids leak nothing.
        if share is None or (share.owner != tok.user and not tok.admin):
            if share is not None:
                self._denied(
                    tok,
                    share_id,
                    "touched another user's share",
                    f"share {share_id} of {share.owner}",
                    "answered as a missing share",
                )
            raise RequestError(
                protocol.E_NOT_FOUND,
                f"No share {share_id} of yours is held on {self.cfg.hostname}; it may have "
                "been released or its lease may have expired.",
            )
        return share

    def _denied(
        self, tok: tokens.Token, share_id: str | None, event: str, target: str, answer: str
    ) -> None:
        """A user reached for someone else's share, process or kernel: an event in the ledger
        and a warning in the log (``answer``: what the user was told, or that it was dropped)."""
        self.ledger.event("denied", tok.user, share_id, event)
        self.refusals.warning(
            f"refused:{tok.user}", "refused user %s on %s (%s)", tok.user, target, answer
        )

    def _relay(self, proc_id: str, tok: tokens.Token) -> Relay | None:
        relay = self.relays.get(proc_id)
        if relay is None:
            return None
        # The owner recorded with the relay, not looked up: a process that has exited (or
        # whose share has ended) keeps its relay until its output is acked, and that output
        # is still its owner's alone.
        if relay.owner != tok.user and not tok.admin:
            proc = self.ledger.processes.get(proc_id)
            share_id = proc.share_id if proc else None
            self._denied(
                tok,
                share_id,
                f"touched process {proc_id}",
                f"process {proc_id} of {relay.owner}",
                "dropped",
            )
            return None
        return relay

    # --- handlers: inventory -------------------------------------------------------------
    def _gpu_rows(self) -> list[dict[str, Any]]:
        states = {s.index: s for s in self.inventory.states()}
        rows = []
        for g in self.gpus:
            st = states.get(g.index)
            rows.append(
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "memory_total_mib": g.memory_total_mib,
                    "memory_granted_mib": self.ledger.granted_mib(g.index),
                    "memory_free_mib": self.ledger.free_mib(g.index),
                    "memory_used_mib": st.memory_used_mib if st else None,
                    "utilization_pct": st.utilization_pct if st else None,
                    "temperature_c": st.temperature_c if st else None,
                    "power_w": st.power_w if st else None,
                    "shares": len(self.ledger.shares_on(g.index)),
                    "share_sizes_mib": [s.gpus[g.index] for s in self.ledger.shares_on(g.index)],
                    "simulated": g.simulated,
                    "draining": g.index in self.ledger.draining,
                }
            )
        return rows

    def _server_info(self) -> dict[str, Any]:
        return {
            "server": self.cfg.hostname,
            "version": protocol.VERSION,
            "simulated": self.inventory.simulated,
            # How shares are walled off, for every view (CLI, panel, dashboard).
            "sandbox": {
                "sandboxed": self.sandbox.sandboxed,
                "refused": self.sandbox.refuse,
                "line": self.sandbox_line,
            },
            "driver": self.inventory.driver_version(),
            "cuda": self.inventory.cuda_version(),
            "mps": self.mps,
            "kernels": sorted(self.cfg.kernels),
            # Where clients link to this gateway's dashboard (null: it serves none); its port
            # is not always 54000 (`bitfusion up` takes a free one when 54000 is busy).
            "web_port": self.cfg.web_port or None,
        }

    async def _on_hello(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        answer = {
            **self._server_info(),
            "user": tok.user,
            "admin": tok.admin,
            "uptime_s": round(time.time() - self.started, 1),
        }
        return answer

    async def _on_list_gpus(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        counts = self.ledger.counts
        return {
            **self._server_info(),
            "gpus": self._gpu_rows(),
            "queued": len(self.queue),
            "idle_timeout_s": self.idle_timeout_s,
            "counters": {
                "grants": counts["grant"],
                "refusals": counts["refuse"],
                "lease_expiries": counts["lease_expired"],
                "police_warn": counts["police_warn"],
                "police_stop": counts["police_stop"],
                "idle_reclaims": counts["idle_reclaim"],
            },
        }

    async def _on_smi(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        usage = self.inventory.process_memory()
        procs = []
        for pid, per_gpu in sorted(usage.items()):
            share = self._share_of_pid(pid)
            mine = share is not None and (share.owner == tok.user or tok.admin)
            for index, mib in sorted(per_gpu.items()):
                procs.append(
                    {
                        "gpu": index,
                        "pid": pid if (mine or tok.admin) else None,
                        "share_id": share.id if mine else None,
                        "mib": mib,
                    }
                )
        return {**self._server_info(), "gpus": self._gpu_rows(), "processes": procs}

    async def _on_list_shares(
        self, ident: bytes, msg: Message, tok: tokens.Token
    ) -> dict[str, Any]:
        shares = [
            {
                **s.public(self.gpus),
                "usage_mib": {str(k): v for k, v in self.usage.get(s.id, {}).items()},
                "idle_s": round(self.idle.idle_s(s), 1),
                "processes": [
                    {
                        "proc_id": p.id,
                        "argv": p.argv,
                        "pid": p.pid,
                        "kernel": p.kernel.get("name") if p.kernel else None,
                    }
                    for p in self.ledger.processes_of(s.id)
                ],
            }
            for s in self.ledger.shares.values()
            if tok.admin or s.owner == tok.user
        ]
        events = self.ledger.events(None if tok.admin else tok.user, limit=20)
        return {
            "server": self.cfg.hostname,
            "shares": shares,
            "events": events,
            # What this user pip-installed here, in their own environment (user_env.py).
            "packages": await asyncio.to_thread(sandbox.installed_packages, self.layout, tok.user),
        }

    # --- handlers: shares ----------------------------------------------------------------
    def _read_want(self, msg: Message) -> tuple[Want, list[int]]:
        n, mib, frac = msg["gpus"], msg.get("mib"), msg.get("fraction")
        if n < 1:
            raise RequestError(
                protocol.E_BAD_REQUEST, "A share needs at least 1 GPU (-n 1 or more)."
            )
        if mib is not None and frac is not None:
            raise RequestError(protocol.E_BAD_REQUEST, "Give -m or -p, not both.")
        if mib is not None and mib < 1:
            raise RequestError(protocol.E_BAD_REQUEST, "-m must be at least 1 MiB.")
        if frac is not None and not 0 < frac <= 1:
            raise RequestError(protocol.E_BAD_REQUEST, f"-p {frac} is outside (0, 1].")
        if _finite(msg.get("wait_s") or 0) is None:  # NaN would wait in the queue for ever
            raise RequestError(protocol.E_BAD_REQUEST, "--wait takes a number of seconds.")
        try:
            flt = filters.check_wire(msg.get("filters") or [])
        except filters.FilterError as exc:
            raise RequestError(protocol.E_BAD_REQUEST, str(exc)) from None
        eligible = [
            g.index
            for g in self.gpus
            if filters.matches(
                flt, filters.gpu_attrs(g.name, g.memory_total_mib, g.index, self.cfg.hostname)
            )
        ]
        return Want(n, mib, frac), eligible

    def _no_room_advice(self, eligible: list[int]) -> str:
        if eligible and set(eligible) <= self.ledger.draining:
            return (
                "An admin is draining them: try another server, or --wait SECONDS to queue "
                "until one is undrained."
            )
        return "Try a smaller share, or --wait SECONDS to queue."

    def _free_summary(self) -> str:
        parts = [
            f"GPU {g.index} ({g.name}) has {self.ledger.free_mib(g.index)} of "
            f"{g.memory_total_mib} MiB free"
            + (" and is draining" if g.index in self.ledger.draining else "")
            for g in self.gpus
        ]
        return "; ".join(parts) if parts else "no GPUs"

    def _grant(self, owner: str, msg: Message, want: Want, placement: dict[int, int]) -> dict:
        share = self.ledger.grant(
            owner,
            msg.get("client_host") or "?",
            placement,
            want,
            self.cfg.lease_grace_s,
            bool(msg.get("release_on_exit")),
        )
        log.debug("granted %s to %s: %s", share.id, owner, share.gpus)
        self.idle.touch(share.id)
        # The share's own variables (no base environment), for `bitfusion local` and shims
        # that start the process themselves.
        return {
            "share": share.public(self.gpus),
            "lease_s": self.cfg.lease_grace_s,
            "server": self.cfg.hostname,
            "env": self.share_env(share, {}),
            # Only present when true: the admin turned the sandbox off, and the user is told.
            **({"unconfined": self.sandbox_line} if not self.sandbox.sandboxed else {}),
        }

    async def _on_allocate(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict | None:
        self._refuse_unsandboxed(tok)
        want, eligible = self._read_want(msg)
        slots = self.ledger.slots(eligible)
        # Draining ends; a request that only a draining GPU could hold gets "no room now".
        why = never_fits(want, self.ledger.slots(eligible, draining_too=True))
        if why:
            self.ledger.event("refuse", tok.user, None, f"{want.describe()}: {why}")
            raise RequestError(
                protocol.E_NEVER_FITS,
                f"{self.cfg.hostname} can never hold {want.describe()}: {why}.",
            )
        placement = place(want, slots) if not self.queue else None
        if placement is not None:
            return self._grant(tok.user, msg, want, placement)
        wait_s = float(msg.get("wait_s") or 0)
        if wait_s <= 0:
            self.ledger.event("refuse", tok.user, None, f"{want.describe()}: no room")
            ahead = f" {len(self.queue)} request(s) are queued ahead;" if self.queue else ""
            raise RequestError(
                protocol.E_NO_FIT,
                f"No room for {want.describe()} on {self.cfg.hostname} now:{ahead} "
                f"{self._free_summary()}. {self._no_room_advice(eligible)}",
            )
        waiter = Waiter(ident, msg, tok.user, want, eligible, time.monotonic() + wait_s)
        self.queue.append(waiter)
        await self._announce_queue()
        return None  # answered later by _serve_queue

    async def _announce_queue(self) -> None:
        for pos, w in enumerate(self.queue, start=1):
            if w.position != pos:
                w.position = pos
                await self._send(
                    w.ident,
                    protocol.encode(
                        "queued",
                        id=w.msg["id"],
                        position=pos,
                        detail=f"waiting for {w.want.describe()} on {self.cfg.hostname}",
                        ticket=w.ticket,
                        lease_s=self.cfg.lease_grace_s,
                    ),
                )

    async def _on_waiting(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        waiter = next(
            (w for w in self.queue if w.ticket == msg["ticket"] and w.owner == tok.user), None
        )
        if waiter is None:
            return  # served or given up meanwhile: its answer is already on the way
        waiter.heard = time.monotonic()
        waiter.ident = ident  # the reply goes where the client is now
        if msg.get("give_up"):
            await self._leave_queue(waiter, "its client gave up")
            # Answered, so that a client waiting on several servers knows this one is done.
            await self._error(
                ident,
                waiter.msg["id"],
                protocol.E_GAVE_UP,
                f"Left the queue of {self.cfg.hostname}, as asked.",
            )

    async def _leave_queue(self, waiter: Waiter, why: str) -> None:
        self.queue.remove(waiter)
        self.ledger.event("left_queue", waiter.owner, None, f"{waiter.want.describe()}: {why}")
        log.info(
            "%s's request for %s left the queue: %s", waiter.owner, waiter.want.describe(), why
        )
        await self._announce_queue()

    async def _serve_queue(self) -> None:
        now = time.monotonic()
        changed = False
        for w in [w for w in self.queue if now - w.heard > self.cfg.lease_grace_s]:
            silent = f"no word from its client for {self.cfg.lease_grace_s:g} s"
            await self._leave_queue(w, silent)
            # Heard only if the client is still there after all, e.g. behind a long cut.
            await self._error(
                w.ident,
                w.msg["id"],
                protocol.E_NO_FIT,
                f"Left the queue of {self.cfg.hostname}: {silent}. Ask again.",
            )
        for w in [w for w in self.queue if w.deadline < now]:
            self.queue.remove(w)
            changed = True
            await self._error(
                w.ident,
                w.msg["id"],
                protocol.E_NO_FIT,
                f"Waited in vain for {w.want.describe()} on {self.cfg.hostname}: "
                f"{self._free_summary()}.",
            )
        # Strictly first come, first served: a big request at the head is not overtaken.
        while self.queue:
            head = self.queue[0]
            placement = place(head.want, self.ledger.slots(head.eligible))
            if placement is None:
                break
            self.queue.pop(0)
            changed = True
            await self._reply(
                head.ident,
                head.msg["id"],
                **self._grant(head.owner, head.msg, head.want, placement),
            )
        if changed:
            await self._announce_queue()

    async def _on_renew(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        share = self._share(msg["share_id"], tok)
        if share.id in self.ending:
            raise RequestError(protocol.E_NOT_FOUND, f"Share {share.id} is being released.")
        self.ledger.renew(share, self.cfg.lease_grace_s)
        gone = []  # processes this gateway has no supervisor of: ended for good
        for item in msg.get("attach") or []:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and type(item[1]) is int
            ):
                raise RequestError(protocol.E_BAD_REQUEST, "attach takes [[proc_id, seq], ...].")
            if item[0] not in self.relays:
                gone.append(item[0])
                continue
            relay = self._relay(item[0], tok)
            if relay is None:
                continue
            if relay.subscriber != ident:
                await relay.attach(ident, item[1])
            for kernel in self.kernels.values():
                if kernel.proc_id == relay.proc_id:
                    kernel.subscriber = ident
        return {
            "lease_s": self.cfg.lease_grace_s,
            "usage_mib": {str(k): v for k, v in self.usage.get(share.id, {}).items()},
            # A client watching one of these would otherwise wait for an exit that never
            # comes (its supervisor vanished while no gateway was there to hear it).
            "gone": gone,
        }

    async def _on_release(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        share = self._share(msg["share_id"], tok)
        ending = self._release(ident, msg["id"], share, tok.user)
        if self.ledger.processes_of(share.id) or share.id in self.ending:
            # Its processes get up to the terminate grace to stop: wait beside the receive
            # loop, answered when done, so one release never stalls every other client
            # (their renewals included, whose leases would run out meanwhile).
            self._spawn_task(ending)
        else:
            await ending  # nothing to wait for: answered at once, in order
        return None

    async def _release(self, ident: bytes, msg_id: int, share: Share, user: str) -> None:
        try:
            await self.end_share(share, f"released by {user}", user)
        except Exception:
            log.exception("internal error while releasing %s", share.id)
            await self._error(
                ident,
                msg_id,
                protocol.E_INTERNAL,
                f"The gateway failed to release share {share.id}; its log says why.",
            )
            return
        await self._reply(ident, msg_id, released=share.id)

    async def end_share(self, share: Share, reason: str, user: str | None = None) -> None:
        """Stop a share's processes, then free its memory; safe to call twice."""
        if share.id in self.ending:
            # Someone else is ending it (its lease ran out, a second release): return once
            # that is done, so a release is never answered while the share is still held.
            await self.ending[share.id].wait()
            return
        self.ending[share.id] = asyncio.Event()
        try:
            async with self.launched:  # a process still starting in it is ended with it
                await self.launched.wait_for(lambda: share.id not in self.launching)
            relays = [
                self.relays[p.id] for p in self.ledger.processes_of(share.id) if p.id in self.relays
            ]
            for relay in relays:
                await relay.send({"type": "terminate", "grace_s": self.cfg.terminate_grace_s})
            for proc in self.ledger.processes_of(share.id):
                if proc.socket_path is None and proc.pid and pid_alive(proc.pid):
                    kill_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.cfg.terminate_grace_s + 2
            while self.ledger.processes_of(share.id) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for proc in self.ledger.processes_of(share.id):  # still there: force it
                status = launcher.read_status(Path(proc.status_path)) if proc.status_path else None
                if status:
                    launcher.kill_orphan(status)
                elif proc.pid:
                    kill_group(proc.pid, signal.SIGKILL)
                self.ledger.finish_process(proc.id, None)
            self.ledger.release(share.id, reason, user)
            self.usage.pop(share.id, None)
            self.idle.forget(share.id)
            usage_files.remove(usage_files.path_for(self.cfg.state_dir, share.id))
            simulated_claims.remove(self.cfg.state_dir, share.id)
            log.debug("released %s (%s)", share.id, reason)
        finally:
            self.ending.pop(share.id).set()
        await self._serve_queue()

    # --- handlers: processes -------------------------------------------------------------
    async def _on_spawn(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        share = self._share(msg["share_id"], tok)
        argv = msg["argv"]
        if not argv or not all(isinstance(a, str) for a in argv):
            raise RequestError(protocol.E_BAD_REQUEST, "Give a command to run after '--'.")
        env_extra = msg.get("env") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env_extra.items()):
            raise RequestError(protocol.E_BAD_REQUEST, "Environment entries must be strings.")
        env = self.share_env(share, {**self._passed_env(), **env_extra})
        files = self._files_path(share, msg.get("files"))
        proc = await self._launch(tok, share, list(argv), env, msg.get("cwd"), ident, files=files)
        self.ledger.event("spawn", tok.user, share.id, " ".join(argv)[:200])
        return {"proc_id": proc.id}

    async def _launch(
        self,
        tok: tokens.Token,
        share: Share,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        subscriber: bytes,
        kernel: dict[str, str] | None = None,
        files: str | None = None,
    ) -> Process:
        """Start ``argv`` in ``share`` under a nanny, record it, and stream it to ``subscriber``."""
        self._refuse_unsandboxed(tok)
        async with self._starting_in(share):
            proc_id = self.ledger.new_id("p-", "processes")
            full, env, cwd, flags = self._sandboxed(share, argv, env, cwd, kernel, files)
            try:
                launched = await launcher.launch_async(
                    full,
                    env,
                    cwd,
                    self.run_dir,
                    proc_id,
                    max(60.0, self.cfg.lease_grace_s * 2),
                    flags,
                )
            except launcher.LaunchError as exc:
                self.ledger.event("spawn_failed", tok.user, share.id, str(exc))
                raise RequestError(protocol.E_SPAWN, str(exc)) from None
            proc = Process(
                proc_id,
                share.id,
                argv,
                str(launched.socket_path),
                str(launched.status_path),
                launched.nanny_pid,
                None,
                kernel=kernel,
            )
            self.ledger.add_process(proc)
            await self._start_relay(proc, out_from=1, subscriber=subscriber)
            if kernel is not None:
                self._open_kernel(proc, subscriber)  # inside the start, which end_share awaits
            return proc

    def _files_path(self, share: Share, path: str | None) -> str | None:
        """The client's folder, where the share can show it: at its own path, if that path
        is not one of the sandbox's own (the system, the user's home itself, /run)."""
        if path is None:
            return None
        if not self.sandbox.sandboxed:
            raise RequestError(
                protocol.E_NO_FILES,
                f"{self.cfg.hostname} runs shares unconfined, where your folder cannot be "
                "mounted; run with --no-files.",
            )
        missing = sandbox.files_unavailable()
        if missing:
            raise RequestError(
                protocol.E_NO_FILES,
                f"{self.cfg.hostname} cannot mount your folder: {missing}; ask its admin, "
                "or run with --no-files.",
            )
        why = self.layout.files_refusal(path, share.owner)
        if why:
            raise RequestError(
                protocol.E_NO_FILES,
                f"Your folder {path} cannot appear at the same path on {self.cfg.hostname}: "
                f"{why}; run from another folder, or with --no-files.",
            )
        return path

    def _passed_env(self) -> dict[str, str]:
        """What of the gateway's own environment reaches a share: locale and search paths,
        never its other variables (they are not the users' to read)."""
        return sandbox.passed(os.environ, self.sandbox.sandboxed)

    def _refuse_unsandboxed(self, tok: tokens.Token) -> None:
        if self.sandbox.refuse:
            self.refusals.info("unsandboxed", "refused user %s: no sandbox", tok.user)
            raise RequestError(
                protocol.E_SPAWN,
                f"{self.cfg.hostname} refuses shares: "
                f"{self.sandbox_line.removeprefix('REFUSED: ')}.",
            )

    def _sandboxed(
        self,
        share: Share,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        kernel: dict[str, str] | None,
        files: str | None = None,
    ) -> tuple[list[str], dict[str, str], str | None, list[str]]:
        """``argv`` as it runs in ``share``'s sandbox: the bwrap command line, its environment,
        the nanny's working directory and flags. Unchanged (but for the environment) when the
        admin chose --unconfined."""
        usage_dir = usage_files.path_for(self.cfg.state_dir, share.id).parent
        claims = (
            simulated_claims.dir_for(self.cfg.state_dir, share.id)
            if self.inventory.simulated
            else None
        )
        for folder in (usage_dir, claims):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.sandbox.sandboxed:  # --unconfined, said everywhere: the host's own paths
            return argv, env, None, []
        # The gateway's files that the share needs appear at fixed places under /run/bitfusion,
        # so no path of the state directory ever reaches it.
        run_in = sandbox.RUN_IN
        env = {**env, "BITFUSION_USAGE_FILE": f"{run_in}/usage/{usage_files.FILE_NAME}"}
        binds = [sandbox.Bind(str(usage_dir), f"{run_in}/usage")]
        if claims is not None:
            binds.append(sandbox.Bind(str(claims), f"{run_in}/simulated-usage", True))
            env["BITFUSION_SIMULATED_USAGE_DIR"] = f"{run_in}/simulated-usage"
        if kernel is not None:
            # A folder of its own, in which ipykernel rewrites its connection file.
            conn_file = Path(kernel["connection_file"])
            binds.append(sandbox.Bind(str(conn_file.parent), f"{run_in}/kernel", True))
            argv = [a.replace(str(conn_file), f"{run_in}/kernel/{conn_file.name}") for a in argv]
        user = share.owner
        user_env = sandbox.user_env_dir(user)
        if argv and argv[0] == sys.executable:  # the offered Python: the user's layer over it
            argv = [f"{user_env}/bin/python", *argv[1:]]
        by_index = {g.index: g for g in self.gpus}
        minors = [by_index[i].minor for i in share.gpus]
        home_in = str(sandbox.HOMES_IN / user)
        # A client's path is only ever a place in the user's own home: it widens nothing.
        chdir = cwd if cwd and (cwd == home_in or cwd.startswith(home_in + "/")) else None
        full = self.layout.argv(
            argv,
            user=user,
            binds=binds,
            gpu_minors=None if None in minors else [m for m in minors if m is not None],
            mps_dirs=[mps_pipe_dir(), "/var/log/nvidia-mps"] if self.mps else [],
            chdir=chdir,
            files=sandbox.FilesMount(files, *FILES_FDS) if files else None,
        )
        flags = ["--shield", *(["--scope"] if self.sandbox_abi else [])]
        flags += ["--files"] if files else []
        return full, sandbox.environment(env, user, user_env), None, flags

    @contextlib.asynccontextmanager
    async def _starting_in(self, share: Share) -> AsyncIterator[None]:
        """A process being started in ``share``, beside the receive loop: ``end_share``
        waits for it, so a share released meanwhile still ends the process started in it."""
        if share.id in self.ending or share.id not in self.ledger.shares:
            raise RequestError(
                protocol.E_NOT_FOUND, f"Share {share.id} ended before its process could start."
            )
        self.launching[share.id] = self.launching.get(share.id, 0) + 1
        try:
            yield
        finally:
            self.launching[share.id] -= 1
            if not self.launching[share.id]:
                del self.launching[share.id]
            async with self.launched:
                self.launched.notify_all()

    def share_env(self, share: Share, base: dict[str, str]) -> dict[str, str]:
        """The share's variables over ``base`` (the user's own, for a command they run)."""
        by_index = {g.index: g for g in self.gpus}
        return share_environment(
            server=self.cfg.hostname,
            share_id=share.id,
            gpus=[
                ShareGpu(i, by_index[i].uuid, by_index[i].name, mib, by_index[i].memory_total_mib)
                for i, mib in share.gpus.items()
            ],
            simulated_usage_dir=(
                simulated_claims.dir_for(self.cfg.state_dir, share.id)
                if self.inventory.simulated
                else None
            ),
            mps=self.mps,
            usage_file=usage_files.path_for(self.cfg.state_dir, share.id),
            base=base,
        )

    async def _start_relay(
        self, proc: Process, out_from: int, subscriber: bytes | None = None
    ) -> None:
        relay = Relay(
            proc.id,
            Path(proc.socket_path or ""),
            self._deliver,
            on_pid=lambda pid: self.ledger.set_pid(proc, pid) if proc.pid != pid else None,
            on_exit=lambda code: self._process_ended(proc.id, code),
            on_closed=lambda: self.relays.pop(proc.id, None),
        )
        relay.subscriber = subscriber
        share = self.ledger.shares.get(proc.share_id)
        relay.owner = share.owner if share is not None else None
        await relay.start(out_from)
        self.relays[proc.id] = relay

    def _process_ended(self, proc_id: str, code: int | None) -> None:
        self._close_kernel_of(proc_id)
        proc = self.ledger.finish_process(proc_id, code)
        if proc is not None:
            # A sandboxed command killed by signal N exits 128+N (bwrap says it as shells do).
            how = f"{code} (128+{signal.Signals(code - 128).name})" if _by_signal(code) else code
            log.info("process %s of share %s exited with %s", proc_id, proc.share_id, how)
        relay = self.relays.get(proc_id)
        if relay is not None and code is None:
            # The nanny vanished without a word: tell the watcher the process is gone.
            self.relays.pop(proc_id, None)
            if relay.subscriber is not None:
                self._spawn_task(
                    self._deliver(
                        relay.subscriber, "exit", {"proc_id": proc_id, "seq": 0, "code": 255}, None
                    )
                )

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_kernel_start(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict:
        share = self._share(msg["share_id"], tok)
        name = msg.get("kernel") or "python3"
        if name not in self.cfg.kernels:
            raise RequestError(
                protocol.E_NO_KERNEL,
                f"{self.cfg.hostname} offers no kernel {name!r}; it offers "
                f"{', '.join(sorted(self.cfg.kernels))}.",
            )
        files = self._files_path(share, msg.get("files"))
        kernel_id = "k-" + os.urandom(6).hex()
        env_of = self.cfg.kernels[name]
        kind = channel_kind(env_of, self.cfg.kernel_channels, self.sandbox_abi)
        conn_file, channels = write_connection_file(
            self.run_dir / "kernels" / kernel_id,
            kernel_id,
            msg["key"],
            msg["signature_scheme"],
            kind,
        )
        argv = [a.replace("{connection_file}", str(conn_file)) for a in env_of.argv]
        # BITFUSION_KERNEL_ID tells the %bitfusion magic that its kernel has a shim to ask.
        # JPY_PARENT_PID=1: the kernel's parent is the sandbox's init, which ipykernel does not
        # poll; without a parent it prints a note that Ctrl-C will not work (it does, through
        # the shim) and its in-sandbox connection file, both only noise in the user's log.
        env = self.share_env(
            share,
            {**self._passed_env(), "BITFUSION_KERNEL_ID": kernel_id, "JPY_PARENT_PID": "1"},
        )
        kernel = {
            "kernel_id": kernel_id,
            "connection_file": str(conn_file),
            "name": name,
            "channels": channels,
        }
        try:
            proc = await self._launch(tok, share, argv, env, None, ident, kernel, files)
        except RequestError:
            shutil.rmtree(conn_file.parent, ignore_errors=True)
            raise
        self.ledger.event("kernel_start", tok.user, share.id, f"{name} kernel {kernel_id}")
        return {"kernel_id": kernel_id, "proc_id": proc.id, "kernel": name}

    def _open_kernel(self, proc: Process, subscriber: bytes | None) -> None:
        assert proc.kernel is not None
        kernel_id = proc.kernel["kernel_id"]

        async def forward(channel: str, frontend: bytes, frames: list[bytes]) -> None:
            state = self.kernels.get(kernel_id)
            if state is not None:
                self.idle.touch(state.share_id)
            if state is not None and state.subscriber is not None:
                await self._send(
                    state.subscriber,
                    protocol.encode(
                        "kernel_out",
                        frames,
                        kernel_id=kernel_id,
                        channel=channel,
                        ident=frontend.hex() if frontend else None,
                    ),
                )

        # Kept since the start (a ledger from before has only the file, which the kernel
        # may have rewritten since).
        info = proc.kernel.get("channels") or channel_info(
            json.loads(Path(proc.kernel["connection_file"]).read_text())
        )
        name = f"the {proc.kernel.get('name', 'python3')} kernel {kernel_id}"
        channels = KernelChannels(self.ctx, info, forward, name)
        self.kernels[kernel_id] = KernelState(
            kernel_id, proc.id, proc.share_id, channels, subscriber
        )

    def _close_kernel_of(self, proc_id: str) -> None:
        for kernel_id, state in list(self.kernels.items()):
            if state.proc_id == proc_id:
                state.channels.close()
                del self.kernels[kernel_id]
                proc = self.ledger.processes.get(proc_id)
                if proc and proc.kernel:
                    _remove_connection_file(Path(proc.kernel["connection_file"]))

    async def _on_kernel_in(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        state = self.kernels.get(msg["kernel_id"])
        if state is None:
            return
        share = self.ledger.shares.get(state.share_id)
        if share is None or (share.owner != tok.user and not tok.admin):
            self._denied(
                tok,
                state.share_id,
                "wrote to another's kernel",
                f"kernel {state.kernel_id} of share {state.share_id}",
                "dropped",
            )
            return
        if msg["channel"] not in protocol.KERNEL_REQUEST_CHANNELS:
            return
        try:
            frontend: bytes | None = bytes.fromhex(msg.get("ident") or "")
        except ValueError:
            frontend = None
        if frontend is None or len(frontend) > 255:  # a ZMQ routing id: 1 to 255 bytes, or none
            self.refusals.info(
                "malformed", "dropped kernel_in from user %s: a bad frontend ident", tok.user
            )
            return
        state.subscriber = ident
        self.idle.touch(state.share_id)
        await state.channels.send(msg["channel"], frontend, list(msg.payloads))

    async def _on_register_pid(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict:
        share = self._share(msg["share_id"], tok)
        pid = msg["pid"]
        # The gateway signals a registered process when the share ends, so a user may only
        # register a process of their own making: not one of another share, not a nanny,
        # not the gateway or a process it depends on.
        sid = session_of(pid) if pid > 1 else None
        taken = {
            session_of(p.pid)
            for p in self.ledger.processes.values()
            if p.pid and p.share_id != share.id
        }
        if (
            sid is None
            or sid in taken
            or sid in (os.getsid(0), os.getpid())
            or pid in (os.getpid(), os.getppid())
            or launcher.is_nanny(pid)
        ):
            self.ledger.event("denied", tok.user, share.id, f"register_pid {pid} refused")
            raise RequestError(
                protocol.E_DENIED,
                f"Process {pid} cannot join share {share.id}: only a process you started "
                "yourself, in a session of its own, can.",
            )
        proc = Process(
            self.ledger.new_id("p-", "processes"),
            share.id,
            ["(local)"],
            None,
            None,
            None,
            msg["pid"],
        )
        self.ledger.add_process(proc)
        return {"proc_id": proc.id}

    async def _on_attach(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self._relay(msg["proc_id"], tok)
        if relay is not None:
            await relay.attach(ident, msg["out_from"])

    async def _on_stdin(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self._relay(msg["proc_id"], tok)
        if relay is not None:
            self._touch_proc(msg["proc_id"])
            await relay.send(
                {"type": "stdin", "seq": msg["seq"], "stream": msg.get("stream") or 0},
                protocol.as_bytes(msg.payloads[0]),
            )

    async def _on_stdin_close(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self._relay(msg["proc_id"], tok)
        if relay is not None:
            await relay.send(
                {"type": "stdin_close", "seq": msg["seq"], "stream": msg.get("stream") or 0}
            )

    async def _on_signal(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self._relay(msg["proc_id"], tok)
        if relay is not None and msg["signum"] in _FORWARDED_SIGNALS:
            await relay.send({"type": "signal", "signum": msg["signum"]})

    async def _on_ack(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self._relay(msg["proc_id"], tok)
        if relay is not None:
            await relay.ack(msg["seq"])
            if relay.link is None:
                self.relays.pop(msg["proc_id"], None)

    # --- periodic work -------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(0.25)
            try:
                for share in self.ledger.expired(time.time()):
                    if share.id not in self.ending:
                        self.ledger.event(
                            "lease_expired", share.owner, share.id, "the holder stopped renewing"
                        )
                        # A client that died or lost its network: admins read this in the log.
                        log.info(
                            "the lease of share %s (%s) expired: its holder stopped renewing "
                            "it for %g s; ending the share and its processes",
                            share.id,
                            share.owner,
                            self.cfg.lease_grace_s,
                        )
                        self._spawn_task(self.end_share(share, "lease expired"))
                await self._serve_queue()
                for proc in list(self.ledger.processes.values()):
                    if proc.socket_path is None and proc.pid and not pid_alive(proc.pid):
                        self.ledger.finish_process(proc.id, None)
                n += 1
                if n % 2400 == 0:
                    self.ledger.trim_events()
            except Exception:
                log.exception("periodic work failed")

    def _share_of_pid(self, pid: int) -> Share | None:
        sid = session_of(pid)
        for proc in self.ledger.processes.values():
            if proc.pid is not None and sid is not None and proc.pid == sid:
                return self.ledger.shares.get(proc.share_id)
        return None

    async def _police_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.police_interval_s)
            try:
                usage = await asyncio.to_thread(self.inventory.process_memory)
                policed = [
                    PolicedShare(
                        s.id,
                        s.owner,
                        dict(s.gpus),
                        frozenset(p.pid for p in self.ledger.processes_of(s.id) if p.pid),
                    )
                    for s in self.ledger.shares.values()
                ]
                self.usage = self.police.usage_by_share(usage, policed, session_of)
                states = {st.index: st for st in self.inventory.states()}  # one NVML sample
                await self._write_usage_files(states)
                self._note_activity(states)
                await self._reclaim_idle()
                for verdict in self.police.review(usage, policed, session_of):
                    await self._execute(verdict)
            except Exception:
                log.exception("policing failed")

    async def _write_usage_files(self, states: dict[int, GpuState]) -> None:
        # Built on the loop, written by a thread: with many shares the writes took a tenth
        # of every second of the loop. A share that ends meanwhile must not keep its file.
        utilization = {i: st.utilization_pct for i, st in states.items()}
        records = {
            share.id: usage_files.record(
                share_id=share.id,
                server=self.cfg.hostname,
                lease=usage_files.lease_state(share.lease_expires, self.cfg.lease_grace_s),
                gpus=share.public(self.gpus)["gpus"],
                used_mib=self.usage.get(share.id, {}),
                utilization=utilization,
            )
            for share in list(self.ledger.shares.values())
            if share.id not in self.ending
        }
        await asyncio.to_thread(usage_files.write_all, self.cfg.state_dir, records)
        for share_id in records:
            if share_id not in self.ledger.shares or share_id in self.ending:
                usage_files.remove(usage_files.path_for(self.cfg.state_dir, share_id))

    def _touch_proc(self, proc_id: str | None) -> None:
        proc = self.ledger.processes.get(proc_id or "")
        if proc is not None:
            self.idle.touch(proc.share_id)

    def _note_activity(self, states: dict[int, GpuState]) -> None:
        """Sampled work: running commands, GPU memory held on a computing GPU; and history."""
        for share in self.ledger.shares.values():
            procs = self.ledger.processes_of(share.id)
            computing = any(
                used and (states[i].utilization_pct or 0) > 0
                for i, used in self.usage.get(share.id, {}).items()
                if i in states
            )
            if computing or any(p.kernel is None for p in procs):
                self.idle.touch(share.id)
        self.history.record(
            [
                {
                    "index": g.index,
                    "used_mib": states[g.index].memory_used_mib if g.index in states else None,
                    "granted_mib": self.ledger.granted_mib(g.index),
                    "utilization_pct": (
                        states[g.index].utilization_pct if g.index in states else None
                    ),
                }
                for g in self.gpus
            ]
        )

    async def _reclaim_idle(self) -> None:
        for share in self.idle.overdue(list(self.ledger.shares.values()), self.idle_timeout_s):
            if share.id in self.ending:
                continue
            reason = f"idle for over {self.idle_timeout_s:g} s, reclaimed"
            self.ledger.event("idle_reclaim", share.owner, share.id, reason)
            self._spawn_task(self.end_share(share, reason))

    # --- handlers: the dashboard's history and admin actions -----------------------------
    def _admin(self, tok: tokens.Token, action: str) -> None:
        if not tok.admin:
            self.ledger.event("denied", tok.user, None, f"{action} needs an admin token")
            raise RequestError(
                protocol.E_DENIED, f"Only an admin token may {action}; ask your admin."
            )

    async def _on_history(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        name = msg["range"]
        if name not in RANGES:
            raise RequestError(
                protocol.E_BAD_REQUEST,
                f"No history range {name!r}; ask for one of {', '.join(RANGES)}.",
            )
        return {
            "server": self.cfg.hostname,
            "range": name,
            "step_s": RANGES[name][0],
            "samples": self.history.samples(name),
        }

    async def _on_drain(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        self._admin(tok, "drain a GPU")
        index = msg["index"]
        if index not in {g.index for g in self.gpus}:
            raise RequestError(protocol.E_NOT_FOUND, f"{self.cfg.hostname} has no GPU {index}.")
        self.ledger.set_draining(index, msg["drain"])
        verb = "drain" if msg["drain"] else "undrain"
        self.ledger.event(verb, tok.user, None, f"GPU {index}")
        return {"index": index, "draining": index in self.ledger.draining}

    async def _on_set_idle_timeout(
        self, ident: bytes, msg: Message, tok: tokens.Token
    ) -> dict[str, Any]:
        self._admin(tok, "set the idle timeout")
        seconds = _finite(msg["seconds"])
        if seconds is None or seconds < 0:
            raise RequestError(
                protocol.E_BAD_REQUEST,
                "The idle timeout is a number of seconds, 0 or more (0 turns it off).",
            )
        self.idle_timeout_s = seconds or None
        self.ledger.set_setting("idle_timeout_s", self.idle_timeout_s)
        self.ledger.event("idle_timeout", tok.user, None, f"set to {seconds:g} s")
        return {"idle_timeout_s": self.idle_timeout_s}

    async def _on_revoke(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        self._admin(tok, "revoke a token")
        self.ledger.revoke(msg["nonce"])
        self.ledger.event("revoke", tok.user, None, f"token {msg['nonce'][:8]}…")
        return {"revoked": msg["nonce"]}

    async def _execute(self, verdict: Verdict) -> None:
        self.ledger.event(
            f"police_{verdict.action}", verdict.owner, verdict.share_id, verdict.message
        )
        log.warning("%s", verdict.message)
        stop_in = (
            {"stop_in_s": self.police.grace_s}
            if verdict.action == "warn" and self.police.mode == "stop"
            else {}
        )
        for proc in self.ledger.processes_of(verdict.share_id):
            relay = self.relays.get(proc.id)
            if relay is not None and relay.subscriber is not None:
                await self._send(
                    relay.subscriber,
                    protocol.encode(
                        "notice",
                        message=verdict.message,
                        share_id=verdict.share_id,
                        proc_id=proc.id,
                        action=verdict.action,
                        gpu_index=verdict.gpu_index,
                        used_mib=verdict.used_mib,
                        limit_mib=verdict.limit_mib,
                        **stop_in,
                    ),
                )
        if verdict.action == "stop":
            for pid in verdict.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


_FORWARDED_SIGNALS = {
    int(s)
    for s in (
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGKILL,
        signal.SIGWINCH,
    )
}


def _finite(value: int | float) -> float | None:
    """A number from the wire as a float; None for NaN, infinities and ints beyond any float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _claimed(text: str) -> str:
    """Who a refused token says it is, for the log (not to be believed: it was refused)."""
    try:
        return f"a refused token of user {tokens.parse(text).user}"
    except tokens.TokenError:
        return "a message whose token is not a bitfusion token"


def _salvage_id(body: Sequence[bytes]) -> int | None:
    """The request id of a malformed message, so its sender gets an answer, not a hang."""
    import json

    try:
        value = json.loads(protocol.as_bytes(body[1])).get("id")
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    except Exception:
        return None


def _remove_connection_file(path: Path) -> None:
    """A kernel's connection file and the folder of its own that its sandbox saw."""
    path.unlink(missing_ok=True)
    if path.parent.name == path.stem.removeprefix("kernel-"):
        shutil.rmtree(path.parent, ignore_errors=True)


def _by_signal(code: int | None) -> bool:
    try:
        return code is not None and code > 128 and bool(signal.Signals(code - 128))
    except ValueError:
        return False
