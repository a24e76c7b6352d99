"""Refusals are logged, but a flood of them must not fill the disk.

Every refused message and failed handshake gets a log line, up to ``burst`` lines per kind in
``window_s``; past that the lines are only counted, and one line says how many were left out
when the window ends. A kind is a short key (``handshake``, ``malformed``, ``refused:alice``),
so one noisy client does not hide what others do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_KINDS = 1000  # bounded: made-up kinds (user names from valid tokens only) cannot grow it


@dataclass
class _Window:
    start: float
    lines: int = 0
    left_out: int = 0


class LogLimit:
    def __init__(
        self,
        logger: logging.Logger,
        burst: int = 100,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log = logger
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def warning(self, kind: str, fmt: str, *args: object) -> None:
        self.line(logging.WARNING, kind, fmt, *args)

    def info(self, kind: str, fmt: str, *args: object) -> None:
        self.line(logging.INFO, kind, fmt, *args)

    def line(self, level: int, kind: str, fmt: str, *args: object) -> None:
        now = self.clock()
        w = self._windows.get(kind)
        if w is not None and now - w.start >= self.window_s:
            self._close(kind, w)
            w = None
        if w is None:
            if len(self._windows) >= MAX_KINDS:
                self.flush(force=True)
            w = self._windows[kind] = _Window(now)
        if w.lines < self.burst:
            w.lines += 1
            self.log.log(level, fmt, *args)
        else:
            w.left_out += 1

    def flush(self, force: bool = False) -> None:
        """Close the windows that are over (all with ``force``), saying what they left out."""
        now = self.clock()
        for kind, w in list(self._windows.items()):
            if force or now - w.start >= self.window_s:
                self._close(kind, w)

    def _close(self, kind: str, w: _Window) -> None:
        del self._windows[kind]
        if w.left_out:
            self.log.warning(
                "%d more %s lines in %.0f s were not logged (at most %d a window)",
                w.left_out,
                kind,
                self.window_s,
                self.burst,
            )
