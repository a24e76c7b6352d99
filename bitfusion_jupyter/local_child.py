"""A plain local ipykernel that the shim starts, and forwards to, after `%bitfusion --local`.

The shim keeps the ports the frontend knows open the whole time, so no request can be lost
in a gap between two processes: a cell sent the instant the move ends waits in the shim's
socket until this kernel is ready. The child listens on ipc sockets in a private directory,
signs with the notebook's key, runs in its own session (a Ctrl-C reaches it once, through
the shim) and ends by itself when the shim dies (ipykernel's parent poller).
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
from typing import Any

import zmq

from bitfusion_jupyter.jupyter_frames import DELIMITER, HEADER, PARENT, delimiter_at
from remoting.protocol import KERNEL_REQUEST_CHANNELS, as_bytes, jupyter_endpoint

UNDER_SHIM_ENV = "BITFUSION_UNDER_SHIM"  # tells the child's magic to ask the shim to move
READY_PROBE_S = 0.25  # how often to ask until the kernel's iopub is heard
SHARE_VARIABLES = ("BITFUSION_KERNEL_ID", "BITFUSION_SHARE_ID")


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
