"""Every refusal is logged, and a flood of them cannot fill the gateway's disk."""

from __future__ import annotations

import logging
import socket
import time

from gateway.log_limit import LogLimit
from remoting import protocol
from tests.support.waiting import WAIT_S, wait_for_log
from tests.support.wire import RawClient, still_serves


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_past_the_burst_lines_are_counted_and_the_count_is_logged(caplog):
    clock = Clock()
    limit = LogLimit(logging.getLogger("test.limit"), burst=3, window_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.limit"):
        for i in range(5):
            limit.warning("malformed", "line %d", i)
        limit.info("refused:bob", "bob's own line")  # another kind has a burst of its own
        clock.now = 5
        limit.flush()  # the window is not over: nothing more yet
        assert [r.getMessage() for r in caplog.records] == [
            "line 0",
            "line 1",
            "line 2",
            "bob's own line",
        ]
        clock.now = 10.5
        limit.flush()
        limit.warning("malformed", "line %d", 5)  # a new window
    said = [r.getMessage() for r in caplog.records][4:]
    assert said == [
        "2 more malformed lines in 10 s were not logged (at most 3 a window)",
        "line 5",
    ]


def test_a_flood_of_bad_messages_is_logged_within_bounds(gateway):
    raw = RawClient(gateway)
    try:
        for i in range(300):
            raw.send([protocol.MAGIC, b"{not json %d" % i])
        raw.send(protocol.encode("list_gpus", token="hello", id=1))
        assert raw.request(protocol.encode("list_gpus", token="hello", id=2))["code"] == "auth"
    finally:
        raw.close()
    # Junk on raw TCP connections: each fails the handshake before any message.
    for _ in range(120):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT_S) as s:
            s.sendall(b"\xff" * 64 + b"GET / HTTP/1.0\r\n\r\n")
            try:
                s.recv(1024)
            except OSError:
                pass
    wait_for_log(gateway, "refused list_gpus from a message whose token is not a bitfusion")
    deadline = time.monotonic() + WAIT_S
    while (
        gateway.log().count("refused a connection on")
        + gateway.log().count("ended before its handshake")
        < 100
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    log = gateway.log()
    assert log.count("dropped a malformed message") == 100  # the burst, then a count
    assert 0 < log.count("refused a connection on") <= 100
    assert log.count("ended before its handshake") <= 100
    still_serves(gateway)
