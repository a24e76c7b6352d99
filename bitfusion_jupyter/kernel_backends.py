"""The kernels a shim forwards to, behind one interface (KernelBackend): a kernel on a share
(RemoteKernel), or after `%bitfusion --local` a plain local ipykernel (LocalChild).

A RemoteKernel is started by the gateway and reached through the shim's one encrypted gateway
connection; frames pass through untouched.

A LocalChild is started by the shim itself. The shim keeps the ports the frontend knows open
the whole time, so no request can be lost in a gap between two processes: a cell sent the
instant the move ends waits in the shim's socket until this kernel is ready. The child
listens on ipc sockets in a private directory, signs with the notebook's key, runs in its own
session (a Ctrl-C reaches it once, through the shim) and ends by itself when the shim dies
(ipykernel's parent poller).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import zmq

from bitfusion_jupyter import file_server, share_sidecar
from bitfusion_jupyter.jupyter_frames import DELIMITER, HEADER, PARENT, delimiter_at
from bitfusion_jupyter.pool import Grant, say
from bitfusion_jupyter.runner import FilesPump, ProcessStream
from remoting.protocol import KERNEL_REQUEST_CHANNELS, Message, as_bytes, jupyter_endpoint

KERNEL_START_TIMEOUT_S = 60.0
UNDER_SHIM_ENV = "BITFUSION_UNDER_SHIM"  # tells the child's magic to ask the shim to move
READY_PROBE_S = 0.25  # how often to ask until the kernel's iopub is heard
SHARE_VARIABLES = ("BITFUSION_KERNEL_ID", "BITFUSION_SHARE_ID")


class KernelBackend(Protocol):
    """What the shim asks of the kernel behind its ports, wherever it runs."""

    @property
    def ready(self) -> bool:
        """True once the frontend's requests may flow: nothing the kernel says is lost."""
        ...

    def poll_sockets(self) -> list[Any]:
        """The sockets the shim's poller watches for this kernel."""
        ...

    def probe(self) -> None:
        """Called on every turn of the shim's loop: keep the link alive, learn of an end."""
        ...

    def send(self, channel: str, ident: bytes | None, frames: list[Any]) -> None:
        """A frontend's message (its routing id first, so the reply finds its way back)."""
        ...

    def drain(self, ready: dict) -> Iterator[tuple[str, bytes | None, list[Any]]]:
        """The kernel's messages for the frontend: (channel, routing id, frames)."""
        ...

    def interrupt(self) -> None: ...

    def exit_code(self) -> int | None:
        """The kernel's exit status once it has ended, else None."""
        ...


def start_kernel(
    grant: Grant, info: dict, kernel: str, choice: file_server.Choice
) -> tuple[dict, subprocess.Popen[bytes] | None, Path | None, str]:
    """Have the gateway start ``kernel`` in the share, working in the chosen folder of this
    machine, served by a confined sftp-server (also returned). Returns the folder carried
    and a sentence for the notebook when the one chosen by default could not be."""
    notes = [choice.note] if choice.note else []
    started, folder = file_server.carried(
        lambda files: grant.conn.request(
            "kernel_start",
            share_id=grant.share_id,
            key=info.get("key", ""),
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
            kernel=kernel,
            timeout=KERNEL_START_TIMEOUT_S,
            **files,
        ),
        choice,
        notes.append,
    )
    for note in notes:
        say(note)
    # Once the gateway took the kernel (a refusal starts nothing); sshfs's first requests
    # wait in the connection until the shim's loop pumps them.
    server = file_server.start(folder) if folder is not None else None
    return started, server, folder, " ".join(notes)


