"""Raw Jupyter messages as they cross the shim: where a message's parts are among its frames.

The shim forwards frames untouched (the kernel signs with the frontend's key), so it reads
only what it must, and only frames the size of the delimiter are compared to find it: a big
output frame is never copied for that.
"""

from __future__ import annotations

import json
from typing import Any

from remoting.protocol import as_bytes

DELIMITER = b"<IDS|MSG>"
HEADER, PARENT, CONTENT = 2, 3, 5  # counted from the delimiter: signature 1, metadata 4


def delimiter_at(frames: list[Any]) -> int | None:
    """Index of the delimiter (after any routing ids), or None if it is not a Jupyter message."""
    for n, frame in enumerate(frames[:8]):  # routing ids, delimiter, signature, 4 parts
        if len(frame) == len(DELIMITER) and as_bytes(frame) == DELIMITER:
            return n
    return None


def json_parts(frames: list[Any], *parts: int) -> list[dict] | None:
    """The JSON parts of a message (HEADER, PARENT, CONTENT); None if it is not one."""
    at = delimiter_at(frames)
    if at is None:
        return None
    try:
        return [json.loads(as_bytes(frames[at + part])) for part in parts]
    except (ValueError, IndexError):
        return None


def header(frames: list[Any], part: int = HEADER) -> dict:
    """The header (or with ``part=PARENT`` the parent header); {} if not a message."""
    found = json_parts(frames, part)
    return found[0] if found else {}


def jupyter_parts(frames: list[Any]) -> dict | None:
    """Header, parent header and content of a message (None if not one)."""
    found = json_parts(frames, HEADER, PARENT, CONTENT)
    return dict(zip(("header", "parent", "content"), found, strict=True)) if found else None


def is_starting(frames: list[Any]) -> bool:
    """An iopub status "starting". Only a message whose topic says status (ipykernel's
    ``kernel.ID.status``) is parsed: outputs pass on this hot path untouched."""
    if not frames or len(frames[0]) > 128 or not as_bytes(frames[0]).endswith(b"status"):
        return False
    found = json_parts(frames, HEADER, CONTENT)
    return (
        found is not None
        and found[0].get("msg_type") == "status"
        and found[1].get("execution_state") == "starting"
    )
