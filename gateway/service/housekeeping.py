"""Periodic work: expired leases, the queue, policing GPU memory, usage files, idle shares
and the history samples.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from typing import Any

from gateway import usage_files
from gateway.gpus import GpuInfo, GpuInventory, GpuState
from gateway.history import History
from gateway.idle import IdleTracker
from gateway.ledger import Ledger
from gateway.nanny.relay import Relay
from gateway.police import Police, PolicedShare, Verdict
from gateway.service.config import GatewayConfig
from gateway.service.lifecycle import Lifecycle
from gateway.service.outbox import Outbox
from gateway.service.queue import AllocationQueue
from gateway.service.router import Router
from gateway.service.state import Background
from remoting import protocol
from remoting.util.procs import pid_alive, session_of

log = logging.getLogger("bitfusion.gateway")


@dataclasses.dataclass(eq=False)
class Housekeeping:
    cfg: GatewayConfig
    ledger: Ledger
    gpus: list[GpuInfo]
    inventory: GpuInventory
    lifecycle: Lifecycle
    queue: AllocationQueue
    police: Police
    idle: IdleTracker
    history: History
    relays: dict[str, Relay]
    usage: dict[str, dict[int, int]]  # share id -> GPU index -> MiB in use, kept fresh here
    out: Outbox
    background: Background
    router: Router

    async def tick_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(0.25)
            self.router.poke()  # a last resort: a message whose wake-up a send took
            try:
                for share in self.ledger.expired(time.time()):
                    if share.id not in self.lifecycle.ending:
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
                        self.background.spawn(self.lifecycle.end_share(share, "lease expired"))
                await self.queue.serve()
                for proc in list(self.ledger.processes.values()):
                    if proc.socket_path is None and proc.pid and not pid_alive(proc.pid):
                        self.ledger.finish_process(proc.id, None)
                n += 1
                if n % 2400 == 0:
                    self.ledger.trim_events()
            except Exception:
                log.exception("periodic work failed")

    async def police_loop(self) -> None:
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
                by_share = self.police.usage_by_share(usage, policed, session_of)
                self.usage.clear()  # in place: the lifecycle and the inventory read it too
                self.usage.update(by_share)
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
            if share.id not in self.lifecycle.ending
        }
        await asyncio.to_thread(usage_files.write_all, self.cfg.state_dir, records)
        for share_id in records:
            if share_id not in self.ledger.shares or share_id in self.lifecycle.ending:
                usage_files.remove(usage_files.path_for(self.cfg.state_dir, share_id))

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
        for share in self.idle.overdue(list(self.ledger.shares.values())):
            if share.id in self.lifecycle.ending:
                continue
            reason = f"idle for over {self.idle.timeout_s:g} s, reclaimed"
            self.ledger.event("idle_reclaim", share.owner, share.id, reason)
            # Said before the share ends, so its kernel's shim knows why it did (and does
            # not take a share again for a kernel nobody uses).
            await self._tell(
                share.id,
                f"Share {share.id} was idle for over {self.idle.timeout_s:g} s and went back "
                "to the pool (the admin's idle timeout).",
                "idle",
            )
            self.background.spawn(self.lifecycle.end_share(share, reason))

    async def _tell(self, share_id: str, message: str, action: str, **fields: Any) -> None:
        """A notice to whoever watches each process of the share (policing, idle reclaim)."""
        for proc in self.ledger.processes_of(share_id):
            relay = self.relays.get(proc.id)
            if relay is not None and relay.subscriber is not None:
                await self.out.send(
                    relay.subscriber,
                    protocol.encode(
                        "notice",
                        message=message,
                        share_id=share_id,
                        proc_id=proc.id,
                        action=action,
                        **fields,
                    ),
                )

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
        await self._tell(
            verdict.share_id,
            verdict.message,
            verdict.action,
            gpu_index=verdict.gpu_index,
            used_mib=verdict.used_mib,
            limit_mib=verdict.limit_mib,
            **stop_in,
        )
        if verdict.action == "stop":
            for pid in verdict.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
