"""Everything the service sends to clients: replies, errors, and what it sends unasked (queue
positions, process output, kernel messages, notices)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import zmq

from gateway.service.router import Router
from remoting import messages, protocol
from remoting.protocol import Message

log = logging.getLogger("bitfusion.gateway")


class Outbox:
    def __init__(self, router: Router, hostname: str, check_replies: bool) -> None:
        self.router = router
        self.hostname = hostname
        self.check_replies = check_replies  # the test suite's gateways: replies match their type

    async def send(self, ident: bytes, frames: list[bytes]) -> bool:
        try:
            self.router.send([ident, *frames])
            return True
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or too slow (EAGAIN)
            log.debug("could not deliver to a client: %s", exc)
            return False

    async def reply(self, ident: bytes, request: Message, data: Mapping[str, Any]) -> None:
        if self.check_replies:
            messages.check_reply(request.type, dict(data))
        await self.send(ident, protocol.encode("reply", id=request["id"], ok=True, data=data))

    async def error(self, ident: bytes, msg_id: int, code: str, message: str) -> None:
        await self.send(
            ident,
            protocol.encode(
                "reply", id=msg_id, ok=False, code=code, error=message, server=self.hostname
            ),
        )
