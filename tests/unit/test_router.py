"""The gateway's client socket driven from asyncio without pyzmq's futures
(gateway.service.router): every message arrives, also one whose wake-up a send took, and an
idle socket does not keep the event loop spinning."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from gateway.service.router import Router


async def _pair() -> tuple[zmq.asyncio.Context, Router, zmq.Socket, zmq.Context]:
    ctx = zmq.asyncio.Context()
    server = ctx.socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    router = Router(server)
    router.start()
    client_ctx = zmq.Context()
    client = client_ctx.socket(zmq.DEALER)
    client.connect(f"tcp://127.0.0.1:{port}")
    return ctx, router, client, client_ctx


def test_every_message_arrives_while_replies_are_sent_beside_the_receiver() -> None:
    """Replies sent from another task between receives (as the relays deliver output), with
    requests in bursts and lulls: every request arrives, in order, none left waiting for a
    later one. (Without clearing libzmq's edge-triggered fd, this hangs.)"""

    async def scenario() -> int:
        ctx, router, client, client_ctx = await _pair()
        got: list[int] = []
        ident_box: list[bytes] = []

        async def receive(n: int) -> None:
            while len(got) < n:
                frames = await router.recv()
                ident_box[:] = [frames[0]]
                got.append(int(frames[1]))

        async def chatter() -> None:  # sends beside the receiver, as relays do
            while True:
                if ident_box:
                    router.send([ident_box[0], b"out"])
                await asyncio.sleep(0)

        n = 3000
        receiving = asyncio.create_task(receive(n))
        talking = asyncio.create_task(chatter())
        for i in range(n):
            while True:  # never block the loop the router runs on
                try:
                    client.send(str(i).encode(), zmq.NOBLOCK)
                    break
                except zmq.Again:
                    await asyncio.sleep(0.001)
            if i % 100 == 0:
                await asyncio.sleep(0.001)  # bursts and lulls: both ways of arriving
            while client.poll(0):
                client.recv()
        await asyncio.wait_for(receiving, 20)
        talking.cancel()
        router.stop()
        client.close(0)
        client_ctx.term()
        ctx.destroy(0)
        assert got == list(range(n))
        return len(got)

    assert asyncio.run(scenario()) == 3000


def test_an_idle_socket_leaves_the_loop_asleep() -> None:
    """asyncio calls a reader while its fd is readable: unless the router clears libzmq's fd,
    an idle gateway would spin a core."""

    async def scenario() -> float:
        ctx, router, client, client_ctx = await _pair()
        client.send(b"hello")
        assert (await asyncio.wait_for(router.recv(), 5))[1] == b"hello"
        cpu = time.process_time()
        await asyncio.sleep(1.0)  # nothing comes; the receiver is not even waiting
        used = time.process_time() - cpu
        router.stop()
        client.close(0)
        client_ctx.term()
        ctx.destroy(0)
        return used

    assert asyncio.run(scenario()) < 0.3, "the event loop kept turning while idle"
