"""A kernel on a share, as the shim sees it: started by the gateway, reached through the
shim's one encrypted gateway connection. Frames pass through untouched."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bitfusion_jupyter import file_server, share_sidecar
from bitfusion_jupyter.pool import Grant, say
from bitfusion_jupyter.runner import FilesPump, ProcessStream
from remoting.protocol import Message

KERNEL_START_TIMEOUT_S = 60.0


def start_kernel(
    grant: Grant, info: dict, kernel: str, choice: file_server.Choice
) -> tuple[dict, subprocess.Popen[bytes] | None, Path | None, str]:
    """Have the gateway start ``kernel`` in the share, working in the chosen folder of this
    machine, served by a confined sftp-server (also returned). Returns the folder carried
    and a sentence for the notebook when the one chosen by default could not be."""
    notes = [choice.note] if choice.note else []
    started, folder = file_server.carried(
        lambda folder: grant.conn.request(
            "kernel_start",
            share_id=grant.share_id,
            key=info.get("key", ""),
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
            kernel=kernel,
            timeout=KERNEL_START_TIMEOUT_S,
            **({"files": str(folder)} if folder is not None else {}),
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