class RemoteKernel:
    """The remote kernel a share runs, behind the same small interface as LocalChild."""

    ready = True  # the gateway queues requests until its kernel listens

    def __init__(
        self,
        grant: Grant,
        started: dict,
        connection_file: str,
        files_server: subprocess.Popen[bytes] | None = None,
        files_note: str = "",
    ) -> None:
        self.grant = grant
        self.conn = grant.conn
        self.kernel_id = started["kernel_id"]
        self.kernel = started["kernel"]
        self.stream = ProcessStream(
            grant.conn,
            grant.share_id,
            started["proc_id"],
            grant.lease_s,
            prefix=f"[kernel in share {grant.share_id}] ",
        )
        self.stream.close_stdin()  # a kernel reads no stdin; its input comes on its channel
        if files_server is not None:
            self.stream.files = FilesPump(grant.conn, started["proc_id"], files_server)
        self._code: int | None = None
        self.notices: list[Message] = []  # policing's, not yet shown
        self.reclaimed: Message | None = None  # the gateway's word that the idle share ends
        if files_note:  # the folder stayed behind: said in the first cell that runs
            note = {"share_id": grant.share_id, "action": "files", "message": files_note}
            self.notices.append(Message("notice", note))
        share_sidecar.write(connection_file, grant.conn.address, grant.share, self.kernel,
                            grant.lease_s)  # fmt: skip

    def poll_sockets(self) -> list[Any]:
        return [self.conn.sock]

    def watch_files(self, poller: Any) -> None:
        if self.stream.files is not None:
            self.stream.files.watch(poller)

    def pump_files(self, ready: dict) -> None:
        if self.stream.files is not None:
            self.stream.files.pump(ready)

    def close_files(self) -> None:
        """Stop serving the folder (the kernel has ended, or moved to another share)."""
        if self.stream.files is not None:
            self.stream.files.close()
            self.stream.files = None

    def probe(self) -> None:
        self.conn.flush()
        code = self.stream.tick()  # set when the gateway says the kernel is gone for good
        if code is not None and self._code is None:
            self._code = code

    def send(self, channel: str, ident: bytes | None, frames: list[Any]) -> None:
        routing = {"ident": ident.hex()} if ident else {}
        self.conn.send("kernel_in", frames, kernel_id=self.kernel_id, channel=channel, **routing)

    def drain(self, ready: dict) -> Iterator[tuple[str, bytes | None, list[Any]]]:
        if not (ready.get(self.conn.sock) or self.conn.has_pending()):
            return
        while self._code is None and (msg := self.conn.receive(0)) is not None:
            if msg.type == "kernel_out":
                if msg["kernel_id"] == self.kernel_id:  # not the one we moved away from
                    ident = msg.get("ident")
                    yield (
                        msg["channel"],
                        bytes.fromhex(ident) if ident else None,
                        list(msg.payloads),
                    )
                continue
            if msg.get("proc_id") not in (None, self.stream.proc_id):
                continue  # the kernel we moved away from, going down
            if msg.type == "notice" and msg.get("action") == "idle":
                self.reclaimed = msg  # the share ends next; the shim says why, and goes local
            elif msg.type == "notice" and msg.get("share_id") in (None, self.grant.share_id):
                self.notices.append(msg)  # the shim shows it in the notebook
            self._code = self.stream.handle(msg)

    def interrupt(self) -> None:
        self.conn.send("signal", proc_id=self.stream.proc_id, signum=int(signal.SIGINT))

    def end(self) -> None:
        """Stop the kernel on its share, leaving the share held (the provisioner's)."""
        if self._code is None:
            self.conn.send("signal", proc_id=self.stream.proc_id, signum=int(signal.SIGKILL))
            self.conn.flush()

    def exit_code(self) -> int | None:
        return self._code

    @property
    def stopped_by(self) -> Message | None:
        """Policing's stop notice, when one came for this kernel's share."""
        return self.stream.stopped_by

    @property
    def lease_gone(self) -> bool:
        return self.stream.lease_gone


