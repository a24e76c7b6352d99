"""Who may touch what: a user's own shares and processes, admin-only actions, and the
refusal when no sandbox can be made.
"""

from __future__ import annotations

import dataclasses
import logging

from gateway import sandbox
from gateway.ledger import Ledger, Share
from gateway.log_limit import LogLimit
from gateway.nanny.relay import Relay
from gateway.service.state import RequestError
from remoting import protocol, tokens

log = logging.getLogger("bitfusion.gateway")


@dataclasses.dataclass(eq=False)
class Access:
    ledger: Ledger
    relays: dict[str, Relay]  # process id -> its link to the process's nanny
    refusals: LogLimit
    hostname: str
    verdict: sandbox.Verdict  # how shares are walled off, checked once at start

    def share(self, share_id: str, tok: tokens.Token) -> Share:
        share = self.ledger.shares.get(share_id)
        # Someone else's share looks exactly like a missing one, so ids leak nothing.
        if share is None or (share.owner != tok.user and not tok.admin):
            if share is not None:
                self.denied(
                    tok,
                    share_id,
                    "touched another user's share",
                    f"share {share_id} of {share.owner}",
                    "answered as a missing share",
                )
            raise RequestError(
                protocol.E_NOT_FOUND,
                f"No share {share_id} of yours is held on {self.hostname}; it may have "
                "been released or its lease may have expired.",
            )
        return share

    def denied(
        self, tok: tokens.Token, share_id: str | None, event: str, target: str, answer: str
    ) -> None:
        """A user reached for someone else's share, process or kernel: an event in the ledger
        and a warning in the log (``answer``: what the user was told, or that it was dropped)."""
        self.ledger.event("denied", tok.user, share_id, event)
        self.refusals.warning(
            f"refused:{tok.user}", "refused user %s on %s (%s)", tok.user, target, answer
        )

    def relay(self, proc_id: str, tok: tokens.Token) -> Relay | None:
        relay = self.relays.get(proc_id)
        if relay is None:
            return None
        # The owner recorded with the relay, not looked up: a process that has exited (or
        # whose share has ended) keeps its relay until its output is acked, and that output
        # is still its owner's alone.
        if relay.owner != tok.user and not tok.admin:
            proc = self.ledger.processes.get(proc_id)
            share_id = proc.share_id if proc else None
            self.denied(
                tok,
                share_id,
                f"touched process {proc_id}",
                f"process {proc_id} of {relay.owner}",
                "dropped",
            )
            return None
        return relay

    def admin(self, tok: tokens.Token, action: str, minter_too: bool = False) -> None:
        if not (tok.admin or (minter_too and tok.minter)):
            self.ledger.event("denied", tok.user, None, f"{action} needs an admin token")
            raise RequestError(
                protocol.E_DENIED, f"Only an admin token may {action}; ask your admin."
            )

    def refuse_unsandboxed(self, tok: tokens.Token) -> None:
        if self.verdict.refuse:
            self.refusals.info("unsandboxed", "refused user %s: no sandbox", tok.user)
            raise RequestError(
                protocol.E_SPAWN,
                f"{self.hostname} refuses shares: {self.verdict.line.removeprefix('REFUSED: ')}.",
            )
