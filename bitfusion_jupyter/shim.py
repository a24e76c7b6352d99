"""The kernel shim: what a bitfusion kernelspec starts in place of a kernel.

To the Jupyter client it is a kernel: it binds the five ports of the connection file it is
given. Behind them it holds a share from the pool, has the gateway start the real kernel
inside it, and forwards every Jupyter message both ways through its one encrypted gateway
connection, frames untouched (the remote kernel signs with the same key). A SIGINT to the
shim (the kernelspec's interrupt mode) interrupts the remote kernel; when the remote kernel
ends, the shim ends with it, and the share is given back either way.

    python -m bitfusion_jupyter.shim --connection-file FILE [-n N] [-m MIB | -p F] ...
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType

import zmq

from bitfusion_jupyter import config, share_request
from bitfusion_jupyter.pool import Grant, Pool, say
from bitfusion_jupyter.runner import ProcessStream
from remoting import tokens
from remoting.client import DEFAULT_TIMEOUT_S, GatewayError

ROUTER_CHANNELS = ("shell", "control", "stdin")
KERNEL_START_TIMEOUT_S = 60.0


class LocalPorts:
    """The sockets a Jupyter client connects to, bound where the connection file says."""

    def __init__(self, ctx: zmq.Context, info: dict) -> None:
        transport, ip = info.get("transport", "tcp"), info["ip"]

        def url(channel: str) -> str:
            port = info[f"{channel}_port"]
            return f"{transport}://{ip}:{port}" if transport == "tcp" else f"ipc://{ip}-{port}"

        self.routers: dict[str, zmq.Socket] = {}
        for channel in ROUTER_CHANNELS:
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(url(channel))
            self.routers[channel] = sock
        self.iopub = ctx.socket(zmq.PUB)
        self.iopub.setsockopt(zmq.LINGER, 0)
        self.iopub.bind(url("iopub"))
        self.hb = ctx.socket(zmq.REP)
        self.hb.setsockopt(zmq.LINGER, 0)
        self.hb.bind(url("hb"))

    def close(self) -> None:
        for sock in (*self.routers.values(), self.iopub, self.hb):
            sock.close(0)


class Shim:
    """Forwards one kernel's channels until the remote kernel ends or the shim is stopped."""

    def __init__(self, ports: LocalPorts, grant: Grant, kernel_id: str, proc_id: str) -> None:
        self.ports = ports
        self.conn = grant.conn
        self.kernel_id = kernel_id
        self.stream = ProcessStream(grant.conn, grant.share_id, proc_id, grant.lease_s)
        self.stop = False
        self.interrupts = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        else:
            self.stop = True

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.stream.close_stdin()  # a kernel reads no stdin; its input comes on its channel
        poller = zmq.Poller()
        by_socket = {sock: ch for ch, sock in self.ports.routers.items()}
        for sock in (*by_socket, self.ports.hb, self.conn.sock):
            poller.register(sock, zmq.POLLIN)
        while not self.stop:
            self.conn.flush()
            while self.interrupts:
                self.interrupts -= 1
                self.conn.send("signal", proc_id=self.stream.proc_id, signum=int(signal.SIGINT))
            try:
                ready = dict(poller.poll(50))
            except zmq.ZMQError:  # EINTR from a signal
                continue
            for sock, channel in by_socket.items():
                while ready.get(sock) and sock.poll(0):
                    ident, *frames = sock.recv_multipart()
                    self.conn.send(
                        "kernel_in",
                        frames,
                        kernel_id=self.kernel_id,
                        channel=channel,
                        ident=ident.hex(),
                    )
            if ready.get(self.ports.hb):
                # The heartbeat says the shim (and so its link) is alive; a dead remote
                # kernel ends the shim, which the Jupyter client sees as a dead kernel.
                self.ports.hb.send(self.ports.hb.recv())
            if ready.get(self.conn.sock) or self.conn.has_pending():
                while (msg := self.conn.receive(0)) is not None:
                    if msg.type == "kernel_out":
                        self._to_frontend(msg)
                        continue
                    code = self.stream.handle(msg)
                    if code is not None:
                        say(f"the remote kernel exited ({code}).")
                        return code
            self.stream.tick()
        return 0

    def _to_frontend(self, msg) -> None:
        frames = list(msg.payloads)
        channel = msg["channel"]
        if channel == "iopub":
            self.ports.iopub.send_multipart(frames)
        elif channel in self.ports.routers and msg.get("ident"):
            try:
                self.ports.routers[channel].send_multipart([bytes.fromhex(msg["ident"]), *frames])
            except zmq.ZMQError:
                pass  # that frontend is gone


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bitfusion_jupyter.shim", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--connection-file", "-f", required=True, type=Path)
    share_request.add_arguments(parser)
    parser.add_argument("-l", "--server_list", dest="server_list", default=None)
    parser.add_argument("--kernel", default="python3", help="the gateway's kernel environment")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    return parser.parse_args(argv)


def describe(grant: Grant, kernel: str) -> str:
    gpus = ", ".join(
        f"GPU {g['index']} {g['name']} ({g['mib']} MiB{', SIMULATED' if g['simulated'] else ''})"
        for g in grant.share["gpus"]
    )
    return f"{kernel} kernel in share {grant.share_id} on {grant.conn.address}: {gpus}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        req = share_request.from_args(args)
        info = json.loads(args.connection_file.read_text())
    except (share_request.UsageError, OSError, ValueError) as exc:
        print(f"bitfusion: {exc}", file=sys.stderr)
        return 2
    ctx = zmq.Context.instance()
    try:
        ports = LocalPorts(ctx, info)
    except zmq.ZMQError as exc:
        print(f"bitfusion: cannot bind the kernel's ports ({exc}).", file=sys.stderr)
        return 1
    pool: Pool | None = None
    grant: Grant | None = None
    try:
        pool = Pool.from_config(args.server_list, args.timeout)
        grant = pool.allocate(req, release_on_exit=True, on_queue=say)
        started = grant.conn.request(
            "kernel_start",
            share_id=grant.share_id,
            key=info.get("key", ""),
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
            kernel=args.kernel,
            timeout=KERNEL_START_TIMEOUT_S,
        )
        say(describe(grant, started["kernel"]))
        return Shim(ports, grant, started["kernel_id"], started["proc_id"]).run()
    except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
        print(f"bitfusion: {exc}", file=sys.stderr)
        return 1
    finally:
        if grant is not None:
            try:
                grant.conn.request("release", share_id=grant.share_id, timeout=3.0)
            except GatewayError:
                pass  # the lease runs out on its own
        if pool is not None:
            pool.close()
        ports.close()


if __name__ == "__main__":
    sys.exit(main())
