"""The gateway's client socket (ROUTER), driven from asyncio without pyzmq's futures.

zmq.asyncio wraps every receive and send in a future, a callback and flag arithmetic on
Python enums: under a file stream (issue #19: two messages per SFTP round trip) that was a
third of the gateway's CPU. Here a message costs one non-blocking receive or send.

libzmq's FD is edge-triggered: it signals that the socket's state may have changed, and only
reading ZMQ_EVENTS (or a send or receive) re-arms it. So the receiver waits on the FD only
after EVENTS said "nothing to read"; after each send, which can take the signal of a message
that arrived meanwhile, EVENTS is read again and a waiting receiver woken; and ``poke()``,
called on the housekeeping tick, is a last resort that can only cost a wake-up.
"""

from __future__ import annotations

import asyncio
from typing import cast

import zmq
import zmq.asyncio

_POLLIN = int(zmq.POLLIN)  # a plain int: EVENTS is one, and enum arithmetic is what we avoid


class Router:
    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        # A plain socket over the same libzmq socket: the asyncio one stays for the monitor,
        # and is kept here, since the socket closes when that object goes.
        self.owner = sock
        self.sock: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        self._fd = cast(int, self.sock.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_fd)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None

    async def recv(self) -> list[bytes]:
        """The next message's frames (copied: what clients send is small)."""
        assert self._loop is not None, "Router.start() first"
        while True:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            if self._readable():  # a message came since: the FD's edge is spent on it
                continue
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def send(self, frames: list) -> None:
        """Send now or raise zmq.ZMQError (EHOSTUNREACH: the peer is gone; EAGAIN: too slow)."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        finally:
            self.poke()

    def poke(self) -> None:
        """Wake a waiting receiver if a message is there."""
        if self._waiter is not None and self._readable():
            self._wake()

    def _on_fd(self) -> None:
        # Reading EVENTS clears the FD; without it asyncio would call this on every turn.
        if self._readable():
            self._wake()

    def _readable(self) -> bool:
        return bool(cast(int, self.sock.getsockopt(zmq.EVENTS)) & _POLLIN)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
