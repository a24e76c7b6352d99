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
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from bitfusion_jupyter import (
    config,
    file_server,
    jupyter_frames,
    kernel_notices,
    move,
    share_request,
    share_sidecar,
)
from bitfusion_jupyter.kernel_backends import KernelBackend, LocalChild, RemoteKernel, start_kernel
from bitfusion_jupyter.pool import Grant, Pool, say
from remoting import tokens
from remoting.client import DEFAULT_TIMEOUT_S, GatewayError
from remoting.protocol import KERNEL_REQUEST_CHANNELS, Message, jupyter_endpoint


class LocalPorts:
    """The sockets a Jupyter client connects to, bound where the connection file says."""

    def __init__(self, ctx: zmq.Context, info: dict) -> None:
        # A frontend that provisions CurveZMQ keys (jupyter_client's transport_encryption,
        # for kernelspecs that declare it, as ours do) gets encrypted channels, as from
        # ipykernel: other users of this machine cannot listen on its loopback.
        curve = info.get("curve_publickey"), info.get("curve_secretkey")

        def bound(kind: int, channel: str) -> zmq.Socket:
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            if all(curve):
                sock.curve_publickey, sock.curve_secretkey = (str(k).encode() for k in curve)
                sock.curve_server = True
            sock.bind(jupyter_endpoint(info, channel))
            return sock

        self.routers = {channel: bound(zmq.ROUTER, channel) for channel in KERNEL_REQUEST_CHANNELS}
        self.iopub = bound(zmq.PUB, "iopub")
        self.hb = bound(zmq.REP, "hb")

    def close(self, linger: bool = False) -> None:
        """``linger``: let the last messages (a stopped kernel's reason) reach the frontend
        before the sockets go, for up to a second."""
        for sock in (*self.routers.values(), self.iopub, self.hb):
            sock.close(1000 if linger else 0)


