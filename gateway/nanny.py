"""The nanny: a small supervisor that owns one process started in a share.

    python -m gateway.nanny --socket PATH --status PATH [--cwd DIR] [--linger S] [--log PATH]
        -- ARGV...

The gateway never owns share processes itself, so they survive a gateway crash or restart. The
nanny daemonises (double fork, new session), starts ARGV in its own session and process group,
keeps every output chunk until the gateway acks it, and serves one gateway connection at a time
on a Unix socket; a restarted gateway connects again and asks for output from where its client
left off. The original process prints the nanny's pid once the socket listens, or a one-sentence
error on stderr if ARGV cannot be started.

Stdlib only and a single-threaded selectors loop: it starts on every `bitfusion run`, so it must
start fast, and it must never take its child down with it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable

from gateway import landlock
from gateway import nanny_wire as wire

# typing costs milliseconds at every start; annotations are strings here and only need it when
# a type checker reads them.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

READ_CHUNK = 64 * 1024
MAX_UNACKED = 8 * 1024 * 1024  # stop reading the child's pipes beyond this much unacked output
STDIN_TELL_EVERY = 1024 * 1024  # well under the 8 MiB the client sends ahead (STDIN_WINDOW)
DEFAULT_LINGER_S = 300.0


def log_exception() -> None:
    import traceback  # only on the rare bug; it is slow to import

    log(traceback.format_exc())


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        sys.stderr.write(f"{stamp} nanny[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # no log is no reason to stop supervising


class Outbox:
    """Bytes waiting for a non-blocking fd, kept as whole chunks so nothing is copied twice."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.offset = 0  # how much of chunks[0] is already written

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def push(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)

    def write_to(self, write: Callable[[memoryview], int]) -> None:
        """Write until empty or the fd is full; other OSErrors propagate."""
        while self.chunks:
            head = self.chunks[0]
            try:
                n = write(memoryview(head)[self.offset :])
            except BlockingIOError:
                return
            self.offset += n
            if self.offset < len(head):
                return  # a short write: the peer's buffer is full
            self.chunks.popleft()
            self.offset = 0

    def drop_unstarted(self) -> None:
        """Forget queued chunks, keeping one already half written (its peer expects the rest)."""
        head = self.chunks[0] if self.chunks and self.offset else None
        self.chunks.clear()
        if head is not None:
            self.chunks.append(head)
        else:
            self.offset = 0

    def clear(self) -> None:
        self.chunks.clear()
        self.offset = 0


