"""Jupyter kernels inside shares: which kernels the gateway offers, and one kernel's channels.

The gateway starts a kernel like any process in a share (under a nanny), with a connection
file of its own on the server's loopback but the *client's* HMAC key, so Jupyter frames are
forwarded between the client's shim and the kernel without being re-signed or re-serialised.
`KernelChannels` holds the gateway's sockets to one kernel: a DEALER per frontend identity on
shell, control and stdin (with the frontend's own identity, so the kernel routes replies and
input requests exactly as it would locally), and a SUB on iopub.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio

log = logging.getLogger("bitfusion.gateway")

CHANNELS = ("shell", "control", "stdin", "iopub")
IOPUB_GRACE_S = 3.0
_DEALER_CHANNELS = ("shell", "control", "stdin")
# Each browser tab or reconnect is a new frontend identity with three sockets of its own;
# past this many, the one silent longest loses them (they reopen if it speaks again).
MAX_FRONTENDS = 32

_Dealer = tuple[zmq.asyncio.Socket, "asyncio.Task[None]"]

# name -> argv; {connection_file} is replaced. The default is this Python with ipykernel.
DEFAULT_KERNELS: dict[str, list[str]] = {
    "python3": [
        sys.executable,
        "-m",
        "ipykernel_launcher",
        "-f",
        "{connection_file}",
        "--IPKernelApp.extensions=bitfusion_jupyter",  # the %bitfusion magic, ready to use
    ],
}


class KernelConfigError(ValueError):
    """A kernels file that cannot be used; the text names the file and the problem."""


def load_kernels(path: Path | None) -> dict[str, list[str]]:
    """The kernel environments: the default, plus those of a JSON file ``{name: argv}``."""
    kernels = dict(DEFAULT_KERNELS)
    if path is None:
        return kernels
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KernelConfigError(f"--kernels {path} cannot be read as JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise KernelConfigError(f"--kernels {path} must hold a JSON object {{name: argv}}.")
    for name, argv in data.items():
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise KernelConfigError(f"--kernels {path}: {name!r} needs a list of strings (argv).")
        if not any("{connection_file}" in a for a in argv):
            raise KernelConfigError(
                f"--kernels {path}: the argv of {name!r} never mentions {{connection_file}}."
            )
        kernels[name] = argv
    return kernels


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


def write_connection_file(directory: Path, kernel_id: str, key: str, scheme: str) -> Path:
    """A connection file for the remote kernel: loopback ports, the client's key."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ports = _free_ports(5)
    info = {
        "ip": "127.0.0.1",
        "transport": "tcp",
        "shell_port": ports[0],
        "iopub_port": ports[1],
        "stdin_port": ports[2],
        "control_port": ports[3],
        "hb_port": ports[4],
        "key": key,
        "signature_scheme": scheme,
        "kernel_name": "",
    }
    path = directory / f"kernel-{kernel_id}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path


# Called with (channel, frontend ident or b"", frames) for each message from the kernel.
OnKernelMessage = Callable[[str, bytes, list[bytes]], Awaitable[None]]


class KernelChannels:
    """The gateway's sockets to one kernel, and a task per socket that reads it."""

    def __init__(
        self, ctx: zmq.asyncio.Context, connection_file: Path, on_message: OnKernelMessage
    ):
        info = json.loads(connection_file.read_text())
        self.ctx = ctx
        self.url = {ch: f"tcp://{info['ip']}:{info[f'{ch}_port']}" for ch in (*CHANNELS, "hb")}
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
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.setsockopt(zmq.LINGER, 0)
        self.iopub.connect(self.url["iopub"])
        self._watch("iopub", b"", self.iopub)

    def _watch(self, channel: str, ident: bytes, sock: zmq.asyncio.Socket) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._read(channel, ident, sock))
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
            for ch in _DEALER_CHANNELS:
                sock = self.ctx.socket(zmq.DEALER)
                if ident:
                    sock.setsockopt(zmq.ROUTING_ID, ident)
                sock.setsockopt(zmq.LINGER, 0)
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
