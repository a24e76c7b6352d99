"""What the gateway tells about itself: hello, its GPUs, their processes, the shares it holds
and the dashboard's history.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from gateway import sandbox
from gateway.gpus import GpuInfo, GpuInventory
from gateway.history import RANGES, History
from gateway.idle import IdleTracker
from gateway.ledger import Ledger, Share
from gateway.service.config import GatewayConfig
from gateway.service.queue import AllocationQueue
from gateway.service.state import RequestError
from remoting import protocol, tokens
from remoting.protocol import Message
from remoting.util.procs import session_of

log = logging.getLogger("bitfusion.gateway")


@dataclasses.dataclass(eq=False)
class Inventory:
    cfg: GatewayConfig
    ledger: Ledger
    gpus: list[GpuInfo]
    inventory: GpuInventory
    history: History
    idle: IdleTracker
    queue: AllocationQueue
    usage: dict[str, dict[int, int]]  # share id -> GPU index -> MiB in use (policing samples it)
    layout: sandbox.Layout
    verdict: sandbox.Verdict
    mps: bool
    started: float = dataclasses.field(default_factory=time.time)

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
            "protocol": protocol.PROTOCOL_VERSION,
            "simulated": self.inventory.simulated,
            # How shares are walled off, for every view (CLI, panel, dashboard).
            "sandbox": {
                "sandboxed": self.verdict.sandboxed,
                "refused": self.verdict.refuse,
                "line": self.verdict.line,
            },
            "driver": self.inventory.driver_version(),
            "cuda": self.inventory.cuda_version(),
            "mps": self.mps,
            "kernels": sorted(self.cfg.kernels),
            # Where clients link to this gateway's dashboard (null: it serves none); its port
            # is not always 54000 (`bitfusion up` takes a free one when 54000 is busy).
            "web_port": self.cfg.web_port or None,
        }

    async def on_hello(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        answer = {
            **self._server_info(),
            "user": tok.user,
            "admin": tok.admin,
            "uptime_s": round(time.time() - self.started, 1),
        }
        return answer

    async def on_list_gpus(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        counts = self.ledger.counts
        return {
            **self._server_info(),
            "gpus": self._gpu_rows(),
            "queued": len(self.queue.waiters),
            "idle_timeout_s": self.idle.timeout_s,
            "counters": {
                "grants": counts["grant"],
                "refusals": counts["refuse"],
                "lease_expiries": counts["lease_expired"],
                "police_warn": counts["police_warn"],
                "police_stop": counts["police_stop"],
                "idle_reclaims": counts["idle_reclaim"],
            },
        }

    async def on_smi(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
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
                        "share_id": share.id if share is not None and mine else None,
                        "mib": mib,
                    }
                )
        return {**self._server_info(), "gpus": self._gpu_rows(), "processes": procs}

    async def on_list_shares(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
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

    def _share_of_pid(self, pid: int) -> Share | None:
        sid = session_of(pid)
        for proc in self.ledger.processes.values():
            if proc.pid is not None and sid is not None and proc.pid == sid:
                return self.ledger.shares.get(proc.share_id)
        return None

    async def on_history(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
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
