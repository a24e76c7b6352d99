"""Waiting for something to hold, or for the gateway to log it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WAIT_S = 20.0  # generous: two other engineers' tests share these 2 cores


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.2) -> bool:
    """True once ``predicate()`` holds; False if it still does not after ``timeout`` seconds
    (it is asked once more when the time is up)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


def wait_for_log(gateway: Any, *words: str, timeout: float = WAIT_S) -> str:
    """The first line of the gateway's log that holds every one of ``words``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in gateway.log().splitlines():
            if all(w in line for w in words):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {words} in:\n{gateway.log()[-4000:]}")
        time.sleep(0.1)
