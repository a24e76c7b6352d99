"""The gateway's relay to one nanny, against a real unix socket playing the nanny."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from gateway.nanny.relay import Relay
from gateway.nanny.wire import NannyMsg, encode_frame


def test_a_gateway_stopping_mid_delivery_does_not_take_the_process_for_ended():
    # `systemctl restart` closes every relay while output flows: a delivery under way when
    # its relay closes must not end in "exited with None", which marks a process that goes
    # on under its nanny as ended, so the next gateway would not adopt it.
    async def scenario() -> tuple[list, int]:
        ended: list[int | None] = []
        delivered = 0
        in_delivery, go_on = asyncio.Event(), asyncio.Event()

        async def deliver(ident: bytes, kind: str, fields: dict, payload: bytes | None) -> None:
            nonlocal delivered
            delivered += 1
            in_delivery.set()
            await go_on.wait()

        async def nanny(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for seq in range(1, 50):  # a command printing away
                writer.write(encode_frame({"type": NannyMsg.OUT, "seq": seq, "stream": 1}, b"x"))
            await writer.drain()
            await reader.read()  # until the gateway lets go
            writer.close()

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "nanny.sock"
            server = await asyncio.start_unix_server(nanny, path=str(path))
            relay = Relay(
                "p-1", path, deliver, on_pid=lambda pid: None, on_exit=ended.append,
                on_closed=lambda: None,
            )  # fmt: skip
            relay.subscriber = b"client"
            await relay.start()
            await asyncio.wait_for(in_delivery.wait(), 5)
            closing = asyncio.create_task(relay.close())
            await asyncio.sleep(0.05)
            go_on.set()
            await closing
            await asyncio.wait_for(relay.closed.wait(), 5)
            assert relay._task is not None
            await asyncio.wait_for(relay._task, 5)
            server.close()
            await server.wait_closed()
        return ended, delivered

    ended, delivered = asyncio.run(scenario())
    assert ended == [], "the relay's close was taken for the process's end"
    assert delivered == 1, "output was still delivered after the relay closed"


def test_a_nanny_that_vanishes_is_reported_as_a_process_gone():
    async def scenario() -> list:
        ended: list[int | None] = []

        async def nanny(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(8)  # the attach's length prefix: then it dies
            writer.close()

        async def deliver(*_args: object) -> None:
            pass

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "nanny.sock"
            server = await asyncio.start_unix_server(nanny, path=str(path))
            relay = Relay("p-1", path, deliver, lambda pid: None, ended.append, lambda: None)
            await relay.start()
            await asyncio.wait_for(relay.closed.wait(), 5)
            server.close()
            await server.wait_closed()
        return ended

    assert asyncio.run(scenario()) == [None]
