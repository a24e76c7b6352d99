"""Framing between the gateway and a nanny over the nanny's Unix socket.

A frame is ``!II`` (header length, payload length), a UTF-8 JSON object header with a "type"
key, then the raw payload. Stdlib only and cheap to import: the nanny imports it at start-up.
"""

from __future__ import annotations

import json
import struct
from enum import StrEnum  # enum is loaded anyway (socket, signal): free for the nanny

TYPE_CHECKING = False  # typing is slow to import and only a type checker needs it here
if TYPE_CHECKING:
    from typing import Any

PREFIX = struct.Struct("!II")
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 16 * 1024 * 1024


class NannyMsg(StrEnum):
    """Every "type" of a frame between the gateway and a nanny; a str, so it goes on the wire
    and compares with a decoded header's plain string as is."""

    # gateway -> nanny
    ATTACH = "attach"  # {out_from}: send output from this seq on, then stream live
    ACK = "ack"  # {seq}: the client has everything up to seq; forget it
    STDIN = "stdin"  # {seq, stream?} + bytes for the child's stdin (stream 3: the files stream)
    STDIN_CLOSE = "stdin_close"  # {seq, stream?}: close that input (shares its seq space)
    SIGNAL = "signal"  # {signum}: deliver to the child's process group
    TERMINATE = "terminate"  # {grace_s}: SIGTERM the group, SIGKILL after grace

    # nanny -> gateway
    ATTACHED = "attached"  # {child_pid, stdin_seq, files_seq?, running, exit_code}
    STDIN_SEQ = "stdin_seq"  # {seq, stream?}: that input up to seq is written (or moot): forget it
    OUT = "out"  # {seq, stream: 1|2|3} + bytes
    EXIT = "exit"  # {seq, code}: always the last seq


STDOUT = 1
STDERR = 2
# The SFTP stream of the client's folder, both ways (out: from sshfs; stdin: to it); the
# child gets it on these fds (gateway/files_prelude.sh).
FILES = 3
FILES_FDS = (3, 4)  # (sshfs reads, sshfs writes)


class WireError(ValueError):
    """The peer sent something that is not a valid frame."""


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise WireError(f"header of {len(head)} bytes is over the {MAX_HEADER} byte limit")
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD} byte limit")
    return PREFIX.pack(len(head), len(payload)) + head + payload


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back the complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        """Add ``data``; return every frame now complete, in order. Raises WireError."""
        self._buf += data
        frames: list[tuple[dict[str, Any], bytes]] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= PREFIX.size:
            head_len, payload_len = PREFIX.unpack_from(buf, pos)
            # Check the lengths before waiting for the body, so a bad peer cannot make us buffer.
            if head_len > MAX_HEADER:
                raise WireError(f"header of {head_len} bytes is over the {MAX_HEADER} byte limit")
            if payload_len > MAX_PAYLOAD:
                raise WireError(
                    f"payload of {payload_len} bytes is over the {MAX_PAYLOAD} byte limit"
                )
            end = pos + PREFIX.size + head_len + payload_len
            if len(buf) < end:
                break
            head_end = pos + PREFIX.size + head_len
            frames.append(
                (_parse_header(bytes(buf[pos + PREFIX.size : head_end])), bytes(buf[head_end:end]))
            )
            pos = end
        del buf[:pos]
        return frames


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WireError("header is not a JSON object with a string 'type'")
    return header


def int_field(header: dict[str, Any], key: str) -> int:
    """``header[key]`` as an int, or WireError (bool is not an int here)."""
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{header.get('type')!r} needs an integer {key!r}")
    return value


def float_field(header: dict[str, Any], key: str) -> float:
    value = header.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise WireError(f"{header.get('type')!r} needs a number {key!r}")
    return float(value)
