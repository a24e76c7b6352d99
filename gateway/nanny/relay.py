"""One process's stdio between its nanny and the client that watches it.

The nanny is the source of truth: it keeps every output chunk until the client acks it, so the
relay holds no buffer of its own. When the client reconnects, or the gateway restarts, the
client says from which sequence number it wants output and the nanny replays from there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.nanny.link import NannyGone, NannyLink
from gateway.nanny.wire import FILES, NannyMsg

log = logging.getLogger("bitfusion.gateway")

# Called with (client ident, frames-ready message fields) to deliver to the watching client;
# the message types are the client protocol's (remoting.protocol), not NannyMsg.
Deliver = Callable[[bytes, str, dict, bytes | None], Awaitable[None]]


class Relay:
    """Connects to one nanny, forwards its messages to the current subscriber."""

    def __init__(
        self,
        proc_id: str,
        socket_path: Path,
        deliver: Deliver,
        on_pid: Callable[[int], None],
        on_exit: Callable[[int | None], None],
        on_closed: Callable[[], object],
    ):
        self.proc_id = proc_id
        self.socket_path = socket_path
        self.deliver = deliver
        self.on_pid = on_pid
        self.on_exit = on_exit
        self.on_closed = on_closed
        self.subscriber: bytes | None = None
        self.owner: str | None = None  # the share's owner: only they (or an admin) may watch
        self.link: NannyLink | None = None
        self.exit_seq: int | None = None
        self.exit_code: int | None = None
        self.closed = asyncio.Event()
        self.closing = False  # our own close: the nanny and its process go on without us
        self._task: asyncio.Task[None] | None = None

    async def start(self, out_from: int = 1) -> None:
        self.link = await NannyLink.connect(self.socket_path)
        await self.link.send({"type": NannyMsg.ATTACH, "out_from": out_from})
        self._task = asyncio.create_task(self._pump())

    async def attach(self, subscriber: bytes, out_from: int) -> None:
        """A client (re)subscribes; the nanny replays output from ``out_from``."""
        self.subscriber = subscriber
        if self.link is not None:
            await self.link.send({"type": NannyMsg.ATTACH, "out_from": out_from})

    async def send(self, header: dict, payload: bytes = b"") -> None:
        if self.link is not None:
            try:
                await self.link.send(header, payload)
            except (NannyGone, OSError):
                pass  # the pump notices and reports the end

    async def ack(self, seq: int) -> None:
        await self.send({"type": NannyMsg.ACK, "seq": seq})
        if self.exit_seq is not None and seq >= self.exit_seq:
            await self.close()  # everything delivered; the nanny exits on this ack

    async def _stdin_seq(self, seq: int, resend: bool, stream: int = 0) -> None:
        """Tell the client how far the nanny has an input (stdin, or the files stream); after
        an attach, it sends again whatever came later (the nanny drops what it already has)."""
        if self.subscriber is not None:
            fields = {"proc_id": self.proc_id, "seq": seq, "resend": resend}
            if stream:
                fields["stream"] = stream
            await self.deliver(self.subscriber, "stdin_seq", fields, None)

    async def _pump(self) -> None:
        # Our own link, held here: close() drops self.link while a delivery is under way.
        link = self.link
        assert link is not None
        try:
            while not self.closing:
                header, payload = await link.receive()
                kind = header.get("type")
                if kind == NannyMsg.ATTACHED:
                    self.on_pid(int(header["child_pid"]))
                    await self._stdin_seq(int(header.get("stdin_seq", 0)), resend=True)
                    if "files_seq" in header:
                        await self._stdin_seq(int(header["files_seq"]), True, FILES)
                elif kind == NannyMsg.STDIN_SEQ:
                    stream = int(header.get("stream") or 0)
                    await self._stdin_seq(int(header["seq"]), resend=False, stream=stream)
                elif kind == NannyMsg.OUT and self.subscriber is not None:
                    await self.deliver(
                        self.subscriber,
                        "out",
                        {"proc_id": self.proc_id, "seq": header["seq"], "stream": header["stream"]},
                        payload,
                    )
                elif kind == NannyMsg.EXIT:
                    if self.exit_seq is None:
                        self.exit_seq, self.exit_code = header["seq"], header["code"]
                        self.on_exit(self.exit_code)
                    if self.subscriber is not None:
                        await self.deliver(
                            self.subscriber,
                            "exit",
                            {"proc_id": self.proc_id, "seq": header["seq"], "code": header["code"]},
                            None,
                        )
        except NannyGone:
            if self.exit_seq is None and not self.closing:
                self.on_exit(None)  # nanny vanished without an exit; the gateway decides
        except Exception:  # a broken relay must not take the gateway down
            log.exception("relay for %s failed", self.proc_id)
            if self.exit_seq is None and not self.closing:
                self.on_exit(None)
        finally:
            self.closed.set()
            self.on_closed()

    async def close(self) -> None:
        """Let go of the nanny; its process is not ended, nor taken for ended (a stopping
        gateway closes every relay, and the next one adopts the process)."""
        self.closing = True
        if self.link is not None:
            link, self.link = self.link, None
            await link.close()
        self.closed.set()
