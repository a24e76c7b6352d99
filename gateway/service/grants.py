"""Granting a share: its record in the ledger, its idle clock, and the variables its
processes get. Used by an allocation answered at once (lifecycle) and by one that waited
(queue), and for the environment of every process started in a share."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from gateway import sandbox, simulated_claims, usage_files
from gateway.gpus import GpuInfo
from gateway.idle import IdleTracker
from gateway.ledger import Ledger, Share
from gateway.service.config import GatewayConfig
from gateway.share_env import ShareGpu, share_environment
from remoting.protocol import Message
from remoting.shares import Want

log = logging.getLogger("bitfusion.gateway")


@dataclasses.dataclass(eq=False)
class Grants:
    cfg: GatewayConfig
    ledger: Ledger
    gpus: list[GpuInfo]
    idle: IdleTracker
    verdict: sandbox.Verdict
    simulated: bool
    mps: bool

    def grant(
        self, owner: str, msg: Message, want: Want, placement: dict[int, int]
    ) -> dict[str, Any]:
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
            **({"unconfined": self.verdict.line} if not self.verdict.sandboxed else {}),
        }

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
                simulated_claims.dir_for(self.cfg.state_dir, share.id) if self.simulated else None
            ),
            mps=self.mps,
            usage_file=usage_files.path_for(self.cfg.state_dir, share.id),
            base=base,
        )
