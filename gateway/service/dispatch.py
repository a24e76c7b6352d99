"""Receiving: decode, authenticate, refuse replayed ids, and run each message's handler
from one explicit table (``handlers()``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.cluster_keys import ClusterKeys
from gateway.ledger import Ledger
from gateway.log_limit import LogLimit
from gateway.service.admin import Admin
from gateway.service.inventory import Inventory
from gateway.service.kernel_sessions import KernelSessions
from gateway.service.lifecycle import Lifecycle
from gateway.service.outbox import Outbox
from gateway.service.processes import Processes
from gateway.service.queue import AllocationQueue
from gateway.service.router import Router
from gateway.service.state import MAX_CONNECTIONS_TRACKED, Background, RequestError
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


Handler = Callable[[bytes, Message, tokens.Token], Awaitable[dict[str, Any] | None]]


def handlers(
    inventory: Inventory,
    queue: AllocationQueue,
    lifecycle: Lifecycle,
    processes: Processes,
    kernels: KernelSessions,
    admin: Admin,
) -> dict[str, Handler]:
    """Which part answers each authenticated message (tests/unit/test_dispatch_table.py checks
    that every one has a handler, and nothing else does)."""
    return {
        "hello": inventory.on_hello,
        "list_gpus": inventory.on_list_gpus,
        "smi": inventory.on_smi,
        "list_shares": inventory.on_list_shares,
        "history": inventory.on_history,
        "allocate": lifecycle.on_allocate,
        "waiting": queue.on_waiting,
        "renew": lifecycle.on_renew,
        "release": lifecycle.on_release,
        "spawn": processes.on_spawn,
        "register_pid": processes.on_register_pid,
        "attach": processes.on_attach,
        "stdin": processes.on_stdin,
        "stdin_close": processes.on_stdin_close,
        "signal": processes.on_signal,
        "ack": processes.on_ack,
        "kernel_start": kernels.on_kernel_start,
        "kernel_in": kernels.on_kernel_in,
        "drain": admin.on_drain,
        "set_idle_timeout": admin.on_set_idle_timeout,
        "revoke": admin.on_revoke,
        "mint": admin.on_mint,
    }


@dataclasses.dataclass(eq=False)
class Dispatch:
    hostname: str
    keys: ClusterKeys
    ledger: Ledger
    refusals: LogLimit  # every refusal is logged, a flood of them is counted
    router: Router
    out: Outbox
    background: Background
    table: dict[str, Handler]
    # connection -> its last request id (replays)
    last_ids: dict[bytes, int] = dataclasses.field(default_factory=dict)

    async def receive_loop(self) -> None:
        while True:
            # Copied: what clients send is small (requests, stdin, cells); the large flow is
            # kernel output, which KernelChannels receives without a copy.
            frames = await self.router.recv()
            ident, body = frames[0], frames[1:]
            try:
                await self.handle(ident, body)
            except Exception:  # a bug in one handler must not stop the service
                log.exception("internal error while handling a message")
            # A ready message is received without yielding, so under a steady flow this loop
            # would keep the event loop to itself: starts, endings and kernel output beside
            # it would wait for a lull. Give them a turn after each message.
            await asyncio.sleep(0)

    async def handle(self, ident: bytes, body: list[bytes]) -> None:
        try:
            msg = protocol.decode(body)
        except ProtocolError as exc:
            self.refusals.warning(
                "malformed", "dropped a malformed message (connection %s): %s", ident.hex(), exc
            )
            msg_id = _salvage_id(body)
            if msg_id is not None:
                await self.out.error(
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
            self.background.spawn(run)
        else:
            await run

    async def _run(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        """Run one authenticated message's handler and answer it, whatever happens."""
        spec = protocol.MESSAGES[msg.type]
        try:
            result = await self.table[msg.type](ident, msg, tok)
            if spec.request and result is not None:
                await self.out.reply(ident, msg, result)
        except RequestError as exc:
            await self._refuse(ident, msg, tok, exc)
        except Exception:
            await self._failed(ident, msg)

    async def _failed(self, ident: bytes, msg: Message) -> None:
        # A bug, not the sender's fault: log it, and still answer so no client hangs.
        log.exception("internal error while handling %s", msg.type)
        if protocol.MESSAGES[msg.type].request:
            await self.out.error(
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
            await self.out.error(ident, msg["id"], exc.code, str(exc))

    def _authenticate(self, text: str) -> tokens.Token:
        try:
            tok = tokens.parse(text)
        except tokens.TokenError as exc:
            raise RequestError(protocol.E_AUTH, str(exc)) from None
        if not tokens.verify(self.keys.token_secret, tok):
            raise RequestError(
                protocol.E_AUTH,
                f"The gateway on {self.hostname} does not accept this token; ask your admin "
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
