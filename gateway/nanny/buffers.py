"""Bytes the nanny has yet to write to a non-blocking fd: to the gateway (an Outbox) and to
the child's inputs (a Sink each, which also puts what the gateway sends back in seq order)."""

from __future__ import annotations

import os
import selectors
from collections import deque
from collections.abc import Callable

from gateway.nanny.log import log
from gateway.nanny.wire import NannyMsg, encode_frame

STDIN_TELL_EVERY = 1024 * 1024  # well under the 8 MiB the client sends ahead (STDIN_WINDOW)


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

    def __init__(
        self,
        sel: selectors.BaseSelector,
        tell: Callable[[bytes], bool],
        stream: int,
        fd: int,
        close: Callable[[], None],
    ) -> None:
        self.sel = sel  # the nanny's, which waits for the fd to take more
        self.tell = tell  # a frame for the gateway; False when none is attached to hear it
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
        if not self.box and self.untold_bytes >= STDIN_TELL_EVERY:
            header = {"type": NannyMsg.STDIN_SEQ, "seq": self.seq}
            if self.stream:
                header["stream"] = self.stream
            if self.tell(encode_frame(header)):
                self.untold_bytes = 0

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
                self.sel.register(fd, selectors.EVENT_WRITE, lambda _mask: self.flush())
            else:
                self.sel.unregister(fd)

    def close(self) -> None:
        if self.fd is None:
            return
        if self.watched:
            self.sel.unregister(self.fd)
            self.watched = False
        self.box.clear()
        self.fd = None
        try:
            self._close_file()
        except OSError:
            pass  # EPIPE and the like: the child is not reading any more anyway