class Shim:
    """Forwards one kernel's channels until its kernel ends or the shim is stopped.

    The kernel behind it is a RemoteKernel on a share, or after `%bitfusion --local` a
    LocalChild on this machine; the ports the frontend knows stay open across every move.
    It also answers the %bitfusion magic of the kernel it serves: a move to another share,
    or back to a local kernel, happens once the cell that asked has finished (its kernel went
    idle), so that cell completes normally.
    """

    def __init__(
        self,
        ports: LocalPorts,
        info: dict,
        backend: RemoteKernel,
        server_list: str | None,
        files: file_server.Choice | None = None,
    ) -> None:
        self.ports = ports
        self.info = info
        self.server_list = server_list
        # The folder of this machine the kernels work in, on any share they move to.
        self.files = files or file_server.Choice(None, "")
        self.backend: KernelBackend = backend
        self.stop = False
        self.stopped = False  # policing stopped the kernel: its note stays for the panel
        self.interrupts = 0
        self.pending: move.PendingMove | None = None  # a move the magic asked for
        # Cells sent to the kernel and not yet answered, in order: those queued behind the
        # cell that asks for a move (JupyterLab's Run All) are run again on the new kernel.
        self.in_flight: dict[str, tuple[bytes, list[Any]]] = {}
        self.replays: list[tuple[bytes, list[Any]]] = []  # for the new kernel, once ready
        # Like ipykernel, end with the process that started us (a Jupyter server or console
        # killed without a goodbye), or the share would be renewed for nobody, forever.
        self.parent = os.getppid()

    @property
    def grant(self) -> Grant | None:
        """The share held now (None while the kernel runs locally)."""
        return self.backend.grant if isinstance(self.backend, RemoteKernel) else None

    @property
    def lease_gone(self) -> bool:
        return isinstance(self.backend, RemoteKernel) and self.backend.lease_gone

    def close(self) -> None:
        if isinstance(self.backend, LocalChild):
            self.backend.close()
        elif isinstance(self.backend, RemoteKernel):
            self.backend.close_files()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        else:
            self.stop = True

    def _open_routers(self) -> dict[zmq.Socket, str]:
        """The frontend's sockets to read now. Its requests wait in them while a new kernel
        gets ready, and its cells while a move waits for the asking cell to end: a cell sent
        then belongs to the new kernel, and the old one would take it down with it."""
        if not self.backend.ready:
            return {}
        return {
            sock: channel
            for channel, sock in self.ports.routers.items()
            if channel != "shell" or self.pending is None
        }

    def _poller(self, routers: dict[zmq.Socket, str]) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (*routers, self.ports.hb, *self.backend.poll_sockets()):
            poller.register(sock, zmq.POLLIN)
        return poller

    def _forward(
        self, backend: KernelBackend, channel: str, ident: bytes, frames: list[Any]
    ) -> None:
        """A frontend's request to the kernel, its cells noted until they are answered."""
        if channel == "shell":
            header = jupyter_frames.header(frames)
            if header.get("msg_type") == "execute_request":
                self.in_flight[header["msg_id"]] = (ident, frames)
        backend.send(channel, ident, frames)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        state, routers, poller = None, {}, zmq.Poller()
        while not self.stop:
            if os.getppid() != self.parent:
                say("the process that started this kernel is gone; giving the share back.")
                return 0
            if state != (self.backend, self.backend.ready, self.pending is None):
                state = (self.backend, self.backend.ready, self.pending is None)
                backend, routers = self.backend, self._open_routers()
                poller = self._poller(routers)
            backend.probe()
            if backend.ready:
                while self.replays:
                    self._forward(backend, "shell", *self.replays.pop(0))
            while self.interrupts:
                self.interrupts -= 1
                backend.interrupt()
            if isinstance(backend, RemoteKernel):
                backend.watch_files(poller)
            try:
                ready = dict(poller.poll(50))
            except zmq.ZMQError:  # EINTR from a signal
                continue
            if isinstance(backend, RemoteKernel):
                backend.pump_files(ready)
            for sock, channel in routers.items():
                while ready.get(sock) and sock.poll(0):
                    frontend, *frames = sock.recv_multipart()
                    self._forward(backend, channel, frontend, frames)
            if ready.get(self.ports.hb):
                # The heartbeat says the shim (and so its link) is alive; a dead kernel ends
                # the shim, which the Jupyter client sees as a dead kernel.
                self.ports.hb.send(self.ports.hb.recv())
            for channel, ident, frames in backend.drain(ready):
                if self._to_frontend(channel, ident, frames):
                    break  # the kernel moved: what the old one still says is not wanted
            self._show_notices(backend)
            code = backend.exit_code() if self.backend is backend else None
            if code is not None and isinstance(backend, RemoteKernel) and backend.reclaimed:
                # Ending would only make Jupyter restart the kernel on a new share, for a
                # notebook nobody uses: it goes on locally, and says so.
                self._deliver_last(backend)
                self._go_local_reclaimed(backend, backend.reclaimed)
                continue
            if code is not None:
                self._deliver_last(backend)
                self._show_notices(backend)
                if isinstance(backend, RemoteKernel) and backend.stopped_by is not None:
                    self._end_cell_stopped(backend.stopped_by, code)
                where = "remote" if isinstance(backend, RemoteKernel) else "local"
                say(f"the {where} kernel exited ({code}).")
                return code
        return 0

    # --- policing's notices ---------------------------------------------------------------
    def _running_cell(self) -> tuple[bytes, dict] | None:
        """The cell the kernel runs now (the oldest unanswered): its routing id and header."""
        for ident, frames in self.in_flight.values():
            return ident, jupyter_frames.header(frames)
        return None

    def _show_notices(self, backend: KernelBackend) -> None:
        if not isinstance(backend, RemoteKernel):
            return
        cell = self._running_cell()
        for notice in list(backend.notices):
            if cell is None and notice.get("action") == "files":
                continue  # before any cell, no frontend may listen yet: the first cell says it
            backend.notices.remove(notice)
            frames = kernel_notices.in_cell(self._session(), cell[1] if cell else {}, notice)
            self._deliver("iopub", None, frames)
            share_sidecar.write_notice(self.info["__file__"], kernel_notices.fields(notice))

    def _end_cell_stopped(self, notice: Message, code: int) -> None:
        """Policing stopped the kernel: its running cell ends with the reason, not in
        silence, and the panel keeps it once the kernel has restarted."""
        iopub, reply = kernel_notices.kernel_stopped(
            self._session(), self._running_cell(), notice, code
        )
        for frames in iopub:
            self._deliver("iopub", None, frames)
        if reply is not None:
            self._deliver("shell", *reply)
        self.stopped = True
        share_sidecar.write_notice(self.info["__file__"], kernel_notices.stopped_note(notice, code))

    def _go_local_reclaimed(self, backend: RemoteKernel, notice: Message) -> None:
        """The gateway reclaimed the idle share: a running cell (silent, off the GPU) ends
        with the reason, the panel keeps it, and the kernel runs locally from now on."""
        note = kernel_notices.idle_note(notice)
        connection_file = str(self.info["__file__"])
        iopub, reply = kernel_notices.kernel_stopped(
            self._session(), self._running_cell(), notice, 0, note
        )
        for frames in iopub:
            self._deliver("iopub", None, frames)
        if reply is not None:
            self._deliver("shell", *reply)
        share_sidecar.remove(connection_file)
        share_sidecar.write_notice(connection_file, note)
        backend.close_files()
        self.backend = LocalChild(zmq.Context.instance(), self.info, self._session())
        self.in_flight = {}
        say(f"{notice['message']} The kernel now runs locally, on no share.")

    def _deliver_last(self, backend: KernelBackend) -> None:
        """What an ended kernel sent just before it went (a shutdown's reply)."""
        deadline = time.monotonic() + 0.2
        while (left := deadline - time.monotonic()) > 0:
            poller = zmq.Poller()
            for sock in backend.poll_sockets():
                poller.register(sock, zmq.POLLIN)
            ready = dict(poller.poll(int(left * 1000) + 1))
            if not ready:
                return
            for channel, ident, frames in backend.drain(ready):
                self._to_frontend(channel, ident, frames)

    def _to_frontend(self, channel: str, ident: bytes | None, frames: list[Any]) -> bool:
        """Deliver one kernel message; True when it completed a move to another kernel."""
        if channel == "stdin" and self._is_shim_request(ident, frames):
            return False
        if channel == "iopub" and jupyter_frames.is_starting(frames):
            # A kernel behind the shim starting (first, or after a move) is no news to the
            # frontend, which saw the shim start; ipykernel follows it with no idle, so
            # JupyterLab would say "Starting" until the next cell.
            return False
        parent_id = None
        if (channel == "shell" and self.in_flight) or self.pending is not None:
            parent_id = jupyter_frames.header(frames, jupyter_frames.PARENT).get("msg_id")
        if channel == "shell":
            self.in_flight.pop(str(parent_id), None)  # that cell is answered
        if self.pending is not None and parent_id in self.pending.behind:
            # A cell queued behind the move, which the new kernel will run: what the old
            # one says of it waits, shown only if the move fails.
            self.pending.held.append((channel, ident, frames))
            return False
        self._deliver(channel, ident, frames)
        if self.pending is not None and self.pending.ends_cell(channel, frames):
            return self._complete_move()
        return False

    def _deliver(self, channel: str, ident: bytes | None, frames: list[Any]) -> None:
        if channel == "iopub":
            self.ports.iopub.send_multipart(frames)
        elif channel in self.ports.routers and ident:
            try:
                self.ports.routers[channel].send_multipart([ident, *frames])
            except zmq.ZMQError:
                pass  # that frontend is gone

    # --- the %bitfusion magic's requests -------------------------------------------------
    def _is_shim_request(self, ident: bytes | None, frames: list[Any]) -> bool:
        parts = jupyter_frames.jupyter_parts(frames)
        if parts is None or parts["header"].get("msg_type") != "input_request":
            return False
        prompt = parts["content"].get("prompt", "")
        if not prompt.startswith(move.SHIM_REQUEST):
            return False
        pending: move.PendingMove | None = None
        try:
            request = move.parse_request(prompt)
            answer, pending = move.prepare(request, self.grant, self.files, self.server_list)
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"bad request from the magic ({exc})."}
        if pending is not None:
            pending.after(parts["parent"].get("msg_id"), self.in_flight)
            self.pending = pending
        self._reply_input(ident, parts["header"], json.dumps(answer))
        return True

    def _complete_move(self) -> bool:
        """The asking cell has ended: move now. True when the kernel behind the shim
        changed (what the old one still says is not wanted)."""
        pending, self.pending = self.pending, None
        assert pending is not None
        new = pending.complete(self.backend, self.info, self._session())
        if new is None:
            for message in pending.held:
                self._to_frontend(*message)  # the old kernel ran those cells after all
            return False
        self.backend = new
        if pending.files is not None:
            self.files = pending.files
        self.in_flight = {}
        self.replays.extend(pending.behind.values())
        return True

    def _session(self) -> Any:
        from jupyter_client.session import Session  # only when the magic asks

        return Session(
            key=self.info.get("key", "").encode(),
            signature_scheme=self.info.get("signature_scheme", "hmac-sha256"),
        )

    def replay(self, cell: dict) -> None:
        """Send the new kernel a request the local kernel received while it became this
        shim (re-signed with the same key, header untouched, so its reply matches)."""
        frames = self._session().serialize({**cell["msg"], "buffers": []})
        self.replays.append((bytes.fromhex(cell["ident"][0]), frames))

    def _reply_input(self, ident: bytes | None, request_header: dict, value: str) -> None:
        session = self._session()
        reply = session.msg("input_reply", {"value": value}, parent=request_header)
        self.backend.send("stdin", ident, session.serialize(reply))


