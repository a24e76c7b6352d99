"""`bitfusion run`'s loop: one remote process's stdio, signals, acks and lease renewals.

Output comes with sequence numbers. The client writes each chunk once, acks what it wrote,
and when it sees a gap (a message dropped while the link or the gateway was down) it asks for
output again from the first missing number; the process's nanny keeps everything not yet
acked, so nothing is lost or written twice. Each renewal also re-attaches, so after a gateway
restart the stream resumes by itself.

Stdin goes the other way the same way: the client keeps each chunk until the nanny says it
has written it, and on every re-attach sends again what the nanny does not have (a chunk can
die in a gateway's socket); the nanny drops what it already wrote. At most STDIN_WINDOW bytes
are kept, so a command that does not read its stdin stops the client reading it too.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

import zmq

from bitfusion_jupyter.pool import say
from remoting.client import GatewayConnection, GatewayError
from remoting.messages import ErrorCode
from remoting.protocol import Message, renew_every

STDIN_CHUNK = 64 * 1024
ACK_EVERY_BYTES = 256 * 1024
ACK_EVERY_S = 0.05
STDIN_WINDOW = 8 * 1024 * 1024  # stdin bytes sent but not yet written to the command, at most
FILES_STREAM = 3  # the process's stream that carries the client's folder (SFTP), both ways


class Input:
    """One input of the remote process, sent in order: its stdin (stream 0), or the files
    stream to the share's sshfs (3). Each chunk is kept until the nanny says it has it
    written, and sent again on every re-attach; at most STDIN_WINDOW bytes are kept."""

    def __init__(self, conn: GatewayConnection, proc_id: str, stream: int = 0) -> None:
        self.conn = conn
        self.proc_id = proc_id
        self.stream = stream
        self.seq = 0
        self.open = True
        # Sent and not yet written by the nanny: (seq, chunk, or None for the close).
        self.kept: collections.deque[tuple[int, bytes | None]] = collections.deque()
        self.kept_bytes = 0

    @property
    def room(self) -> bool:
        return self.kept_bytes < STDIN_WINDOW

    def close(self) -> None:
        if self.open:
            self.open = False
            self.send(None)

    def send(self, data: bytes | None) -> None:
        """One chunk, or None for the close."""
        self.seq += 1
        self.kept.append((self.seq, data))
        self.kept_bytes += len(data or b"")
        self._out(self.seq, data)

    def _out(self, seq: int, data: bytes | None) -> None:
        stream: dict[str, Any] = {"stream": self.stream} if self.stream else {}
        if data is None:
            self.conn.send("stdin_close", proc_id=self.proc_id, seq=seq, **stream)
        else:
            self.conn.send("stdin", [data], proc_id=self.proc_id, seq=seq, **stream)

    def news(self, seq: int, resend: bool) -> None:
        """News of the nanny's side. After a (re)attach (``resend``) it has every chunk up to
        ``seq``, written or queued: send the later ones again. Otherwise it has written every
        chunk up to ``seq``: forget those, which opens the window again."""
        if resend:
            for kept_seq, data in self.kept:
                if kept_seq > seq:
                    self._out(kept_seq, data)
            return
        while self.kept and self.kept[0][0] <= seq:
            self.kept_bytes -= len(self.kept.popleft()[1] or b"")


class ProcessStream:
    """Drives one remote process until it exits; returns a shell-style exit code."""

    def __init__(
        self,
        conn: GatewayConnection,
        share_id: str,
        proc_id: str,
        lease_s: float,
        prefix: str = "",
    ):
        self.conn = conn
        # Put before each line of output (a kernel's, in its frontend's log), so that what
        # the remote program says is not read as bitfusion's own words.
        self.prefix = prefix.encode()
        self.line_start = {1: True, 2: True}
        self.share_id = share_id
        self.proc_id = proc_id
        self.renew_every = renew_every(lease_s)
        self.next_seq = 1  # next output seq we expect
        self.acked = 0
        self.unacked_bytes = 0
        self.last_ack = time.monotonic()
        self.stdin = Input(conn, proc_id)
        self.files: FilesPump | None = None  # the client's folder, when it goes along
        self.signals: list[int] = []
        self.forwarded: set[int] = set()  # signals passed on to the process
        self.stopped_by: Message | None = None  # policing's stop notice, if one came
        self.lost_since: float | None = None
        self.lease_gone = False  # the link was down past the lease: the gateway ended the share
        self.lease_s = lease_s
        self.next_renew = time.monotonic() + self.renew_every

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
        previous = {s: signal.signal(s, self._on_signal) for s in forwarded}
        try:
            return self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _loop(self) -> int:
        stdin_fd = _stdin_fd()
        if stdin_fd is None:
            self.close_stdin()
        poller = zmq.Poller()
        poller.register(self.conn.sock, zmq.POLLIN)
        reading = False
        while True:
            if (stdin_fd is not None and self.stdin.room) != reading:
                reading = not reading
                if reading:
                    poller.register(stdin_fd, zmq.POLLIN)
                else:
                    poller.unregister(stdin_fd)
            self.conn.flush()
            while self.signals:
                signum = self.signals.pop(0)
                if self.lost_since is not None:  # no one to pass it to: Ctrl-C still ends us
                    say(
                        f"interrupted while the gateway {self.conn.address} is unreachable; "
                        "the command there ends with its share when the lease runs out."
                    )
                    return 128 + signum
                self.conn.send("signal", proc_id=self.proc_id, signum=signum)
                self.forwarded.add(signum)
            timeout = max(0.0, min(self.next_renew - time.monotonic(), ACK_EVERY_S))
            if self.files is not None:
                self.files.watch(poller)
            try:
                ready = dict(poller.poll(int(timeout * 1000)))
            except zmq.ZMQError:  # EINTR from a forwarded signal
                continue
            if self.files is not None:
                self.files.pump(ready)
            if (
                stdin_fd is not None
                and reading
                and ready.get(stdin_fd)
                and not self._pump_stdin(stdin_fd)
            ):
                poller.unregister(stdin_fd)
                stdin_fd, reading = None, False
            if ready.get(self.conn.sock) or self.conn.has_pending():
                while True:
                    msg = self.conn.receive(0)
                    if msg is None:
                        break
                    code = self.handle(msg)
                    if code is not None:
                        return code
            code = self.tick()
            if code is not None:
                return code

    def tick(self) -> int | None:
        """Ack written output and renew the lease when they are due; an exit code once the
        gateway says the process is gone for good."""
        if self.unacked_bytes and time.monotonic() - self.last_ack >= ACK_EVERY_S:
            self._ack()
        if time.monotonic() >= self.next_renew:
            gone = self._renew()
            self.next_renew = time.monotonic() + self.renew_every
            if gone:
                say(
                    "the remote process ended while no gateway watched it, and its "
                    "supervisor is gone: its exit status and last output are unknown."
                )
                return 255
        return None

    def handle(self, msg: Message) -> int | None:
        """Act on one message from the gateway; returns the exit code once the process ended."""
        if msg.type == "notice":
            say(msg["message"])
            if msg.get("action") == "stop":
                self.stopped_by = msg
            return None
        if msg.get("proc_id") != self.proc_id:
            return None
        if msg.type == "stdin_seq":
            if msg.get("stream") == FILES_STREAM:
                if self.files is not None:
                    self.files.input.news(msg["seq"], msg["resend"])
            else:
                self.stdin.news(msg["seq"], msg["resend"])
            return None
        seq = msg["seq"]
        if msg.type == "exit" and seq == 0:  # the gateway lost the process's supervisor
            say("the remote process's supervisor vanished; its exit status is unknown.")
            return 255
        if seq < self.next_seq:
            return None  # a replay of something already written
        if seq > self.next_seq:
            # Something was dropped on the way: ask again from the first missing chunk.
            self.conn.send("attach", proc_id=self.proc_id, out_from=self.next_seq)
            return None
        self.next_seq += 1
        if msg.type == "out":
            data = msg.payloads[0]
            if msg["stream"] == FILES_STREAM:  # sshfs's requests, for the folder's server
                if self.files is not None:
                    self.files.to_server(bytes(data))
            else:
                stream = sys.stdout.buffer if msg["stream"] == 1 else sys.stderr.buffer
                stream.write(self._prefixed(msg["stream"], data) if self.prefix else data)
                stream.flush()
            self.unacked_bytes += len(data)
            if self.unacked_bytes >= ACK_EVERY_BYTES:
                self._ack()
            return None
        if msg.type == "exit":
            self._ack()
            code = msg["code"]
            code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as shells do
            if (why := explain_exit(code, self.stopped_by, self.forwarded)) is not None:
                say(why)
            return code
        return None

    def _prefixed(self, stream: int, data: bytes) -> bytes:
        lines = bytes(data).split(b"\n")
        start = self.line_start.get(stream, True)
        out = [
            (self.prefix + line) if (i > 0 or start) and line else line
            for i, line in enumerate(lines)
        ]
        self.line_start[stream] = not lines[-1]
        return b"\n".join(out)

    def _ack(self) -> None:
        self.acked = self.next_seq - 1
        self.conn.send("ack", proc_id=self.proc_id, seq=self.acked)
        self.unacked_bytes = 0
        self.last_ack = time.monotonic()

    def _renew(self) -> bool:
        """Renew the lease and re-attach; True when the gateway no longer knows the process."""
        try:
            answer = self.conn.request(
                "renew",
                share_id=self.share_id,
                attach=[[self.proc_id, self.next_seq]],
                timeout=self.renew_every,
            )
            if self.lost_since is not None:
                say("connection to the gateway restored.")
            self.lost_since = None
            return self.proc_id in (answer or {}).get("gone", [])
        except GatewayError as exc:
            if exc.code != ErrorCode.UNREACHABLE:
                raise
            now = time.monotonic()
            if self.lost_since is None:
                self.lost_since = now
                say(
                    f"lost the gateway {self.conn.address}; retrying for up to "
                    f"{self.lease_s:g} s..."
                )
            elif now - self.lost_since > self.lease_s + self.renew_every:
                self.lease_gone = True
                raise GatewayError(
                    self.conn.address,
                    f"Lost the gateway {self.conn.address} for "
                    f"longer than the lease grace ({self.lease_s:g} s); the share "
                    "and its processes have been ended there.",
                ) from None
            return False

    def _pump_stdin(self, fd: int) -> bool:
        try:
            data = os.read(fd, STDIN_CHUNK)
        except OSError:
            data = b""
        if not data:
            self.close_stdin()
            return False
        self.stdin.send(data)
        return True

    def close_stdin(self) -> None:
        self.stdin.close()


class FilesPump:
    """The client's folder, as the process's stream 3: the confined sftp-server's replies
    go to the share's sshfs (an Input, windowed and resent like stdin), and what sshfs asks
    comes back as output of stream 3, written to sftp-server without blocking the loop."""

    def __init__(self, conn: GatewayConnection, proc_id: str, server: subprocess.Popen[bytes]):
        assert server.stdin is not None and server.stdout is not None
        self.server = server
        self.input = Input(conn, proc_id, FILES_STREAM)
        self.read_fd: int | None = server.stdout.fileno()
        self.write_fd: int | None = server.stdin.fileno()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.outbox: collections.deque[memoryview] = collections.deque()
        self.watched: dict[int, int] = {}
        self.poller: zmq.Poller | None = None

    def watch(self, poller: zmq.Poller) -> None:
        """Poll sftp-server's replies while the window has room, its stdin while we owe it."""
        if poller is not self.poller:  # a new poller (the shim makes one per state)
            self.poller, self.watched = poller, {}
        want: dict[int, int] = {}
        if self.read_fd is not None and self.input.room:
            want[self.read_fd] = zmq.POLLIN
        if self.write_fd is not None and self.outbox:
            want[self.write_fd] = zmq.POLLOUT
        for fd in set(self.watched) - set(want):
            poller.unregister(fd)
        for fd, events in want.items():
            if self.watched.get(fd) != events:
                poller.register(fd, events)
        self.watched = want

    def pump(self, ready: dict) -> None:
        if self.read_fd is not None and ready.get(self.read_fd):
            try:
                data = os.read(self.read_fd, STDIN_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                self.input.send(data)
            else:  # sftp-server ended: the share's sshfs gets EOF and its files fail, not hang
                self.read_fd = None
                self.input.close()
        if self.write_fd is not None and ready.get(self.write_fd):
            self._write()

    def to_server(self, data: bytes) -> None:
        if self.write_fd is not None and data:
            self.outbox.append(memoryview(data))
            self._write()

    def _write(self) -> None:
        while self.outbox and self.write_fd is not None:
            try:
                n = os.write(self.write_fd, self.outbox[0])
            except BlockingIOError:
                return
            except OSError:
                self.write_fd = None
                self.outbox.clear()
                return
            if n == len(self.outbox[0]):
                self.outbox.popleft()
            else:
                self.outbox[0] = self.outbox[0][n:]

    def close(self) -> None:
        for pipe in (self.server.stdin, self.server.stdout):
            if pipe is not None:
                pipe.close()
        try:
            self.server.wait(5)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


def police_reason(notice: Message) -> str:
    """What policing's stop notice means for the process, in a few words with its numbers."""
    if notice.get("used_mib") is None:
        return notice["message"]
    limit = notice.get("limit_mib") or 0
    share = f"its share's {limit} MiB" if limit else "none granted to its share"
    return (
        f"it used {notice['used_mib']} MiB of GPU memory on GPU {notice.get('gpu_index')}, "
        f"more than {share}"
    )


def explain_exit(code: int, stopped_by: Message | None, forwarded: set[int]) -> str | None:
    """One sentence on an exit status that says a signal ended the process (128+N), unless
    the user sent that signal; None when there is nothing to explain."""
    try:
        signame = signal.Signals(code - 128).name if code > 128 else None
    except ValueError:
        signame = None
    if signame is None:
        return None
    status = f"exit status {code}, 128+{signame}"
    if stopped_by is not None and code == 128 + signal.SIGKILL:
        return (
            f"the gateway's policing stopped the command: {police_reason(stopped_by)} "
            f"({status}). Ask for more memory (-m MIB) or use less."
        )
    if code - 128 in forwarded:
        return None  # the user's own Ctrl-C or kill: no surprise to explain
    return f"the command was killed by {signame} ({status})."


def _stdin_fd() -> int | None:
    try:
        fd = sys.stdin.fileno()
        os.fstat(fd)
        return fd
    except (AttributeError, ValueError, OSError):
        return None
