"""A share's life: allocate (or queue), renew its lease, release it, end it with its
processes, and the environment its processes get.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

from gateway import simulated_claims, usage_files
from gateway.ledger import Share
from gateway.nanny import launcher
from gateway.nanny.wire import NannyMsg
from gateway.service.state import RequestError, ServiceState, Waiter
from gateway.share_env import ShareGpu, share_environment
from remoting import filters, protocol, tokens
from remoting.protocol import Message
from remoting.shares import Want, WantError, never_fits, place
from remoting.util.procs import kill_group, pid_alive

log = logging.getLogger("bitfusion.gateway")


class Lifecycle(ServiceState):
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

    async def on_allocate(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict | None:
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
        wait_s = float(want.wait_s)
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

    async def on_renew(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
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

    async def on_release(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        share = self._share(msg["share_id"], tok)
        ending = self._release(ident, msg, share, tok.user)
        if self.ledger.processes_of(share.id) or share.id in self.ending:
            # Its processes get up to the terminate grace to stop: wait beside the receive
            # loop, answered when done, so one release never stalls every other client
            # (their renewals included, whose leases would run out meanwhile).
            self._spawn_task(ending)
        else:
            await ending  # nothing to wait for: answered at once, in order
        return None

    async def _release(self, ident: bytes, request: Message, share: Share, user: str) -> None:
        try:
            await self.end_share(share, f"released by {user}", user)
        except Exception:
            log.exception("internal error while releasing %s", share.id)
            await self._error(
                ident,
                request["id"],
                protocol.E_INTERNAL,
                f"The gateway failed to release share {share.id}; its log says why.",
            )
            return
        await self._reply(ident, request, {"released": share.id})

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
        await self._serve_queue()

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
