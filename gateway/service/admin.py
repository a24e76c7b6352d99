"""Admin actions: drain a GPU, set the idle timeout, revoke a token."""

from __future__ import annotations

import logging
from typing import Any

from gateway.service.state import RequestError, ServiceState
from remoting import protocol, tokens
from remoting.protocol import Message
from remoting.util.numbers import finite

log = logging.getLogger("bitfusion.gateway")


class Admin(ServiceState):
    async def on_drain(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        self._admin(tok, "drain a GPU")
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
        self._admin(tok, "set the idle timeout")
        seconds = finite(msg["seconds"])
        if seconds is None or seconds < 0:
            raise RequestError(
                protocol.E_BAD_REQUEST,
                "The idle timeout is a number of seconds, 0 or more (0 turns it off).",
            )
        self.idle_timeout_s = seconds or None
        self.ledger.set_setting("idle_timeout_s", self.idle_timeout_s)
        self.ledger.event("idle_timeout", tok.user, None, f"set to {seconds:g} s")
        return {"idle_timeout_s": self.idle_timeout_s}

    async def on_revoke(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        self._admin(tok, "revoke a token")
        self.ledger.revoke(msg["nonce"])
        self.ledger.event("revoke", tok.user, None, f"token {msg['nonce'][:8]}…")
        return {"revoked": msg["nonce"]}
