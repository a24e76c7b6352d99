"""The nanny: a small supervisor that owns one process started in a share.

The gateway never owns share processes itself, so they survive a gateway crash or restart. The
nanny (started and daemonised by gateway.nanny.startup) runs ARGV in its own session and process
group, keeps every output chunk until the gateway acks it, and serves one gateway connection at
a time on a Unix socket; a restarted gateway connects again and asks for output from where its
client left off.

Stdlib only and a single-threaded selectors loop: it starts on every `bitfusion run`, so it must
start fast, and it must never take its child down with it.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import time
from collections import deque

from gateway.nanny import wire
from gateway.nanny.buffers import Outbox, Sink
from gateway.nanny.log import log, log_exception
from gateway.nanny.wire import NannyMsg

# typing costs milliseconds at every start; annotations are strings here and only need it when
# a type checker reads them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

READ_CHUNK = 64 * 1024
MAX_UNACKED = 8 * 1024 * 1024  # stop reading the child's pipes beyond this much unacked output


class Nanny:
    """The event loop around one child; see the module docstring for the contract."""

    def __init__(
        self,
        listener: socket.socket,
        child: subprocess.Popen[bytes],
        argv: list[str],
        socket_path: str,
        status_path: str,
        linger_s: float,
        files: tuple[int, int] | None = None,
    ) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = listener
        self.child = child
        self.argv = argv
        self.socket_path = socket_path
        self.status_path = status_path
        self.linger_s = linger_s
        self.started_at = time.time()

        # Output: every out/exit message stays here, encoded, until the gateway acks it.
        self.next_seq = 1
        self.unacked: deque[tuple[int, bytes, int]] = deque()  # (seq, frame, payload size)
        self.unacked_bytes = 0
        assert child.stdout is not None and child.stderr is not None and child.stdin is not None
        self.pipes = {child.stdout.fileno(): wire.STDOUT, child.stderr.fileno(): wire.STDERR}
        self.reading = False

        # Inputs: the child's stdin, and with a mount of the client's folder the SFTP stream
        # to its sshfs (``files``: our ends, (to sshfs, from sshfs)).
        self.sinks = {0: Sink(self.sel, self._tell, 0, child.stdin.fileno(), child.stdin.close)}
        if files is not None:
            to_sshfs, from_sshfs = files
            self.sinks[wire.FILES] = Sink(
                self.sel, self._tell, wire.FILES, to_sshfs, lambda: os.close(to_sshfs)
            )
            self.pipes[from_sshfs] = wire.FILES

        # The one gateway connection.
        self.conn: socket.socket | None = None
        self.decoder = wire.FrameDecoder()
        self.conn_box = Outbox()
        self.attached = False
        self.out_from = 1

        self.exit_code: int | None = None  # once the child is reaped
        self.exit_seq: int | None = None  # once the exit message is emitted
        self.terminating = False
        self.kill_at: float | None = None
        self.linger_until: float | None = None
        self.done = False
        self.pidfd: int | None = None

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        for fd in (*self.pipes, *(s.fd for s in self.sinks.values() if s.fd is not None)):
            os.set_blocking(fd, False)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, lambda _mask: self._accept())
        try:
            self.pidfd = os.pidfd_open(self.child.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, lambda _mask: self._reap())
        except (AttributeError, OSError):
            self.pidfd = None  # old kernel: poll for the exit instead
        self._update_reading()
        self._reap()  # the child may already be gone
        while not self.done:
            # selectors retries on EINTR itself (PEP 475); os.read/os.write do too.
            for key, mask in self.sel.select(self._timeout()):
                key.data(mask)
                if self.done:
                    break
            if self.pidfd is None:
                self._reap()
            self._run_timers()
        self._shut_down()
        return 0

    def _timeout(self) -> float | None:
        deadlines = [t for t in (self.kill_at, self.linger_until) if t is not None]
        if self.pidfd is None and self.exit_code is None:
            deadlines.append(time.monotonic() + 0.1)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _run_timers(self) -> None:
        now = time.monotonic()
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            log("grace period over: SIGKILL to the process group")
            self._killpg(signal.SIGKILL)
        if self.linger_until is not None and now >= self.linger_until:
            log(f"no ack of the exit for {self.linger_s:g} s; leaving")
            self.done = True

    def _shut_down(self) -> None:
        if self.conn is not None:
            self._drop_conn(None)
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
        if self.exit_code is None:  # only reachable by a bug: do not leave the child unowned
            self._killpg(signal.SIGKILL)

    # --- the child -----------------------------------------------------------------------
    def _reap(self) -> None:
        if self.exit_code is not None or self.child.poll() is None:
            return
        self.exit_code = self.child.returncode
        if self.pidfd is not None:
            self.sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        log(f"child {self.child.pid} exited with {self.exit_code}")
        if self.terminating:
            self._killpg(signal.SIGKILL)  # grandchildren that ignored SIGTERM go too
            self.kill_at = None
        self.write_status()
        self._maybe_emit_exit()

    def _killpg(self, signum: int) -> None:
        try:
            os.killpg(self.child.pid, signum)
        except ProcessLookupError:
            pass
        except OSError as exc:
            log(f"cannot send signal {signum} to the process group: {exc}")

    def _read_pipe(self, fd: int) -> None:
        if fd not in self.pipes:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log(f"reading the child's output failed: {exc}")
            data = b""
        if not data:
            stream = self.pipes.pop(fd)
            if self.reading:
                self.sel.unregister(fd)
            if stream == wire.FILES:
                os.close(fd)
            else:
                (self.child.stdout if stream == wire.STDOUT else self.child.stderr).close()  # type: ignore[union-attr]
            self._maybe_emit_exit()
            return
        self._emit({"type": NannyMsg.OUT, "stream": self.pipes[fd]}, data)
        self._update_reading()

    def _update_reading(self) -> None:
        # Back-pressure: a client that stops acking stops the child at its next full pipe.
        want = self.unacked_bytes <= MAX_UNACKED
        if want == self.reading:
            return
        self.reading = want
        for fd in self.pipes:
            if want:
                self.sel.register(
                    fd, selectors.EVENT_READ, lambda _mask, fd=fd: self._read_pipe(fd)
                )
            else:
                self.sel.unregister(fd)

    def _maybe_emit_exit(self) -> None:
        # The exit is the last message: wait until the child is reaped and its pipes are drained.
        if self.exit_code is None or self.pipes or self.exit_seq is not None:
            return
        for sink in self.sinks.values():
            sink.close()
        self.exit_seq = self.next_seq
        self._emit({"type": NannyMsg.EXIT, "code": self.exit_code})
        self.linger_until = time.monotonic() + self.linger_s

    def write_status(self) -> None:
        status = {
            "nanny_pid": os.getpid(),
            "child_pid": self.child.pid,
            "pgid": self.child.pid,  # start_new_session: the child leads its own group
            "argv": self.argv,
            "exit_code": self.exit_code,
            "started_at": self.started_at,
        }
        tmp = f"{self.status_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, self.status_path)  # readers never see half a file
        except OSError as exc:
            log(f"cannot write the status file: {exc}")

    # --- output to the gateway -----------------------------------------------------------
    def _emit(self, header: dict[str, Any], payload: bytes = b"") -> None:
        seq = self.next_seq
        self.next_seq += 1
        header["seq"] = seq
        frame = wire.encode_frame(header, payload)
        self.unacked.append((seq, frame, len(payload)))
        self.unacked_bytes += len(payload)
        if self.attached and seq >= self.out_from:
            self._send(frame)

    def _send(self, frame: bytes) -> None:
        self.conn_box.push(frame)
        self._flush_conn()

    def _tell(self, frame: bytes) -> bool:
        """A frame that only a gateway attached now needs (a Sink's progress)."""
        if not self.attached:
            return False
        self._send(frame)
        return True

    def _flush_conn(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            self.conn_box.write_to(conn.send)
        except OSError as exc:
            self._drop_conn(f"sending failed: {exc}")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.conn_box else 0)
        if self.sel.get_key(conn).events != events:
            self.sel.modify(conn, events, self.sel.get_key(conn).data)

    # --- the gateway connection ----------------------------------------------------------
    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log(f"accept failed: {exc}")
            return
        if self.conn is not None:
            self._drop_conn("replaced by a new connection (a restarted gateway?)")
        conn.setblocking(False)
        self.conn = conn
        self.decoder = wire.FrameDecoder()
        self.conn_box.clear()
        self.attached = False
        self.sel.register(conn, selectors.EVENT_READ, lambda mask: self._on_conn(conn, mask))

    def _drop_conn(self, why: str | None) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if why:
            log(f"dropping the gateway connection: {why}")
        self.sel.unregister(conn)
        conn.close()
        self.conn_box.clear()
        self.attached = False

    def _on_conn(self, conn: socket.socket, mask: int) -> None:
        if conn is not self.conn:
            return  # replaced earlier in this round
        if mask & selectors.EVENT_WRITE:
            self._flush_conn()
        if not mask & selectors.EVENT_READ or conn is not self.conn:
            return
        try:
            data = conn.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_conn(f"receiving failed: {exc}")
            return
        if not data:
            self._drop_conn(None)  # the gateway went away; its successor will connect
            return
        try:
            for header, payload in self.decoder.feed(data):
                self._handle(header, payload)
                if conn is not self.conn or self.done:
                    return
        except wire.WireError as exc:
            self._drop_conn(f"malformed frame: {exc}")
        except Exception:  # a bug here must not orphan the child
            log_exception()
            self._drop_conn("internal error handling a frame")

    def _handle(self, header: dict[str, Any], payload: bytes) -> None:
        kind = header["type"]
        if kind == NannyMsg.ATTACH:
            self._attach(wire.int_field(header, "out_from"))
        elif kind == NannyMsg.ACK:
            self._ack(wire.int_field(header, "seq"))
        elif kind in (NannyMsg.STDIN, NannyMsg.STDIN_CLOSE):
            sink = self.sinks.get(int(header.get("stream") or 0))
            if sink is not None:
                sink.take(
                    wire.int_field(header, "seq"), payload if kind == NannyMsg.STDIN else None
                )
        elif kind == NannyMsg.SIGNAL:
            signum = wire.int_field(header, "signum")
            log(f"forwarding signal {signum}")
            self._killpg(signum)
        elif kind == NannyMsg.TERMINATE:
            self._terminate(max(0.0, wire.float_field(header, "grace_s")))
        else:
            log(f"ignoring a message of unknown type {kind!r}")  # a newer gateway, perhaps

    def _attach(self, out_from: int) -> None:
        self.attached = True
        self.out_from = max(1, out_from)
        self.conn_box.drop_unstarted()  # a re-attach replaces whatever was still queued
        running = self.exit_code is None
        files = self.sinks.get(wire.FILES)
        self.conn_box.push(
            wire.encode_frame(
                {
                    "type": NannyMsg.ATTACHED,
                    "child_pid": self.child.pid,
                    "stdin_seq": self.sinks[0].seq,
                    **({"files_seq": files.seq} if files is not None else {}),
                    "running": running,
                    "exit_code": self.exit_code,
                }
            )
        )
        for seq, frame, _size in self.unacked:
            if seq >= self.out_from:
                self.conn_box.push(frame)
        self._flush_conn()

    def _ack(self, seq: int) -> None:
        while self.unacked and self.unacked[0][0] <= seq:
            _seq, _frame, size = self.unacked.popleft()
            self.unacked_bytes -= size
        self._update_reading()
        if self.exit_seq is not None and seq >= self.exit_seq:
            log("exit acked; leaving")
            self.done = True

    def _terminate(self, grace_s: float) -> None:
        log(f"terminate: SIGTERM to the process group, SIGKILL in {grace_s:g} s")
        self.terminating = True
        self._killpg(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)
