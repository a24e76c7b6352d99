"""The nanny, the supervisor of each process in a share, and the gateway's side of it.

The nanny runs under ``python -I -S`` and imports this package (gateway.nanny.launcher's _BOOT
does ``from gateway.nanny import main``), so this imports only its stdlib-only modules (process,
startup, wire). The gateway's side, link, launcher and relay, needs asyncio: import them by name.
"""

from gateway.nanny.process import MAX_UNACKED, READ_CHUNK
from gateway.nanny.startup import main

__all__ = ["MAX_UNACKED", "READ_CHUNK", "main"]
