"""The client's end of the wire: one encrypted DEALER connection to one gateway.

`request()` sends a request and waits for its reply; other messages that arrive meanwhile
(process output, queue positions, notices) are kept for `receive()`. When no reply comes in
time, the socket monitor tells why (nothing listening, a handshake that failed because the
token's server key is wrong, or no answer at all), so the user reads one clear sentence.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from remoting import protocol
from remoting.messages import ErrorCode
from remoting.protocol import Message, ProtocolError
from remoting.tokens import Token

DEFAULT_TIMEOUT_S = 5.0
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
}
HANDSHAKE_TRIES = 3  # refused this often, never accepted: a wrong key, not a passing fault


class GatewayError(Exception):
    """A gateway that refused or could not be reached; the text is one sentence."""

    def __init__(self, server: str, message: str, code: str = ErrorCode.UNREACHABLE):
        super().__init__(message)
        self.server = server
        self.code = code

    @property
    def state(self) -> str:
        """'unreachable', 'unauthorized' or 'error': how a pool view shows the server."""
        if self.code == protocol.E_AUTH:
            return "unauthorized"
        if self.code == ErrorCode.UNREACHABLE:
            # A token of another pool fails the encrypted handshake, which says so.
            return "unauthorized" if "handshake" in str(self) else "unreachable"
        return "error"

    def told(self, fmt: str = "{server}: {message}") -> str:
        """The sentence with its server in front (``fmt``), unless it names it already."""
        message = str(self)
        return (
            message if self.server in message else fmt.format(server=self.server, message=message)
        )


def server_label(address: str, name: str | None) -> str:
    """A server as the user configured it, with the gateway's own name where that differs
    (``127.0.0.1:56001 (vm)``), so that both names are seen to be one server."""
    if not name or name in (address, address.rpartition(":")[0]):
        return address
    return f"{address} ({name})"


def named(sentence: str, name: str | None, address: str) -> str:
    """A gateway's sentence, which names it by its own name, naming it as the user does."""
    label = server_label(address, name)
    if label == address or not name:
        return sentence
    return re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", label, sentence, count=1)


def split_address(address: str) -> tuple[str, int]:
    """'host[:port]' -> (host, port); raises ValueError with a clear sentence."""
    host, sep, port = address.strip().rpartition(":")
    if not sep:
        host, port = address.strip(), str(protocol.DEFAULT_PORT)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"{address!r} is not host[:port] (e.g. gpu1 or gpu1:{protocol.DEFAULT_PORT})"
        )
    return host, int(port)


class _QueuePlace:
    """Our place in a gateway's queue, if any, and when to say next that we still wait."""

    def __init__(self) -> None:
        self.ticket = ""
        self.every = 0.0
        self.next_at = float("inf")

    def joined(self, ticket: str, lease_s: float) -> None:
        if ticket and ticket != self.ticket and lease_s > 0:
            self.ticket = ticket
            self.every = protocol.renew_every(lease_s)
            self.next_at = time.monotonic() + self.every

    def due(self) -> bool:
        if not self.ticket or time.monotonic() < self.next_at:
            return False
        self.next_at = time.monotonic() + self.every
        return True

    def until_due(self) -> float:
        return max(0.0, self.next_at - time.monotonic())


