"""Receiving: decode, authenticate, refuse replayed ids, and run each message's handler
from one explicit table (HANDLERS).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.service.admin import Admin
from gateway.service.inventory import Inventory
from gateway.service.kernel_sessions import KernelSessions
from gateway.service.lifecycle import Lifecycle
from gateway.service.processes import Processes
from gateway.service.queue import AllocationQueue
from gateway.service.state import MAX_CONNECTIONS_TRACKED, RequestError, ServiceState
from remoting import protocol, tokens
from remoting.protocol import Message, ProtocolError

log = logging.getLogger("bitfusion.gateway")


# Requests whose handlers wait for a process to start (tens of ms, more under load): they run
# beside the receive loop, so one user's start does not hold everyone else's messages.
BESIDE_THE_LOOP = frozenset({"spawn", "kernel_start"})
# All a minter token (a JupyterHub's) may ask: it holds no share and sees no one's.
MINTER_MAY = frozenset({"hello", "mint", "revoke"})


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


class Dispatch(ServiceState):
    async def _receive_loop(self) -> None:
        while True:
            # Copied: what clients send is small (requests, stdin, cells); the large flow is
            # kernel output, which KernelChannels receives without a copy.
            frames = await self.router.recv()
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
        if protocol.peer_version(msg.header) != protocol.PROTOCOL_VERSION:
            self.refusals.info(
                "version",
                "connection %s speaks protocol %d, this gateway %d: fields it adds are ignored",
                ident.hex(),
                protocol.peer_version(msg.header),
                protocol.PROTOCOL_VERSION,
            )
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
            if tok.minter and msg.type not in MINTER_MAY:
                raise RequestError(
                    protocol.E_DENIED,
                    f"This token only mints and revokes users' tokens (a JupyterHub's); "
                    f"{msg.type} needs a user's or an admin's token.",
                )
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
            result = await HANDLERS[msg.type](self, ident, msg, tok)
            if spec.request and result is not None:
                await self._reply(ident, msg, result)
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


Handler = Callable[[Any, bytes, Message, tokens.Token], Awaitable[dict[str, Any] | None]]

# Which part answers each authenticated message (tests/unit/test_dispatch_table.py checks that
# every one has a handler, and nothing else does).
HANDLERS: dict[str, Handler] = {
    "hello": Inventory.on_hello,
    "list_gpus": Inventory.on_list_gpus,
    "smi": Inventory.on_smi,
    "list_shares": Inventory.on_list_shares,
    "history": Inventory.on_history,
    "allocate": Lifecycle.on_allocate,
    "waiting": AllocationQueue.on_waiting,
    "renew": Lifecycle.on_renew,
    "release": Lifecycle.on_release,
    "spawn": Processes.on_spawn,
    "register_pid": Processes.on_register_pid,
    "attach": Processes.on_attach,
    "stdin": Processes.on_stdin,
    "stdin_close": Processes.on_stdin_close,
    "signal": Processes.on_signal,
    "ack": Processes.on_ack,
    "kernel_start": KernelSessions.on_kernel_start,
    "kernel_in": KernelSessions.on_kernel_in,
    "drain": Admin.on_drain,
    "set_idle_timeout": Admin.on_set_idle_timeout,
    "revoke": Admin.on_revoke,
    "mint": Admin.on_mint,
}
