"""The gateway's sockets to one kernel stay bounded however many frontends come and go.

A stand-in kernel made of real ZMQ sockets on loopback echoes every shell request back to
the frontend identity that sent it, as a kernel's ROUTER routes its replies.
"""

from __future__ import annotations

import asyncio
import json

import zmq
import zmq.asyncio

from gateway import kernels


async def _echo_kernel(ctx: zmq.asyncio.Context, info: dict, stop: asyncio.Event) -> None:
    shell = ctx.socket(zmq.ROUTER)
    shell.bind(f"tcp://127.0.0.1:{info['shell_port']}")
    iopub = ctx.socket(zmq.XPUB)
    iopub.bind(f"tcp://127.0.0.1:{info['iopub_port']}")
    others = []
    for channel in ("control", "stdin"):
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(f"tcp://127.0.0.1:{info[f'{channel}_port']}")
        others.append(sock)
    poller = zmq.asyncio.Poller()
    poller.register(shell, zmq.POLLIN)
    poller.register(iopub, zmq.POLLIN)
    try:
        while not stop.is_set():
            for sock, _ in await poller.poll(50):
                frames = await sock.recv_multipart()
                if sock is iopub:  # a subscription: greet it, as ipykernel 7 does
                    await iopub.send_multipart([b"welcome"])
                else:
                    await shell.send_multipart(frames)  # back to the sender's identity
    finally:
        for sock in (shell, iopub, *others):
            sock.close(0)


def test_a_kernel_keeps_sockets_for_its_most_recent_frontends_only(tmp_path):
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        path, info = kernels.write_connection_file(
            tmp_path, "k-test", "key", "hmac-sha256", "plain"
        )
        stop = asyncio.Event()
        kernel = asyncio.create_task(_echo_kernel(ctx, json.loads(path.read_text()), stop))
        echoed: list[bytes] = []

        async def on_message(channel: str, ident: bytes, frames: list) -> None:
            if channel == "shell":
                echoed.append(ident)

        channels = kernels.KernelChannels(ctx, info, on_message)

        async def ask(ident: bytes) -> None:
            before = echoed.count(ident)
            await channels.send("shell", ident, [b"hello"])
            for _ in range(200):
                if echoed.count(ident) > before:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no reply reached frontend {ident!r}")

        try:
            # 80 browser tabs, reconnects and gone frontends, one after another.
            idents = [f"frontend-{i}".encode() for i in range(80)]
            for ident in idents:
                await ask(ident)
            assert channels.frontends == kernels.MAX_FRONTENDS
            open_dealers = [d for f in channels._frontends.values() for d in f.values()]
            assert len(open_dealers) == 3 * kernels.MAX_FRONTENDS
            assert not any(sock.closed for sock, _ in open_dealers)
            # The most recent ones still get their replies; a forgotten one that speaks
            # again gets its sockets back, and its reply.
            await ask(idents[-1])
            await ask(idents[0])
            assert channels.frontends == kernels.MAX_FRONTENDS
        finally:
            channels.close()
            stop.set()
            await kernel
            ctx.term()

    asyncio.run(scenario())


def _handshake_log(tmp_path, caplog, kernel_curve: bool) -> list[str]:
    """The gateway's warnings about a kernel whose connection file holds CurveZMQ keys, when
    the kernel does (``kernel_curve``) or does not take them; and whether it answered."""

    async def scenario() -> bool:
        ctx = zmq.asyncio.Context()
        path, info = kernels.write_connection_file(
            tmp_path, "k-test", "key", "hmac-sha256", "curve"
        )
        stop = asyncio.Event()
        if kernel_curve:
            ctx.setsockopt(zmq.CURVE_SERVER, 1)
            ctx.setsockopt(zmq.CURVE_SECRETKEY, info["curve_secretkey"].encode())
            ctx.setsockopt(zmq.CURVE_PUBLICKEY, info["curve_publickey"].encode())
        kernel = asyncio.create_task(_echo_kernel(ctx, json.loads(path.read_text()), stop))
        answered = asyncio.Event()

        async def on_message(channel: str, ident: bytes, frames: list) -> None:
            answered.set()

        gateway_ctx = zmq.asyncio.Context()
        channels = kernels.KernelChannels(gateway_ctx, info, on_message, "the old kernel k-test")
        try:
            await channels.send("shell", b"frontend", [b"hello"])
            # Up to 5 s for an answer or the gateway's warning; after a warning, a moment
            # more, so a late answer would still be seen.
            deadline = asyncio.get_running_loop().time() + 5
            while not answered.is_set() and asyncio.get_running_loop().time() < deadline:
                if caplog.records:
                    await asyncio.sleep(0.5)
                    break
                await asyncio.sleep(0.05)
            return answered.is_set()
        finally:
            channels.close()
            stop.set()
            await kernel
            ctx.term()
            gateway_ctx.term()

    with caplog.at_level("WARNING", logger="bitfusion.gateway"):
        answered = asyncio.run(scenario())
    return [answered, *(r.getMessage() for r in caplog.records)]


def test_a_kernel_that_ignores_its_curve_keys_is_named_in_the_log(tmp_path, caplog):
    answered, *warnings = _handshake_log(tmp_path, caplog, kernel_curve=False)
    assert not answered
    assert warnings == [
        "the old kernel k-test does not take CurveZMQ keys from its connection file, so the "
        "gateway cannot reach it; give its environment ipykernel 7.3 or later, or drop "
        '"supported_encryption" from its entry in --kernels.'
    ]


def test_a_kernel_that_takes_its_curve_keys_is_reached_quietly(tmp_path, caplog):
    assert _handshake_log(tmp_path, caplog, kernel_curve=True) == [True]
