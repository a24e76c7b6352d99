"""A share's life: allocate (or queue), renew its lease, release it, and end it with its
processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

from gateway import simulated_claims, usage_files
from gateway.gpus import GpuInfo
from gateway.idle import IdleTracker
from gateway.ledger import Ledger, Share
from gateway.nanny import launcher
from gateway.nanny.relay import Relay
from gateway.nanny.wire import NannyMsg
from gateway.service.access import Access
from gateway.service.config import GatewayConfig
from gateway.service.grants import Grants
from gateway.service.kernel_sessions import KernelSessions
from gateway.service.outbox import Outbox
from gateway.service.queue import AllocationQueue
from gateway.service.state import Background, RequestError, Transitions, Waiter
from remoting import filters, protocol, tokens
from remoting.protocol import Message
from remoting.shares import Want, WantError, never_fits, place
from remoting.util.procs import kill_group, pid_alive

log = logging.getLogger("bitfusion.gateway")


@dataclasses.dataclass(eq=False)
class Lifecycle:
    cfg: GatewayConfig
    ledger: Ledger
    gpus: list[GpuInfo]
    access: Access
    grants: Grants
    queue: AllocationQueue
    transitions: Transitions
    kernels: KernelSessions
    relays: dict[str, Relay]
    usage: dict[str, dict[int, int]]  # share id -> GPU index -> MiB in use (policing samples it)
    idle: IdleTracker
    out: Outbox
    background: Background

    @property
    def ending(self) -> dict[str, asyncio.Event]:
        """Shares being ended, each event set once its share is gone."""
        return self.transitions.ending

    def _read_want(self, msg: Message) -> tuple[Want, list[int]]:
        """The request and the GPUs its filters allow; checked as every client checks it."""
        try:
            want = Want.from_wire(msg.header).validate()
        except WantError as exc:
            raise RequestError(protocol.E_BAD_REQUEST, str(exc)) from None
        eligible = [
            g.index
            for g in self.gpus
            if filters.matches(
                want.filters,
                filters.gpu_attrs(g.name, g.memory_total_mib, g.index, self.cfg.hostname),
            )
        ]
        return want, eligible

    async def on_allocate(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict | None:
        self.access.refuse_unsandboxed(tok)
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
        placement = place(want, slots) if not self.queue.waiters else None
        if placement is not None:
            return self.grants.grant(tok.user, msg, want, placement)
        wait_s = float(want.wait_s)
        if wait_s <= 0:
            self.ledger.event("refuse", tok.user, None, f"{want.describe()}: no room")
            waiting = len(self.queue.waiters)
            ahead = f" {waiting} request(s) are queued ahead;" if waiting else ""
            raise RequestError(
                protocol.E_NO_FIT,
                f"No room for {want.describe()} on {self.cfg.hostname} now:{ahead} "
                f"{self.queue.free_summary()}. {self.queue.no_room_advice(eligible)}",
            )
        waiter = Waiter(ident, msg, tok.user, want, eligible, time.monotonic() + wait_s)
        await self.queue.join(waiter)
        return None  # answered later by the queue's serve()

    async def on_renew(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        share = self.access.share(msg["share_id"], tok)
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
            relay = self.access.relay(item[0], tok)
            if relay is None:
                continue
            if relay.subscriber != ident:
                await relay.attach(ident, item[1])
            self.kernels.resubscribe(relay.proc_id, ident)
        return {
            "lease_s": self.cfg.lease_grace_s,
            "usage_mib": {str(k): v for k, v in self.usage.get(share.id, {}).items()},
            # A client watching one of these would otherwise wait for an exit that never
            # comes (its supervisor vanished while no gateway was there to hear it).
            "gone": gone,
        }

    async def on_release(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        share = self.access.share(msg["share_id"], tok)
        ending = self._release(ident, msg, share, tok.user)
        if self.ledger.processes_of(share.id) or share.id in self.ending:
            # Its processes get up to the terminate grace to stop: wait beside the receive
            # loop, answered when done, so one release never stalls every other client
            # (their renewals included, whose leases would run out meanwhile).
            self.background.spawn(ending)
        else:
            await ending  # nothing to wait for: answered at once, in order
        return None

    async def _release(self, ident: bytes, request: Message, share: Share, user: str) -> None:
        try:
            await self.end_share(share, f"released by {user}", user)
        except Exception:
            log.exception("internal error while releasing %s", share.id)
            await self.out.error(
                ident,
                request["id"],
                protocol.E_INTERNAL,
                f"The gateway failed to release share {share.id}; its log says why.",
            )
            return
        await self.out.reply(ident, request, {"released": share.id})

    async def end_share(self, share: Share, reason: str, user: str | None = None) -> None:
        """Stop a share's processes, then free its memory; safe to call twice."""
        if share.id in self.ending:
            # Someone else is ending it (its lease ran out, a second release): return once
            # that is done, so a release is never answered while the share is still held.
            await self.ending[share.id].wait()
            return
        self.ending[share.id] = asyncio.Event()
        try:
            # A process still starting in it is ended with it.
            await self.transitions.starts_done(share.id)
            relays = [
                self.relays[p.id] for p in self.ledger.processes_of(share.id) if p.id in self.relays
            ]
            for relay in relays:
                await relay.send(
                    {"type": NannyMsg.TERMINATE, "grace_s": self.cfg.terminate_grace_s}
                )
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
        await self.queue.serve()
