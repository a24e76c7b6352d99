"""Replayed messages: a recorded session replayed on a new connection (CurveZMQ refuses it
before any request is read), and requests repeated on one connection (refused by id)."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest

from remoting import protocol, tokens
from remoting.client import GatewayConnection
from tests.support.gateways import long_lease_gateway
from tests.support.waiting import WAIT_S, wait_for_log
from tests.support.wire import RawClient, connect, grants, still_serves


@pytest.fixture
def gateway(gateway_factory):
    return long_lease_gateway(gateway_factory)


class RecordingProxy:
    """A loopback TCP forwarder to the gateway that keeps every byte the client sent."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent: list[bytes] = []  # client -> gateway, in order
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.upstream_port))
        for src, dst, record in ((client, server, True), (server, client, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.sent.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for t in self._threads:
            t.join(5)


def test_a_recorded_session_replayed_on_a_new_connection_is_refused(gateway):
    proxy = RecordingProxy(gateway.port)
    tok = tokens.parse(gateway.token("alice"))
    conn = GatewayConnection(f"127.0.0.1:{proxy.port}", tok, WAIT_S)
    try:
        share = conn.request("allocate", gpus=1, mib=1024)["share"]["share_id"]
    finally:
        conn.close()
    proxy.close()
    recording = b"".join(proxy.sent)
    assert len(recording) > 200  # greeting, HELLO, INITIATE and the allocate
    before = grants(gateway)
    assert before == 1
    # The same bytes on a new connection: the gateway answers HELLO with a fresh cookie, the
    # replayed INITIATE carries the old one, and the connection ends there.
    with socket.create_connection(("127.0.0.1", gateway.port)) as raw:
        raw.settimeout(WAIT_S)
        raw.sendall(recording)
        try:
            while raw.recv(65536):
                pass  # until the gateway hangs up
        except OSError:
            pass
    line = wait_for_log(gateway, "refused a connection on", "CurveZMQ handshake failed")
    assert "replayed recording" in line
    time.sleep(0.5)  # had the allocate been read, it would have been granted by now
    assert grants(gateway) == before  # the replayed allocate granted nothing
    assert [s["share_id"] for s in gateway.shares()] == [share]  # still the one share
    assert "refused allocate" not in gateway.log()  # it never even reached the application
    still_serves(gateway)


def test_a_request_repeated_on_one_connection_is_refused(gateway):
    raw = RawClient(gateway)
    tok = gateway.token("alice")
    try:
        allocate = protocol.encode("allocate", token=tok, id=1, gpus=1, mib=1024)
        first = raw.request(allocate)
        assert first["ok"]
        share = first["data"]["share"]["share_id"]
        again = raw.request(allocate)
        assert not again["ok"] and again["code"] == protocol.E_BAD_REQUEST
        assert again["error"] == (
            "Request id 1 was already used on this connection (a replayed or duplicated "
            "request); it was not carried out."
        )
        assert grants(gateway) == 1  # one share, not two
        # An id lower than the last is refused the same way; a fresh one is carried out.
        release = protocol.encode("release", token=tok, id=5, share_id=share)
        assert raw.request(release)["ok"]
        assert raw.request(release)["code"] == protocol.E_BAD_REQUEST
        stale = raw.request(protocol.encode("list_shares", token=tok, id=4))
        assert stale["code"] == protocol.E_BAD_REQUEST
        # A release of a released share, sent anew, is simply not found.
        late = raw.request(protocol.encode("release", token=tok, id=6, share_id=share))
        assert late["code"] == protocol.E_NOT_FOUND
        assert late["error"].startswith(f"No share {share} of yours is held on gpuhost")
    finally:
        raw.close()
    line = wait_for_log(gateway, "refused allocate from user alice", "already used")
    assert "WARNING" in line
    wait_for_log(gateway, "refused release from user alice", "already used")
    # Ids count per connection: a new connection starts again from 1.
    fresh = RawClient(gateway)
    try:
        assert fresh.request(protocol.encode("list_gpus", token=tok, id=1))["ok"]
    finally:
        fresh.close()
    still_serves(gateway)


def test_repeated_stdin_reaches_the_process_once(gateway):
    """One-way messages carry no id: stdin's own sequence number keeps a repeat out."""
    alice = connect(gateway, "alice")
    try:
        share = alice.request("allocate", gpus=1, mib=1024)["share"]["share_id"]
        echo = "import sys\nfor line in sys.stdin: print('got', line.strip(), flush=True)\n"
        proc = alice.request("spawn", share_id=share, argv=[sys.executable, "-c", echo])
        proc_id = proc["proc_id"]
        for seq, data in ((1, b"one\n"), (1, b"one\n"), (2, b"two\n"), (1, b"one\n")):
            alice.send("stdin", [data], proc_id=proc_id, seq=seq)
        alice.send("stdin_close", proc_id=proc_id, seq=3)
        alice.send("stdin_close", proc_id=proc_id, seq=3)
        out = b""
        code = None
        deadline = time.monotonic() + WAIT_S
        while code is None:
            msg = alice.receive(max(0.0, deadline - time.monotonic()))
            assert msg is not None, f"the process did not end; it printed {out!r}"
            if msg.type == "out":
                out += protocol.as_bytes(msg.payloads[0])
            elif msg.type == "exit":
                code = msg["code"]
            if msg.type in ("out", "exit"):
                alice.send("ack", proc_id=proc_id, seq=msg["seq"])
        assert out.decode().splitlines() == ["got one", "got two"] and code == 0
        alice.request("release", share_id=share)
    finally:
        alice.close()
    still_serves(gateway)


def test_a_replayed_session_does_not_disturb_the_live_one(gateway):
    """While alice's session runs, its recording replayed does not take it over."""
    proxy = RecordingProxy(gateway.port)
    alice = GatewayConnection(f"127.0.0.1:{proxy.port}", tokens.parse(gateway.token("alice")))
    try:
        assert alice.request("hello")["user"] == "alice"
        recording = b"".join(proxy.sent)
        with socket.create_connection(("127.0.0.1", gateway.port)) as raw:
            raw.settimeout(WAIT_S)
            raw.sendall(recording)
            try:
                while raw.recv(65536):
                    pass
            except OSError:
                pass
        assert alice.request("list_gpus")["server"] == "gpuhost"  # alice is still served
    finally:
        alice.close()
        proxy.close()
    wait_for_log(gateway, "refused a connection on", "CurveZMQ handshake failed")
    still_serves(gateway)