class LocalChild:
    """One local kernel process and the shim's sockets to it."""

    def __init__(self, ctx: zmq.Context, info: dict, session: Any) -> None:
        from jupyter_client.connect import write_connection_file

        self.session = session  # the notebook's key: the child signs what the frontend checks
        self.dir = Path(tempfile.mkdtemp(prefix="bitfusion-local-"))  # 0700: ours alone
        self.connection_file = str(self.dir / "kernel.json")
        _, conn = write_connection_file(
            self.connection_file,
            transport="ipc",
            ip=str(self.dir / "k"),
            key=info.get("key", "").encode(),
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
        )
        env = {k: v for k, v in os.environ.items() if k not in SHARE_VARIABLES}
        env.update({"JPY_PARENT_PID": str(os.getpid()), UNDER_SHIM_ENV: "1"})
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ipykernel_launcher",
                "-f",
                self.connection_file,
                "--IPKernelApp.extensions=bitfusion_jupyter",
            ],
            env=env,
            start_new_session=True,
        )
        routing_id = uuid.uuid4().bytes  # one id on shell and stdin: input requests route back
        self.sockets: dict[str, zmq.Socket] = {}
        for channel in KERNEL_REQUEST_CHANNELS:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
            if channel == "stdin":
                # The kernel sends input requests to this socket by its routing id, and drops
                # them until it has connected: a cell calling input() must wait for that.
                # Watched from before the connect, so the event cannot be missed.
                self._stdin_events = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sock.connect(jupyter_endpoint(conn, channel))
            self.sockets[channel] = sock
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.LINGER, 0)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(jupyter_endpoint(conn, "iopub"))
        self.channel_of = {sock: ch for ch, sock in self.sockets.items()}
        self.channel_of[self.iopub] = "iopub"
        self._heard = False  # the kernel's iopub, so our subscription is in place
        self._stdin_up = False
        self._probes: list[bytes] = []  # our own kernel_info requests' msg_ids
        self._last_probe = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ready(self) -> bool:
        """True once the frontend's requests may flow: nothing the kernel says is lost."""
        return self._heard and self._stdin_up

    def poll_sockets(self) -> list[zmq.Socket]:
        return list(self.channel_of)

    def probe(self) -> None:
        """Until the kernel's iopub is heard, ask it for its info now and then: only then is
        our subscription in place, so the frontend's requests may flow (they wait until)."""
        if not self._stdin_up and self._stdin_events.poll(0):
            self._stdin_up = True  # the one event it watches for
            self.sockets["stdin"].disable_monitor()
            self._stdin_events.close(0)
        if self._heard or time.monotonic() - self._last_probe < READY_PROBE_S:
            return
        self._last_probe = time.monotonic()
        msg = self.session.msg("kernel_info_request", {})
        self._probes.append(msg["header"]["msg_id"].encode())
        self.sockets["shell"].send_multipart(self.session.serialize(msg))

    def send(self, channel: str, ident: bytes | None, frames: list[Any]) -> None:
        """A frontend's message (its routing id first, so the reply finds its way back)."""
        self.sockets[channel].send_multipart([ident, *frames] if ident else frames, copy=False)

    def drain(self, ready: dict) -> Iterator[tuple[str, bytes | None, list[Any]]]:
        """The kernel's messages for the frontend: (channel, routing id, frames)."""
        for sock, channel in self.channel_of.items():
            while ready.get(sock) and sock.poll(0):
                frames = sock.recv_multipart(copy=False)
                if channel == "iopub":
                    self._heard = True
                    if not self._own(frames):
                        yield channel, None, frames
                elif as_bytes(frames[0]) != DELIMITER:  # no routing id: a reply to our probe
                    yield channel, as_bytes(frames[0]), frames[1:]

    def _own(self, frames: list[Any]) -> bool:
        """True for what the frontend must not see: the welcome our subscription earned,
        and the statuses of our probes."""
        i = delimiter_at(frames)
        if i is None or len(frames) <= i + PARENT:
            return False
        header, parent = as_bytes(frames[i + HEADER]), as_bytes(frames[i + PARENT])
        return b'"iopub_welcome"' in header or any(p in parent for p in self._probes)

    def interrupt(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)

    def exit_code(self) -> int | None:
        return self.process.poll()

    def close(self, grace_s: float = 3.0) -> None:
        """End the kernel (if it still runs), close our sockets and remove its files."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._stdin_up:
            self._stdin_events.close(0)
        for sock in self.channel_of:
            sock.close(0)
        shutil.rmtree(self.dir, ignore_errors=True)