class Sink:
    """One input of the child, written in seq order: its stdin (stream 0), or the SFTP stream
    to the sshfs that mounts the client's folder (stream 3). Each has its own seq space, so a
    big file read never waits behind stdin, nor stdin behind it."""

    def __init__(self, nanny: Nanny, stream: int, fd: int, close: Callable[[], None]) -> None:
        self.nanny = nanny
        self.stream = stream
        self.fd: int | None = fd
        self._close_file = close
        self.seq = 0  # highest seq accepted (written or queued to write); data and close share it
        self.untold_bytes = 0  # accepted since the gateway was last told how far
        self.box = Outbox()
        self.early: dict[int, bytes | None] = {}  # seqs that arrived ahead of a gap
        self.closing = False
        self.watched = False

    def take(self, seq: int, data: bytes | None) -> None:
        if seq <= self.seq:
            return  # already written: a client resending after a reconnect
        if seq > self.seq + 1:
            self.early[seq] = data  # wait for the gap to be filled
            return
        self._accept(data)
        self.seq = seq
        while self.seq + 1 in self.early:
            self.seq += 1
            self._accept(self.early.pop(self.seq))
        self.flush()

    def _accept(self, data: bytes | None) -> None:
        if data is None:
            self.closing = True
        elif self.fd is not None and not self.closing:
            self.box.push(data)
            self.untold_bytes += len(data)

    def flush(self) -> None:
        self._write()
        # Tell the client once what it sent is written (not merely queued here): it keeps what
        # is not yet told, to send again after a gateway restart, and sends no more than a
        # window ahead, so a child that reads slowly holds back the client's reading. Told a
        # MiB at a time (the window is larger): a message a chunk would slow a fast pipe.
        nanny = self.nanny
        if not self.box and self.untold_bytes >= STDIN_TELL_EVERY and nanny.attached:
            self.untold_bytes = 0
            header = {"type": wire.STDIN_SEQ, "seq": self.seq}
            if self.stream:
                header["stream"] = self.stream
            nanny.conn_box.push(wire.encode_frame(header))
            nanny._flush_conn()

    def _write(self) -> None:
        fd = self.fd
        if fd is None:
            return
        try:
            self.box.write_to(lambda buf: os.write(fd, buf))
        except BrokenPipeError:
            self.close()  # the reader closed its end; what it did not read is moot
            return
        except OSError as exc:
            log(f"writing the child's input {self.stream} failed: {exc}")
            self.close()
            return
        if not self.box and self.closing:
            self.close()
            return
        want = bool(self.box)
        if want != self.watched:
            self.watched = want
            if want:
                self.nanny.sel.register(fd, selectors.EVENT_WRITE, lambda _mask: self.flush())
            else:
                self.nanny.sel.unregister(fd)

    def close(self) -> None:
        if self.fd is None:
            return
        if self.watched:
            self.nanny.sel.unregister(self.fd)
            self.watched = False
        self.box.clear()
        self.fd = None
        try:
            self._close_file()
        except OSError:
            pass  # EPIPE and the like: the child is not reading any more anyway


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
        self.sinks = {0: Sink(self, 0, child.stdin.fileno(), child.stdin.close)}
        if files is not None:
            to_sshfs, from_sshfs = files
            self.sinks[wire.FILES] = Sink(self, wire.FILES, to_sshfs, lambda: os.close(to_sshfs))
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
        for fd in (*self.pipes, *(sink.fd for sink in self.sinks.values())):
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
        self._emit({"type": wire.OUT, "stream": self.pipes[fd]}, data)
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
        self._emit({"type": wire.EXIT, "code": self.exit_code})
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
        if kind == wire.ATTACH:
            self._attach(wire.int_field(header, "out_from"))
        elif kind == wire.ACK:
            self._ack(wire.int_field(header, "seq"))
        elif kind in (wire.STDIN, wire.STDIN_CLOSE):
            sink = self.sinks.get(int(header.get("stream") or 0))
            if sink is not None:
                sink.take(wire.int_field(header, "seq"), payload if kind == wire.STDIN else None)
        elif kind == wire.SIGNAL:
            signum = wire.int_field(header, "signum")
            log(f"forwarding signal {signum}")
            self._killpg(signum)
        elif kind == wire.TERMINATE:
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
                    "type": wire.ATTACHED,
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


# --- start-up ----------------------------------------------------------------------------
def parse_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in args:
        split = args.index("--")
        args, argv = args[:split], args[split + 1 :]
    else:
        argv = []
    parser = argparse.ArgumentParser(prog="python -m gateway.nanny")
    parser.add_argument("--socket", required=True, help="Unix socket to serve the gateway on")
    parser.add_argument("--status", required=True, help="JSON status file to keep up to date")
    parser.add_argument("--cwd", help="working directory of the command")
    parser.add_argument("--linger", type=float, default=DEFAULT_LINGER_S, help="seconds to wait")
    parser.add_argument("--log", help="file to append the nanny's own log to (else stderr)")
    # The command is a sandbox's (gateway.sandbox): --shield keeps the group's signals from
    # its monitor, --scope adds Landlock's signal and abstract-socket scopes.
    parser.add_argument("--shield", action="store_true", help="child ignores INT/TERM/HUP/QUIT")
    parser.add_argument("--scope", action="store_true", help="child is scoped by Landlock")
    parser.add_argument(
        "--files", action="store_true", help="child gets the files stream on fds 3 and 4"
    )
    opts = parser.parse_args(args)
    if not argv:
        parser.error("give the command to run after '--'")
    # Absolute, so nothing depends on the directory we happen to be in.
    for name in ("socket", "status", "log"):
        if getattr(opts, name):
            setattr(opts, name, os.path.abspath(getattr(opts, name)))
    return opts, argv


