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
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from bitfusion_jupyter import config, share_request, share_sidecar
from bitfusion_jupyter.pool import Grant, Pool, say
from bitfusion_jupyter.runner import ProcessStream
from remoting import tokens
from remoting.client import DEFAULT_TIMEOUT_S, GatewayError
from remoting.protocol import Message, as_bytes

ROUTER_CHANNELS = ("shell", "control", "stdin")
# An input request whose prompt starts with this comes from the %bitfusion magic for the shim.
SHIM_REQUEST = "\x00bitfusion-request "
ADOPT_ENV = "BITFUSION_ADOPT"  # a share a local kernel took and hands to the shim it becomes
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
    """Forwards one kernel's channels until the remote kernel ends or the shim is stopped.

    It also answers the %bitfusion magic of the kernel it serves: a move to another share,
    or back to a local kernel, happens once the cell that asked has finished (its kernel went
    idle), so that cell completes normally.
    """

    def __init__(
        self,
        ports: LocalPorts,
        info: dict,
        grant: Grant,
        started: dict,
        server_list: str | None,
    ) -> None:
        self.ports = ports
        self.info = info
        self.server_list = server_list
        self.stop = False
        self.interrupts = 0
        self.pending: dict | None = None  # a move the magic asked for, done when idle
        # Like ipykernel, end with the process that started us (a Jupyter server or console
        # killed without a goodbye), or the share would be renewed for nobody, forever.
        self.parent = os.getppid()
        self._attach(grant, started)

    def _attach(self, grant: Grant, started: dict) -> None:
        self.grant = grant
        self.conn = grant.conn
        self.kernel_id = started["kernel_id"]
        self.stream = ProcessStream(grant.conn, grant.share_id, started["proc_id"], grant.lease_s)
        self.stream.close_stdin()  # a kernel reads no stdin; its input comes on its channel
        share_sidecar.write(
            self.info["__file__"], grant.conn.address, grant.share, started["kernel"], grant.lease_s
        )

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        else:
            self.stop = True

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (*self.ports.routers.values(), self.ports.hb, self.conn.sock):
            poller.register(sock, zmq.POLLIN)
        return poller

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        by_socket = {sock: ch for ch, sock in self.ports.routers.items()}
        poller = self._poller()
        while not self.stop:
            if os.getppid() != self.parent:
                say("the process that started this kernel is gone; giving the share back.")
                return 0
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
                        if self._to_frontend(msg):
                            poller = self._poller()  # the kernel moved: new connection
                            break
                        continue
                    if msg.get("proc_id") not in (None, self.stream.proc_id):
                        continue  # the kernel we moved away from, going down
                    code = self.stream.handle(msg)
                    if code is not None:
                        say(f"the remote kernel exited ({code}).")
                        return code
            self.stream.tick()
        return 0

    def _to_frontend(self, msg: Message) -> bool:
        """Deliver one kernel message; True when it completed a move to another kernel."""
        if msg["kernel_id"] != self.kernel_id:
            return False  # the kernel we moved away from, going down
        frames = list(msg.payloads)
        channel = msg["channel"]
        if channel == "stdin" and self._is_shim_request(msg):
            return False
        if channel == "iopub":
            self.ports.iopub.send_multipart(frames)
        elif channel in self.ports.routers and msg.get("ident"):
            try:
                self.ports.routers[channel].send_multipart([bytes.fromhex(msg["ident"]), *frames])
            except zmq.ZMQError:
                pass  # that frontend is gone
        if self.pending is not None and _ends_cell(self.pending, channel, frames):
            return self._complete_move()
        return False

    # --- the %bitfusion magic's requests -------------------------------------------------
    def _is_shim_request(self, msg: Message) -> bool:
        parts = _jupyter_parts(list(msg.payloads))
        if parts is None or parts["header"].get("msg_type") != "input_request":
            return False
        prompt = parts["content"].get("prompt", "")
        if not prompt.startswith(SHIM_REQUEST):
            return False
        try:
            request = json.loads(prompt[len(SHIM_REQUEST) :])
            answer = self._prepare(request)
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"bad request from the magic ({exc})."}
        if answer["ok"]:
            self.pending["parent_id"] = parts["parent"].get("msg_id")
        self._reply_input(
            msg, parts["header"], json.dumps({k: v for k, v in answer.items() if k != "grant"})
        )
        return True

    def _prepare(self, request: dict) -> dict:
        if request["action"] == "local":
            self.pending = {"action": "local"}
            return {
                "ok": True,
                "message": "This kernel moves back to a local kernel on the "
                "notebook's machine and gives its share back. It restarts: its variables "
                "are reset.",
            }
        req = share_request.ShareRequest(
            gpus=request["request"]["gpus"],
            mib=request["request"].get("mib"),
            fraction=request["request"].get("fraction"),
            filters=request["request"].get("filters") or [],
            wait_s=request.get("wait_s", 0),
        )
        pool = Pool.from_config(request.get("servers") or self.server_list, zero_copy=True)
        try:
            grant = pool.allocate(req, release_on_exit=True)
        except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
            pool.close()
            return {"ok": False, "error": str(exc)}
        self.pending = {
            "action": "move",
            "grant": grant,
            "pool": pool,
            "kernel": request.get("kernel") or "python3",
        }
        return {
            "ok": True,
            "message": f"This kernel moves to the "
            f"{describe(grant, self.pending['kernel'])}. It restarts there: its variables "
            "are reset.",
        }

    def _session(self) -> Any:
        from jupyter_client.session import Session  # only when the magic asks

        return Session(
            key=self.info.get("key", "").encode(),
            signature_scheme=self.info.get("signature_scheme", "hmac-sha256"),
        )

    def replay(self, cell: dict) -> None:
        """Send the new kernel a request the local kernel received just before it became
        this shim (re-signed with the same key, header untouched, so its reply matches)."""
        frames = self._session().serialize({**cell["msg"], "buffers": []})
        self.conn.send(
            "kernel_in", frames, kernel_id=self.kernel_id, channel="shell", ident=cell["ident"][0]
        )

    def _reply_input(self, msg: Message, request_header: dict, value: str) -> None:
        session = self._session()
        reply = session.msg("input_reply", {"value": value}, parent=request_header)
        frames = session.serialize(reply)
        self.conn.send(
            "kernel_in", frames, kernel_id=self.kernel_id, channel="stdin", ident=msg.get("ident")
        )

    def _complete_move(self) -> bool:
        pending, self.pending = self.pending, None
        assert pending is not None
        old = self.grant
        if pending["action"] == "local":
            # Close the ports first: the frontend's next cell then waits in its own socket for
            # the local kernel, rather than reaching ours and going down with the exec.
            self.ports.close()
            old.release(timeout=3.0)
            become_local_kernel(self.ports, str(self.info["__file__"]))
            return False  # not reached: exec
        grant: Grant = pending["grant"]
        try:
            started = start_kernel(grant, self.info, pending["kernel"])
        except GatewayError as exc:
            say(f"could not start the kernel on the new share ({exc}); staying where it was.")
            grant.release(timeout=3.0)
            pending["pool"].close()
            return False
        old.release(timeout=3.0)  # ends the old kernel
        self._attach(grant, started)
        say(describe(grant, started["kernel"]))
        return True


