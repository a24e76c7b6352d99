"""When each share was last in use, for the dashboard's idle column and the idle timeout.

A share is in use while Jupyter messages pass to or from its kernels, while its commands
read input or write output, while a command (not a kernel) runs in it, and while its
processes hold memory on a GPU that is computing. A notebook left open and untouched, or a
share held with `request_gpus` and nothing running, goes idle; an admin's idle timeout then
reclaims it for others.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from gateway.ledger import Share


class IdleTracker:
    def __init__(self, timeout_s: float | None = None) -> None:
        self._last: dict[str, float] = {}
        self.timeout_s = timeout_s  # the admin's idle timeout (None: off)

    def touch(self, share_id: str, now: float | None = None) -> None:
        self._last[share_id] = time.time() if now is None else now

    def idle_s(self, share: Share, now: float | None = None) -> float:
        now = time.time() if now is None else now
        return max(0.0, now - self._last.get(share.id, share.created))

    def forget(self, share_id: str) -> None:
        self._last.pop(share_id, None)

    def overdue(self, shares: Iterable[Share], now: float | None = None) -> list[Share]:
        """The shares idle for longer than the timeout (none when it is off)."""
        timeout_s = self.timeout_s
        if not timeout_s:
            return []
        return [s for s in shares if self.idle_s(s, now) > timeout_s]