_TRAIT_OPTION = re.compile(r"^--[A-Za-z_]\w*(\.\w+)+(=.*)?$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bitfusion_jupyter.shim", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--connection-file", "-f", required=True, type=Path)
    share_request.add_arguments(parser)
    parser.add_argument("-l", "--server_list", dest="server_list", default=None)
    parser.add_argument("--kernel", default="python3", help="the gateway's kernel environment")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    files = parser.add_mutually_exclusive_group()
    files.add_argument(
        "--files",
        metavar="DIR",
        help="this folder (default, or . : the notebook's, where the Jupyter server starts "
        "the kernel) is the kernel's working folder on the share, at the same path",
    )
    files.add_argument("--no-files", action="store_true", help="carry no folder to the share")
    # Jupyter clients may pass a local kernel more arguments (`jupyter run --kernel K FILE`
    # passes FILE, others `--Class.trait=value`): the kernel on the share starts with its
    # own, so those are set aside, saying so. Any other unknown option is still a mistake.
    args, extra = parser.parse_known_args(argv)
    mistakes = [a for a in extra if a.startswith("-") and not _TRAIT_OPTION.match(a)]
    if mistakes:
        parser.error(f"unrecognized arguments: {' '.join(mistakes)}")
    if extra:
        print(
            f"bitfusion: not passing {' '.join(extra)} to the kernel on the share "
            "(arguments for a local kernel; it starts with its own).",
            file=sys.stderr,
        )
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        req = share_request.from_args(args)
        info = json.loads(args.connection_file.read_text())
        choice = file_server.choose(
            os.getcwd(), args.files, args.no_files, hint=file_server.KERNEL_HINT
        )
    except (share_request.UsageError, OSError, ValueError, file_server.FilesError) as exc:
        print(f"bitfusion: {exc}", file=sys.stderr)
        return 2
    ctx: zmq.Context = zmq.Context.instance()
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
    kept: Grant | None = None  # a share the kernel provisioner holds and gives back itself
    shim: Shim | None = None
    try:
        pool = Pool.from_config(args.server_list, args.timeout, zero_copy=True)
        adopt = os.environ.pop(move.ADOPT_ENV, None)
        if adopt:
            # A local kernel whose %bitfusion magic took this share, then became this shim.
            held = json.loads(adopt)
            grant = Grant(
                pool.connect(held["server"]), held["share"], held["lease_s"], held.get("env", {})
            )
            # From the kernel provisioner: its share outlives this shim (a restart runs on it
            # again), so the shim ends only its kernel there.
            kept = grant if held.get("keep") else None
        else:
            grant = pool.allocate(req, release_on_exit=True, on_queue=say)
        started, server, folder, note = start_kernel(grant, info, args.kernel, choice)
        say(move.describe(grant, started["kernel"]))
        if folder is not None:
            say(f"the kernel works in your folder {folder}, at the same path on the share.")
        remote = RemoteKernel(grant, started, str(args.connection_file), server, note)
        shim = Shim(ports, info, remote, args.server_list, choice)
        for cell in held.get("replay", []) if adopt else []:
            shim.replay(cell)  # what the local kernel was sent while it moved
        try:
            return shim.run()
        finally:
            grant = shim.grant  # the share it holds now, after any moves
    except (config.ConfigError, tokens.TokenError, GatewayError, file_server.FilesError) as exc:
        print(f"bitfusion: {exc}", file=sys.stderr)
        return 1
    finally:
        if shim is not None:
            shim.close()
        if grant is not None and not (shim and shim.lease_gone):
            if grant is kept:
                if shim is not None and isinstance(shim.backend, RemoteKernel):
                    shim.backend.end()
            else:
                grant.release(timeout=3.0)
        if pool is not None:
            pool.close()
        ports.close(linger=shim is not None and shim.stopped)
        share_sidecar.remove(args.connection_file)
        if not (shim and shim.stopped):
            share_sidecar.remove_notice(args.connection_file)  # kept across a restart


if __name__ == "__main__":
    sys.exit(main())