def _jupyter_parts(frames: list[Any]) -> dict | None:
    """Header, parent header and content of a Jupyter message's frames (None if not one)."""
    try:
        frames = [as_bytes(f) for f in frames[:8]]  # routing ids, delimiter, sig, 4 parts
        i = frames.index(b"<IDS|MSG>")
        return {
            "header": json.loads(frames[i + 2]),
            "parent": json.loads(frames[i + 3]),
            "content": json.loads(frames[i + 5]),
        }
    except (ValueError, IndexError):
        return None


def _ends_cell(pending: dict, channel: str, frames: list[Any]) -> bool:
    """True once the cell that asked for a move has both its reply (shell) and its idle
    status (iopub) delivered. They reach us through different kernel sockets, in either
    order; moving on the first would lose the other, and leave the cell hanging."""
    parts = _jupyter_parts(frames)
    if parts is None or parts["parent"].get("msg_id") != pending.get("parent_id"):
        return False
    kind = parts["header"].get("msg_type")
    if channel == "shell" and kind == "execute_reply":
        pending["replied"] = True
    elif kind == "status" and parts["content"].get("execution_state") == "idle":
        pending["idle"] = True
    return bool(pending.get("replied") and pending.get("idle"))


def start_kernel(grant: Grant, info: dict, kernel: str) -> dict:
    return grant.conn.request(
        "kernel_start",
        share_id=grant.share_id,
        key=info.get("key", ""),
        signature_scheme=info.get("signature_scheme", "hmac-sha256"),
        kernel=kernel,
        timeout=KERNEL_START_TIMEOUT_S,
    )


def become_local_kernel(ports: LocalPorts, connection_file: str) -> None:
    """Turn this process into a plain local ipykernel on the same ports (same pid)."""
    ports.close()  # the rest (the gateway link) closes with the exec
    share_sidecar.remove(connection_file)
    env = {k: v for k, v in os.environ.items() if k != ADOPT_ENV}
    os.execve(
        sys.executable,
        [
            sys.executable,
            "-m",
            "bitfusion_jupyter.local_kernel",
            "-f",
            connection_file,
            "--IPKernelApp.extensions=bitfusion_jupyter",
        ],
        env,
    )


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
    except (KeyError, TypeError) as exc:
        print(
            f"bitfusion: the connection file {args.connection_file} lacks {exc}; start the "
            "kernel from a Jupyter client, which writes a complete one.",
            file=sys.stderr,
        )
        return 2
    except zmq.ZMQError as exc:
        print(f"bitfusion: cannot bind the kernel's ports ({exc}).", file=sys.stderr)
        return 1
    info["__file__"] = str(args.connection_file)
    pool: Pool | None = None
    grant: Grant | None = None
    shim: Shim | None = None
    try:
        pool = Pool.from_config(args.server_list, args.timeout, zero_copy=True)
        adopt = os.environ.pop(ADOPT_ENV, None)
        if adopt:
            # A local kernel whose %bitfusion magic took this share, then became this shim.
            held = json.loads(adopt)
            grant = Grant(
                pool.connect(held["server"]), held["share"], held["lease_s"], held.get("env", {})
            )
        else:
            grant = pool.allocate(req, release_on_exit=True, on_queue=say)
        started = start_kernel(grant, info, args.kernel)
        say(describe(grant, started["kernel"]))
        shim = Shim(ports, info, grant, started, args.server_list)
        if adopt and held.get("replay"):
            shim.replay(held["replay"])
        try:
            return shim.run()
        finally:
            grant = shim.grant  # the share it holds now, after any moves
    except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
        print(f"bitfusion: {exc}", file=sys.stderr)
        return 1
    finally:
        if grant is not None and not (shim and shim.stream.lease_gone):
            grant.release(timeout=3.0)
        if pool is not None:
            pool.close()
        ports.close()
        share_sidecar.remove(args.connection_file)


if __name__ == "__main__":
    sys.exit(main())
