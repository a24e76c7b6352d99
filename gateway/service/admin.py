"""Admin actions: drain a GPU, set the idle timeout; mint and revoke tokens (also a minter's,
such as a JupyterHub's)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from gateway.cluster_keys import ClusterKeys
from gateway.gpus import GpuInfo
from gateway.idle import IdleTracker
from gateway.ledger import Ledger
from gateway.service.access import Access
from gateway.service.config import GatewayConfig
from gateway.service.state import RequestError
from remoting import protocol, tokens
from remoting.protocol import Message
from remoting.util.numbers import finite

log = logging.getLogger("bitfusion.gateway")


@dataclasses.dataclass(eq=False)
class Admin:
    cfg: GatewayConfig
    ledger: Ledger
    gpus: list[GpuInfo]
    keys: ClusterKeys
    access: Access
    idle: IdleTracker

    async def on_drain(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        self.access.admin(tok, "drain a GPU")
        index = msg["index"]
        if index not in {g.index for g in self.gpus}:
            raise RequestError(protocol.E_NOT_FOUND, f"{self.cfg.hostname} has no GPU {index}.")
        self.ledger.set_draining(index, msg["drain"])
        verb = "drain" if msg["drain"] else "undrain"
        self.ledger.event(verb, tok.user, None, f"GPU {index}")
        return {"index": index, "draining": index in self.ledger.draining}

    async def on_set_idle_timeout(
        self, ident: bytes, msg: Message, tok: tokens.Token
    ) -> dict[str, Any]:
        self.access.admin(tok, "set the idle timeout")
        seconds = finite(msg["seconds"])
        if seconds is None or seconds < 0:
            raise RequestError(
                protocol.E_BAD_REQUEST,
                "The idle timeout is a number of seconds, 0 or more (0 turns it off).",
            )
        self.idle.timeout_s = seconds or None
        self.ledger.set_setting("idle_timeout_s", self.idle.timeout_s)
        self.ledger.event("idle_timeout", tok.user, None, f"set to {seconds:g} s")
        return {"idle_timeout_s": self.idle.timeout_s}

    async def on_revoke(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        self.access.admin(tok, "revoke a token", minter_too=True)
        self.ledger.revoke(msg["nonce"])
        self.ledger.event("revoke", tok.user, None, f"token {msg['nonce'][:8]}…")
        return {"revoked": msg["nonce"]}

    async def on_mint(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        """A token for a user of this pool, signed with the cluster secret (so it works on
        every gateway). A minter (a JupyterHub) mints only users' tokens, and only ones
        that expire: what it hands out ends even if it never revokes it."""
        self.access.admin(tok, "mint a token", minter_too=True)
        admin = bool(msg.get("admin"))
        if admin and not tok.admin:
            self.ledger.event("denied", tok.user, None, "a minter asked for an admin token")
            raise RequestError(
                protocol.E_DENIED, "A minter token mints users' tokens only, not an admin's."
            )
        lifetime = finite(msg.get("expires_s") or 0)
        if lifetime is None or lifetime < 0 or lifetime > tokens.MAX_LIFETIME_S:
            raise RequestError(
                protocol.E_BAD_REQUEST,
                f"expires_s is a number of seconds from 1 to {tokens.MAX_LIFETIME_S}.",
            )
        if tok.minter and not lifetime:
            raise RequestError(
                protocol.E_BAD_REQUEST,
                "A minter's tokens must expire: give expires_s, the seconds they last.",
            )
        expires = int(time.time() + lifetime) if lifetime else None
        try:
            minted = tokens.mint(
                self.keys.token_secret, self.keys.public, msg["user"], admin, expires
            )
        except tokens.TokenError as exc:
            raise RequestError(protocol.E_BAD_REQUEST, str(exc)) from None
        until = f", until {minted.expires_text}" if expires else ""
        self.ledger.event("mint", tok.user, None, f"token of {minted.user}{until}")
        return {
            "token": str(minted),
            "user": minted.user,
            "admin": minted.admin,
            "expires": minted.expires,
        }
