"""Clients of a test gateway over real sockets on loopback: a raw CurveZMQ socket that sends
frames as given (replays, forgeries, fuzz), and a well-behaved client to check that the
gateway still serves after a refusal."""

from __future__ import annotations

import time
from typing import Any

import zmq

from remoting import protocol, tokens
from remoting.client import GatewayConnection
from remoting.protocol import Message
from tests.support.waiting import WAIT_S


def connect(gateway: Any, user: str, admin: bool = False) -> GatewayConnection:
    return GatewayConnection(gateway.address, tokens.parse(gateway.token(user, admin)), WAIT_S)


def still_serves(gateway: Any, user: str = "carol") -> None:
    """A well-behaved client gets the pool from the gateway (which is still running)."""
    assert gateway.proc.poll() is None, f"the gateway died:\n{gateway.log()[-4000:]}"
    conn = connect(gateway, user)
    try:
        assert len(conn.request("list_gpus")["gpus"]) == 2
    finally:
        conn.close()


def grants(gateway: Any) -> int:
    """How many shares the gateway has granted since it started (its admin counter)."""
    conn = connect(gateway, "root", admin=True)
    try:
        return conn.request("list_gpus")["counters"]["grants"]
    finally:
        conn.close()


class RawClient:
    """A CurveZMQ DEALER that sends frames as given: replays, forgeries, fuzz."""

    def __init__(self, gateway: Any, server_key: bytes | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        key = server_key or tokens.parse(gateway.token("carol")).server_public_z85
        self.sock.curve_serverkey = key
        self.sock.curve_publickey, self.sock.curve_secretkey = zmq.curve_keypair()
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{gateway.address}")

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def request(self, frames: list[bytes], timeout: float = WAIT_S) -> Message:
        """Send one request and return the reply to it."""
        msg_id = protocol.decode(frames)["id"]
        self.send(frames)
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            msg = protocol.decode(self.sock.recv_multipart())
            if msg.type == "reply" and msg["id"] == msg_id:
                return msg
        raise AssertionError(f"no reply to request {msg_id} within {timeout:g} s")

    def received(self, within: float) -> list[Message]:
        """Everything that arrives within ``within`` seconds."""
        out: list[Message] = []
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                out.append(protocol.decode(self.sock.recv_multipart()))
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
