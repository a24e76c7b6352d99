"""The plain local ipykernel that a shim becomes after `%bitfusion --local`.

The frontend does not know its kernel process was replaced: its sockets just reconnect to
the new one's ports, each on its own retry timer. If the next cell's request gets in before
the frontend's iopub subscription, the kernel runs it and publishes its output and its idle
status to nobody, and a client that waits for idle (nbclient, papermill) waits forever. So
this kernel holds its first request until an iopub subscriber has arrived, or a few seconds
have passed (nobody may be listening).

    python -m bitfusion_jupyter.local_kernel -f CONNECTION_FILE [ipykernel options]
"""

from __future__ import annotations

import threading
import time
from typing import Any

SUBSCRIBER_WAIT_S = 5.0
_subscribed = threading.Event()


def _watch_subscriptions() -> bool:
    """Note iopub subscriptions as they come; False on an ipykernel that cannot tell."""
    from ipykernel.iostream import IOPubThread

    original = getattr(IOPubThread, "_handle_subscription", None)
    if original is None:  # ipykernel < 7 publishes on PUB, which hears no subscriptions
        return False

    def handle(self: Any, frames: list[Any]) -> None:
        original(self, frames)
        if any(bytes(frame)[:1] == b"\x01" for frame in frames):
            _subscribed.set()

    IOPubThread._handle_subscription = handle  # before the app builds its IOPub thread
    return True


def _hold_start_until_subscribed(can_tell: bool) -> None:
    from ipykernel.kernelapp import IPKernelApp

    original = IPKernelApp.start

    def start(self: IPKernelApp) -> None:
        # The IOPub thread already runs (initialize() started it); shell requests wait in
        # their socket meanwhile, so nothing is lost, only held.
        if can_tell:
            _subscribed.wait(SUBSCRIBER_WAIT_S)
        else:
            time.sleep(1.0)  # a few of the frontend's reconnect intervals
        original(self)

    IPKernelApp.start = start


def main() -> None:
    _hold_start_until_subscribed(_watch_subscriptions())
    from ipykernel.kernelapp import launch_new_instance

    launch_new_instance()


if __name__ == "__main__":
    main()
