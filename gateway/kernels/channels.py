"""One kernel's channels, as the gateway holds them (see gateway/kernels/__init__.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from remoting.protocol import KERNEL_REQUEST_CHANNELS, jupyter_endpoint

log = logging.getLogger("bitfusion.gateway")

CHANNELS = (*KERNEL_REQUEST_CHANNELS, "iopub")
IOPUB_GRACE_S = 3.0
# Each browser tab or reconnect is a new frontend identity with three sockets of its own;
# past this many, the one silent longest loses them (they reopen if it speaks again).
MAX_FRONTENDS = 32
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

_Dealer = tuple[zmq.asyncio.Socket, "asyncio.Task[None]"]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_connection_file(
    directory: Path, kernel_id: str, key: str, scheme: str, kind: str
) -> tuple[Path, dict[str, Any]]:
    """A connection file for the remote kernel, with the client's key: for ``kind`` "ipc"
    unix sockets in the abstract namespace (a name nobody can guess), else loopback ports,
    with "curve" a key pair of the kernel's own. Also returns what the gateway's sockets
    need (`channel_info`), which the gateway keeps: a kernel may rewrite its own file."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if kind == "ipc":  # "@": Linux's abstract namespace, no file to leave behind
        ip, transport, ports = (
            f"@bitfusion-{kernel_id}-{secrets.token_hex(8)}",
            "ipc",
            [1, 2, 3, 4, 5],
        )
    else:
        ip, transport, ports = "127.0.0.1", "tcp", _free_ports(5)
    info: dict[str, Any] = {
        "ip": ip,
        "transport": transport,
        "shell_port": ports[0],
        "iopub_port": ports[1],
        "stdin_port": ports[2],
        "control_port": ports[3],
        "hb_port": ports[4],
        "key": key,
        "signature_scheme": scheme,
        "kernel_name": "",
    }
    if kind == "curve":
        public, secret = zmq.curve_keypair()
        info.update(curve_publickey=public.decode(), curve_secretkey=secret.decode())
    path = directory / f"kernel-{kernel_id}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path, channel_info(info)


def channel_info(info: dict[str, Any]) -> dict[str, Any]:
    """What KernelChannels needs of a connection file: address, ports, CurveZMQ keys."""
    wanted = (
        "ip",
        "transport",
        "curve_publickey",
        "curve_secretkey",
        *(f"{ch}_port" for ch in CHANNELS),
    )
    return {k: info[k] for k in wanted if k in info}


# Called with (channel, frontend ident or b"", frames) for each message from the kernel.
# The frames are zmq.Frames (forwarded without a copy) or bytes.
OnKernelMessage = Callable[[str, bytes, list[Any]], Awaitable[None]]


class KernelChannels:
    """The gateway's sockets to one kernel, and a task per socket that reads it."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        info: dict[str, Any],
        on_message: OnKernelMessage,
        name: str = "a kernel",
    ):
        self.ctx = ctx
        self.url = {ch: jupyter_endpoint(info, ch) for ch in CHANNELS}
        # As Jupyter's own clients do: the kernel's key pair serves both ends, since client
        # keys authenticate nothing; knowing the kernel's public key is what lets one in.
        self._curve = (
            (info["curve_publickey"].encode(), info["curve_secretkey"].encode())
            if "curve_publickey" in info and "curve_secretkey" in info
            else None
        )
        self.on_message = on_message
        # Until our iopub subscription is live, the kernel's outputs would be lost, so messages
        # for the kernel wait here. The kernel's XPUB greets each new subscriber; a kernel
        # that does not is trusted after IOPUB_GRACE_S.
        self._iopub_live = False
        self._held: list[tuple[str, bytes, list[bytes]]] = []
        self._grace = asyncio.get_running_loop().call_later(IOPUB_GRACE_S, self._go_live)
        # frontend ident -> channel -> (its DEALER, the task reading it); least recent first
        self._frontends: OrderedDict[bytes, dict[str, _Dealer]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.iopub = self._socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        if self._curve is not None:  # watched from before the first try
            self._track(self._handshake(self.iopub.get_monitor_socket(_HANDSHAKE_EVENTS), name))
        self.iopub.connect(self.url["iopub"])
        self._watch("iopub", b"", self.iopub)

    async def _handshake(self, monitor: zmq.asyncio.Socket, name: str) -> None:
        """Say so when the kernel does not speak CurveZMQ: otherwise it would only look hung."""
        try:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.warning(
                    "%s does not take CurveZMQ keys from its connection file, so the gateway "
                    "cannot reach it; give its environment ipykernel 7.3 or later, or drop "
                    '"supported_encryption" from its entry in --kernels.',
                    name,
                )
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            if not self.iopub.closed:
                self.iopub.disable_monitor()
            monitor.close(0)

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            public, secret = self._curve
            sock.curve_serverkey = sock.curve_publickey = public
            sock.curve_secretkey = secret
        return sock

    def _watch(self, channel: str, ident: bytes, sock: zmq.asyncio.Socket) -> asyncio.Task[None]:
        return self._track(self._read(channel, ident, sock))

    def _track(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _read(self, channel: str, ident: bytes, sock: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = await sock.recv_multipart(copy=False)  # forwarded, never copied
                if channel == "iopub" and not self._iopub_live:
                    self._go_live()
                await self.on_message(channel, ident, frames)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        except Exception:  # a bad frame must not end the kernel's other channels
            log.exception("kernel channel %s failed", channel)

    def _dealer(self, channel: str, ident: bytes) -> zmq.asyncio.Socket:
        if ident not in self._frontends:
            while len(self._frontends) >= MAX_FRONTENDS:
                self._forget(next(iter(self._frontends)))
            # The first word from a frontend opens its shell, control and stdin together: the
            # kernel may send an input request on stdin before the frontend ever wrote there.
            dealers = {}
            for ch in KERNEL_REQUEST_CHANNELS:
                sock = self._socket(zmq.DEALER)
                if ident:
                    sock.setsockopt(zmq.ROUTING_ID, ident)
                sock.connect(self.url[ch])
                dealers[ch] = (sock, self._watch(ch, ident, sock))
            self._frontends[ident] = dealers
        self._frontends.move_to_end(ident)
        return self._frontends[ident][channel][0]

    def _forget(self, ident: bytes) -> None:
        """Close one frontend's sockets (the least recently heard from)."""
        for sock, reader in self._frontends.pop(ident).values():
            reader.cancel()
            sock.close(0)

    @property
    def frontends(self) -> int:
        """How many frontend identities have sockets open to this kernel."""
        return len(self._frontends)

    def _go_live(self) -> None:
        if self._iopub_live:
            return
        self._grace.cancel()
        # Sent in order before anything newer can be: a DEALER queues without blocking.
        for channel, ident, frames in self._held:
            self._dealer(channel, ident).send_multipart(frames)
        self._held.clear()
        self._iopub_live = True

    async def send(self, channel: str, ident: bytes, frames: list[bytes]) -> None:
        if channel == "iopub":
            return  # nothing goes to a kernel on iopub
        if not self._iopub_live:
            self._held.append((channel, ident, frames))
            return
        await self._dealer(channel, ident).send_multipart(frames)

    def close(self) -> None:
        self._grace.cancel()
        for task in list(self._tasks):
            task.cancel()
        dealers = [sock for frontend in self._frontends.values() for sock, _ in frontend.values()]
        for sock in (self.iopub, *dealers):
            sock.close(0)
        self._frontends.clear()