def main(args: list[str] | None = None) -> int:
    raw = sys.argv[1:] if args is None else args
    if raw == ["--spare"]:
        # A spare nanny, started ahead by the launcher so that a launch does not wait for an
        # interpreter to start: its arguments and the child's environment arrive as one JSON
        # line on stdin. EOF instead (the gateway went away) ends it quietly.
        line = sys.stdin.buffer.readline()
        if not line:
            return 0
        spec = json.loads(line)
        os.environ.clear()
        os.environ.update(spec["env"])
        raw = spec["args"]
    opts, argv = parse_args(raw)
    report_r, report_w = os.pipe()
    first = os.fork()
    if first == 0:
        # First child: a new session, then fork the nanny and exit, so the nanny is reparented
        # away from the gateway and no signal to the gateway's group or session reaches it.
        code = 1
        try:
            os.close(report_r)
            os.setsid()
            code = serve(opts, argv, report_w) if os.fork() == 0 else 0
        except BaseException:
            log_exception()
        finally:
            os._exit(code)
    os.close(report_w)
    report = b""
    while chunk := os.read(report_r, 4096):
        report += chunk
    os.waitpid(first, 0)
    kind, _, text = report.decode(errors="replace").partition(" ")
    if kind == "ok":
        print(text, flush=True)
        return 0
    print(text or "bitfusion: the process supervisor failed to start.", file=sys.stderr)
    return 1


def serve(opts: argparse.Namespace, argv: list[str], report_w: int) -> int:
    """The nanny proper: start the child, tell the launcher, run the loop."""

    def report(message: str) -> None:
        os.write(report_w, message.encode())
        os.close(report_w)

    _reset_signals()
    try:
        _detach_stdio(opts.log)
        listener = listen(opts.socket)
    except OSError as exc:
        report(f"err bitfusion: cannot listen on {opts.socket}: {exc.strerror or exc}.")
        return 1
    files = _files_pipes() if opts.files else None
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=opts.cwd,
            start_new_session=True,  # own session and group: signalled and mapped as one
            preexec_fn=_confiner(opts, files),
            pass_fds=wire.FILES_FDS if files else (),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        listener.close()
        try:
            os.unlink(opts.socket)
        except OSError:
            pass
        message = cannot_run(argv[0], opts.cwd, exc)
        log(message)
        report("err " + message)
        return 1
    log(f"started {child.pid}: {argv!r}")
    ours = None
    if files is not None:
        child_in, to_sshfs, from_sshfs, child_out = files
        os.close(child_in)
        os.close(child_out)
        ours = (to_sshfs, from_sshfs)
    nanny = Nanny(listener, child, argv, opts.socket, opts.status, opts.linger, ours)
    nanny.write_status()
    report(f"ok {os.getpid()}")
    return nanny.run()


def _files_pipes() -> tuple[int, int, int, int]:
    """(child reads, we write, we read, child writes): the files stream's two pipes, at fds
    of 10 and up, so that putting the child's ends at 3 and 4 overwrites none of them."""
    fds: list[int] = []
    for read, write in (os.pipe(), os.pipe()):
        for fd in (read, write):
            fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
            os.close(fd)
    return fds[0], fds[1], fds[2], fds[3]


def _confiner(
    opts: argparse.Namespace, files: tuple[int, int, int, int] | None = None
) -> Callable[[], None] | None:
    """What the child runs just before exec: confined as asked, or it does not start at all."""
    if not (opts.shield or opts.scope or files):
        return None

    def confine() -> None:
        if files is not None:  # the files stream where files_prelude.sh expects it
            os.dup2(files[0], wire.FILES_FDS[0])
            os.dup2(files[3], wire.FILES_FDS[1])
        if opts.shield:  # bwrap's monitor; `env --default-signal` resets them for the command
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(signum, signal.SIG_IGN)
        if opts.scope:
            landlock.scope()

    return confine


def cannot_run(program: str, cwd: str | None, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if cwd is not None and exc.filename == cwd:
            return f"cannot run {program!r} in {cwd!r}: {reason}"
        return f"cannot run {program!r}: {reason}"
    return f"cannot run {program!r}: {exc}"


def listen(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, readable and writable only by its owner."""
    try:
        os.unlink(path)  # a stale socket from a nanny that was killed
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 from the start, no window with a wider mode
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)  # the child gets the umask it was meant to
    sock.listen(4)
    return sock


def _reset_signals() -> None:
    # A gateway started in the background (nohup, `&`) hands down SIGINT/SIGQUIT/SIGHUP ignored,
    # and an ignored signal stays ignored across exec: the child would never see a forwarded
    # Ctrl-C. A Python handler is reset to the default on exec instead, so with these no-op
    # handlers the child starts with defaults while the nanny, which has no terminal and must
    # outlive stray signals, shrugs them off.
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, _shrug)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _shrug(signum: int, frame: object) -> None:
    pass


def _detach_stdio(log_path: str | None) -> None:
    # Let go of the launcher's pipes: it reads them to EOF. stderr becomes our log.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
