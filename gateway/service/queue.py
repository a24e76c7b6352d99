"""Allocations that wait for room (``--wait``): served strictly first come, first served."""

from __future__ import annotations

import dataclasses
import logging
import time

from gateway.gpus import GpuInfo
from gateway.ledger import Ledger
from gateway.service.config import GatewayConfig
from gateway.service.grants import Grants
from gateway.service.outbox import Outbox
from gateway.service.state import Waiter
from remoting import protocol, tokens
from remoting.protocol import Message
from remoting.shares import place

log = logging.getLogger("bitfusion.gateway")


@dataclasses.dataclass(eq=False)
class AllocationQueue:
    cfg: GatewayConfig
    ledger: Ledger
    gpus: list[GpuInfo]
    out: Outbox
    grants: Grants
    waiters: list[Waiter] = dataclasses.field(default_factory=list)

    async def join(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)
        await self.announce()

    async def announce(self) -> None:
        for pos, w in enumerate(self.waiters, start=1):
            if w.position != pos:
                w.position = pos
                await self.out.send(
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

    async def on_waiting(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        waiter = next(
            (w for w in self.waiters if w.ticket == msg["ticket"] and w.owner == tok.user), None
        )
        if waiter is None:
            return  # served or given up meanwhile: its answer is already on the way
        waiter.heard = time.monotonic()
        waiter.ident = ident  # the reply goes where the client is now
        if msg.get("give_up"):
            await self.leave(waiter, "its client gave up")
            # Answered, so that a client waiting on several servers knows this one is done.
            await self.out.error(
                ident,
                waiter.msg["id"],
                protocol.E_GAVE_UP,
                f"Left the queue of {self.cfg.hostname}, as asked.",
            )

    async def leave(self, waiter: Waiter, why: str) -> None:
        self.waiters.remove(waiter)
        self.ledger.event("left_queue", waiter.owner, None, f"{waiter.want.describe()}: {why}")
        log.info(
            "%s's request for %s left the queue: %s", waiter.owner, waiter.want.describe(), why
        )
        await self.announce()

    async def serve(self) -> None:
        now = time.monotonic()
        changed = False
        for w in [w for w in self.waiters if now - w.heard > self.cfg.lease_grace_s]:
            silent = f"no word from its client for {self.cfg.lease_grace_s:g} s"
            await self.leave(w, silent)
            # Heard only if the client is still there after all, e.g. behind a long cut.
            await self.out.error(
                w.ident,
                w.msg["id"],
                protocol.E_NO_FIT,
                f"Left the queue of {self.cfg.hostname}: {silent}. Ask again.",
            )
        for w in [w for w in self.waiters if w.deadline < now]:
            self.waiters.remove(w)
            changed = True
            await self.out.error(
                w.ident,
                w.msg["id"],
                protocol.E_NO_FIT,
                f"Waited in vain for {w.want.describe()} on {self.cfg.hostname}: "
                f"{self.free_summary()}.",
            )
        # Strictly first come, first served: a big request at the head is not overtaken.
        while self.waiters:
            head = self.waiters[0]
            placement = place(head.want, self.ledger.slots(head.eligible))
            if placement is None:
                break
            self.waiters.pop(0)
            changed = True
            await self.out.reply(
                head.ident, head.msg, self.grants.grant(head.owner, head.msg, head.want, placement)
            )
        if changed:
            await self.announce()

    def free_summary(self) -> str:
        parts = [
            f"GPU {g.index} ({g.name}) has {self.ledger.free_mib(g.index)} of "
            f"{g.memory_total_mib} MiB free"
            + (" and is draining" if g.index in self.ledger.draining else "")
            for g in self.gpus
        ]
        return "; ".join(parts) if parts else "no GPUs"

    def no_room_advice(self, eligible: list[int]) -> str:
        if eligible and set(eligible) <= self.ledger.draining:
            return (
                "An admin is draining them: try another server, or --wait SECONDS to queue "
                "until one is undrained."
            )
        return "Try a smaller share, or --wait SECONDS to queue."
