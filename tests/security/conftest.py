"""Helpers of the security tests: raw CurveZMQ sockets, the gateway's log, a well-behaved client.

Every test here runs against a real gateway process (the ``gateway`` fixture of
tests/conftest.py) over real sockets on loopback, and checks three things a user or an admin
would notice: what the refused client is told, the line the gateway logs, and that the
gateway still serves a well-behaved client afterwards.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from gateway.spawned import stop_leftovers
from remoting import protocol, tokens
from remoting.client import GatewayConnection
from remoting.protocol import Message

WAIT_S = 20.0  # generous: two other engineers' tests share these 2 cores


def long_lease_gateway(tmp_path: Path, *args: str) -> Iterator[Any]:
    """A gateway whose leases outlast a test, for clients that renew nothing by themselves
    (the ``gateway`` fixture's 2 s grace could end a share under a loaded machine)."""
    from tests.conftest import start_gateway

    gw = start_gateway(tmp_path, "--simulate-gpus", "2x16GiB", "--lease-grace", "120", *args)
    yield gw
    gw.kill(signal.SIGTERM)
    stop_leftovers(gw.state_dir)


def no_traceback(r: Any) -> str:
    """The last line a refused CLI run printed, after checking it failed cleanly."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    return lines[-1]


def wait_for_log(gateway: Any, *words: str, timeout: float = WAIT_S) -> str:
    """The first line of the gateway's log that holds every one of ``words``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in gateway.log().splitlines():
            if all(w in line for w in words):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {words} in:\n{gateway.log()[-4000:]}")
        time.sleep(0.1)


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
