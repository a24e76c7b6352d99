"""The nanny's own log: stderr, which start-up points at the ``--log`` file."""

from __future__ import annotations

import os
import sys
import time


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