class GatewayConnection:
    """A connection to one gateway, authenticated by a token, encrypted with CurveZMQ."""

    def __init__(
        self,
        address: str,
        token: Token,
        timeout: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[Any] | None = None,
        zero_copy: bool = False,
    ):
        self.address = address
        self.host, self.port = split_address(address)
        self.token = token
        self.timeout = timeout
        # Receive without copying (zmq.Frame payloads) where large payloads flow, the kernel
        # shim; for small control messages a copy is cheaper than a Frame object.
        self.zero_copy = zero_copy
        self._ids = itertools.count(1)
        self._pending: collections.deque[Message] = collections.deque()
        self._outbox: collections.deque[list[bytes]] = collections.deque()
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()
        self.sock.curve_serverkey = token.server_public_z85
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer that is not there
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED
        )
        self._seen: set[int] = set()
        self._handshake_ok = False
        self._handshakes_failed = 0
        self._up = False  # connected now, as far as the monitor has told
        try:
            socket.getaddrinfo(self.host, self.port)
        except socket.gaierror:
            self.close()
            raise GatewayError(
                address,
                f"Server name {self.host!r} does not resolve; check "
                "servers.conf, BITFUSION_SERVERS or -l.",
            ) from None
        host = f"[{self.host}]" if ":" in self.host else self.host
        if ":" in self.host:
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.connect(f"tcp://{host}:{self.port}")

    # --- diagnosis -----------------------------------------------------------------------
    def _drain_monitor(self) -> None:
        while self.monitor.poll(0):
            # First frame: 16-bit event id, 32-bit value (zmq_socket_monitor's format). Read
            # here rather than with zmq.utils.monitor, which pulls in asyncio at import.
            event = struct.unpack("=hi", self.monitor.recv_multipart()[0][:6])[0]
            self._seen.add(event)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_ok = self._up = True
            elif event in HANDSHAKE_FAILED:
                self._handshakes_failed += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self._up = False

    def _why_silent(self, waited: float) -> GatewayError:
        self._drain_monitor()
        where = f"gateway {self.address}"
        if self._handshake_ok:
            text = f"The {where} accepted the connection but did not answer within {waited:g} s."
        elif self._seen & HANDSHAKE_FAILED or zmq.EVENT_CONNECTED in self._seen:
            text = (
                f"The {where} refused the encrypted handshake: your token's server key does "
                "not match this gateway; get a token of this pool and run 'bitfusion init'."
            )
        elif zmq.EVENT_CONNECT_RETRIED in self._seen:
            text = (
                f"Could not connect to {where} (connection refused): is 'bitfusion gateway' "
                "running there, on that port?"
            )
        else:
            text = (
                f"The {where} did not answer within {waited:g} s: the host is down or "
                "unreachable, or a firewall drops the port."
            )
        return GatewayError(self.address, text, ErrorCode.UNREACHABLE)

    # --- messaging -----------------------------------------------------------------------
    def send(self, msg_type: str, payloads: Sequence[bytes] = (), **fields: Any) -> None:
        """Send a one-way message (stdin, ack, signal, attach), in order, even across a drop.

        While the connection is down (IMMEDIATE makes zmq refuse rather than queue blindly)
        messages wait in an outbox that the next send or receive flushes, so a stdin chunk is
        never silently lost to a short network drop.
        """
        self._outbox.append(protocol.encode(msg_type, payloads, token=str(self.token), **fields))
        self.flush()

    def flush(self) -> None:
        while self._outbox:
            try:
                self.sock.send_multipart(self._outbox[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._outbox.popleft()

    def request(
        self,
        msg_type: str,
        payloads: Sequence[bytes] = (),
        timeout: float | None = None,
        on_event: Callable[[Message], None] | None = None,
        cancel: threading.Event | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send a request and return its reply's data; raises GatewayError.

        ``cancel`` set while queued gives our place up; the gateway then answers either the
        refusal of a request given up or, had it just granted it, the grant, which is returned
        so that the caller can give the share back rather than leak it to its lease.
        """
        msg_id = next(self._ids)
        frames = protocol.encode(msg_type, payloads, token=str(self.token), id=msg_id, **fields)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        sent = gave_up = False
        queue = _QueuePlace()
        try:
            while True:
                if not sent:
                    try:
                        self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                        sent = True
                    except zmq.Again:  # not connected yet (IMMEDIATE): try again shortly
                        pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._why_silent(limit)
                cancelled = cancel is not None and cancel.is_set()
                if not sent:
                    if cancelled:  # never sent, so nothing can have been granted
                        raise GatewayError(self.address, "cancelled", protocol.E_GAVE_UP)
                    # Not connected yet: the monitor tells when the handshake is done, so the
                    # first request leaves the moment it can instead of on a fixed retry tick.
                    if self.monitor.poll(int(min(left, 0.05) * 1000) + 1):
                        self._drain_monitor()
                    if self._handshakes_failed >= HANDSHAKE_TRIES and not self._handshake_ok:
                        # The gateway turns our key down on every try (a token of another
                        # pool): say so now rather than after the whole timeout.
                        raise self._why_silent(limit)
                    continue
                if cancelled and not gave_up:
                    # Give the place up once it is known; until then, wait for the queued
                    # notice or the answer, but no longer than any request's timeout. A
                    # gateway cut off cannot answer: its queue drops the place by silence.
                    deadline = min(deadline, time.monotonic() + self.timeout)
                    self._drain_monitor()
                    if not self._up:
                        raise GatewayError(self.address, "cancelled, cut off", protocol.E_GAVE_UP)
                    if queue.ticket:
                        self.send("waiting", ticket=queue.ticket, give_up=True)
                        gave_up = True
                elif queue.due() and not gave_up:
                    self.send("waiting", ticket=queue.ticket)
                wait = min(left, queue.until_due(), 0.05 if cancel is not None else left)
                if not self.sock.poll(int(wait * 1000) + 1):
                    continue
                msg = self._recv()
                if msg is None:
                    continue
                if msg.type == "reply" and msg["id"] == msg_id:
                    queue.ticket = ""  # answered: nothing to give up
                    if msg["ok"]:
                        return msg.get("data") or {}
                    raise GatewayError(
                        self.address,
                        named(msg.get("error") or "refused", msg.get("server"), self.address),
                        msg.get("code") or "error",
                    )
                if msg.type == "queued" and msg["id"] == msg_id and not gave_up:
                    # Waiting in the gateway's queue: the deadline is the caller's wait, not
                    # ours; meanwhile we tell the gateway now and then that we still wait.
                    queue.joined(msg.get("ticket") or "", msg.get("lease_s") or 0.0)
                    if on_event:
                        on_event(msg)
                    continue
                if msg.type != "reply":
                    self._pending.append(msg)
        except BaseException:
            # Ctrl-C or a timeout while queued: leave the queue now rather than when the
            # gateway stops hearing from us (LINGER lets this out even as we close).
            if queue.ticket and not gave_up:
                with contextlib.suppress(zmq.ZMQError):
                    self.send("waiting", ticket=queue.ticket, give_up=True)
            raise

    def _recv(self) -> Message | None:
        frames = self.sock.recv_multipart(copy=not self.zero_copy)
        try:
            return protocol.decode(frames)
        except ProtocolError:
            return None  # a gateway of another version; ignore what we cannot read

    def has_pending(self) -> bool:
        return bool(self._pending)

    def receive(self, timeout: float) -> Message | None:
        """The next message that is not a reply, or None after ``timeout`` seconds."""
        self.flush()
        if self._pending:
            return self._pending.popleft()
        deadline = time.monotonic() + timeout
        while True:
            # Always look at the socket once, even with no time left (receive(0) polls).
            left = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(left * 1000)):
                return None
            msg = self._recv()
            if msg is not None and msg.type != "reply":
                return msg
            if time.monotonic() >= deadline and not self.sock.poll(0):
                return None

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close()
