"""The wire protocol between `bitfusion` clients and gateways, written down once.

Every message is one ZMQ multipart message: ``[MAGIC, header, *payload]``. The header is a
UTF-8 JSON object whose ``type`` names one of the messages in :data:`MESSAGES`; payload frames
carry raw bytes (stdin, stdout, Jupyter frames) so nothing is re-serialised on the way.
Both ends build messages with :func:`encode` and read them with :func:`decode`, which checks
every field against this table, so a malformed or hostile message becomes a
:class:`ProtocolError` with one sentence, never an exception deep in a handler.

A payload over :data:`SPLIT_BYTES` is sent as several frames; the header's ``split`` lists
how many frames each payload took, and :func:`decode` joins them, so handlers never see it.

Requests (client to gateway) carry ``token`` and ``id``; the gateway answers each with a
``reply`` holding the same ``id``. One-way messages (stdin, acks, signals) carry ``token`` too,
because the gateway authenticates every message, not a connection.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from remoting.messages import ErrorCode

MAGIC = b"BF1"
VERSION = "0.1.0"  # the package's
# The protocol's own version, in the header of every message (``protocol``; absent means 1).
# A peer of the same version is held to this table exactly; from a peer of another version,
# fields this table does not know are dropped, not refused, so a pool can be upgraded one
# gateway (or client) at a time. A later version may add optional fields and new messages,
# never a required field to a message both know.
PROTOCOL_VERSION = 1
DEFAULT_PORT = 56001
DASHBOARD_PORT = 54000  # each gateway's web dashboard and /metrics, as in Bitfusion
# A kernel's channels that a frontend writes to (kernel_in); iopub only comes out.
KERNEL_REQUEST_CHANNELS = ("shell", "control", "stdin")
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024  # a Jupyter output or comm buffer can be large
# A larger payload travels as frames of this size. CurveZMQ seals each frame on its own, so
# the sender's I/O thread encrypts one piece while the receiver's decrypts the one before,
# instead of the two taking turns over the whole payload (bench/kernels.py: 64 MiB output).
SPLIT_BYTES = 1024 * 1024


def renew_every(lease_s: float) -> float:
    """How often a client speaks up for something the gateway keeps for ``lease_s`` seconds
    of silence (a share's lease, a place in the queue): four chances before it is lost."""
    return max(0.2, min(5.0, lease_s / 4))


class ProtocolError(ValueError):
    """A message that does not follow this protocol; the text is one sentence."""


# Field kinds. ``int`` never accepts bool (JSON true is not a count); ``num`` accepts int or float.
STR, INT, NUM, BOOL, LIST, DICT = "str", "int", "num", "bool", "list", "dict"


@dataclass(frozen=True)
class Spec:
    """What one message type carries: required and optional fields with their kinds."""

    required: dict[str, str] = field(default_factory=dict)
    optional: dict[str, str] = field(default_factory=dict)
    request: bool = False  # the gateway answers it with a reply
    authenticated: bool = True  # carries a token
    payloads: tuple[int, int] = (0, 0)  # least and most payload frames


_REQ = {"token": STR, "id": INT}
_ONEWAY = {"token": STR}

MESSAGES: dict[str, Spec] = {
    # --- requests, client -> gateway ---
    "hello": Spec(_REQ, {"client_version": STR, "client_host": STR}, request=True),
    "list_gpus": Spec(_REQ, request=True),
    "smi": Spec(_REQ, request=True),
    "allocate": Spec(
        {**_REQ, "gpus": INT},
        {
            "mib": INT,
            "fraction": NUM,
            "filters": LIST,
            "wait_s": NUM,
            "client_host": STR,
            "release_on_exit": BOOL,
        },
        request=True,
    ),
    # Renews the lease; ``attach`` ([[proc_id, out_from], ...]) re-subscribes the sender to
    # those processes' output (and kernel channels) after a reconnect or a gateway restart.
    "renew": Spec({**_REQ, "share_id": STR}, {"attach": LIST}, request=True),
    "release": Spec({**_REQ, "share_id": STR}, request=True),
    "list_shares": Spec(_REQ, request=True),
    # ``files``: the client's folder (an absolute path), mounted at that path in the share
    # and made the working directory; its SFTP bytes come as the process's stream 3.
    "spawn": Spec(
        {**_REQ, "share_id": STR, "argv": LIST},
        {"cwd": STR, "env": DICT, "files": STR},
        request=True,
    ),
    "register_pid": Spec({**_REQ, "share_id": STR, "pid": INT}, request=True),
    # Start a Jupyter kernel inside a share. ``key`` is the HMAC key of the client's
    # connection file, so Jupyter frames pass through both hops untouched and still verify.
    "kernel_start": Spec(
        {**_REQ, "share_id": STR, "key": STR, "signature_scheme": STR},
        {"kernel": STR, "files": STR},  # files: as spawn's
        request=True,
    ),
    # One Jupyter message on one of a kernel's channels (shell, control, stdin, iopub), its
    # frames as payloads. ``ident`` (hex) names the frontend socket it came from or goes to.
    "kernel_in": Spec(
        {**_ONEWAY, "kernel_id": STR, "channel": STR}, {"ident": STR}, payloads=(1, 4096)
    ),
    # The dashboard's: GPU history (``range`` "hour" or "day"), and admin actions.
    "history": Spec({**_REQ, "range": STR}, request=True),
    "drain": Spec({**_REQ, "index": INT, "drain": BOOL}, request=True),  # admin
    "set_idle_timeout": Spec({**_REQ, "seconds": NUM}, request=True),  # admin; 0 turns it off
    "revoke": Spec({**_REQ, "nonce": STR}, request=True),  # admin or minter: a token's nonce
    # admin or minter (a JupyterHub): a token for ``user``; a minter's must expire, and is a
    # user's token, never an admin's
    "mint": Spec({**_REQ, "user": STR}, {"expires_s": NUM, "admin": BOOL}, request=True),
    # --- one-way, client -> gateway ---
    "attach": Spec({**_ONEWAY, "proc_id": STR, "out_from": INT}),
    # ``stream`` 3: the files stream to the share's sshfs (its own seq space); else stdin.
    "stdin": Spec({**_ONEWAY, "proc_id": STR, "seq": INT}, {"stream": INT}, payloads=(1, 1)),
    "stdin_close": Spec({**_ONEWAY, "proc_id": STR, "seq": INT}, {"stream": INT}),
    "signal": Spec({**_ONEWAY, "proc_id": STR, "signum": INT}),
    "ack": Spec({**_ONEWAY, "proc_id": STR, "seq": INT}),
    # A queued allocate's client is still there (every renew_every(lease_s)), or gives up;
    # giving up is answered like the allocate it ends (E_GAVE_UP, or the grant had it won).
    # ``ticket`` comes with "queued"; it outlives a reconnect, which changes the connection.
    "waiting": Spec({**_ONEWAY, "ticket": STR}, {"give_up": BOOL}),
    # --- gateway -> client ---
    # ``server``, with an error: the gateway's name, which its sentence uses; the client puts
    # the address the user configured beside it.
    "reply": Spec(
        {"id": INT, "ok": BOOL},
        {"error": STR, "code": STR, "data": DICT, "server": STR},
        authenticated=False,
    ),
    # ``lease_s``: how long the gateway keeps a waiter it does not hear from.
    "queued": Spec(
        {"id": INT, "position": INT},
        {"detail": STR, "ticket": STR, "lease_s": NUM},
        authenticated=False,
    ),
    "out": Spec({"proc_id": STR, "seq": INT, "stream": INT}, authenticated=False, payloads=(1, 1)),
    "exit": Spec({"proc_id": STR, "seq": INT, "code": INT}, authenticated=False),
    # News of a process's stdin from its nanny. ``resend``: it has just (re)attached and holds
    # every chunk up to ``seq``, so the client sends the later ones again (one may have died
    # with a gateway); else it has written every chunk up to ``seq``, which the client forgets.
    "stdin_seq": Spec(
        {"proc_id": STR, "seq": INT, "resend": BOOL}, {"stream": INT}, authenticated=False
    ),
    "kernel_out": Spec(
        {"kernel_id": STR, "channel": STR}, {"ident": STR}, authenticated=False, payloads=(1, 4096)
    ),
    # Policing's word to a share's owner (``action`` "warn" or "stop"), with its numbers, so
    # a client can show it where the user looks; ``stop_in_s``: the seconds left, when a stop
    # will follow the warning.
    "notice": Spec(
        {"message": STR},
        {
            "share_id": STR,
            "proc_id": STR,
            "action": STR,
            "gpu_index": INT,
            "used_mib": INT,
            "limit_mib": INT,
            "stop_in_s": NUM,
        },
        authenticated=False,
    ),
}

# Error codes a reply may carry (remoting.messages.ErrorCode); these names stay for callers.
E_AUTH = ErrorCode.AUTH
E_DENIED = ErrorCode.DENIED
E_NOT_FOUND = ErrorCode.NOT_FOUND
E_NO_FIT = ErrorCode.NO_FIT
E_NEVER_FITS = ErrorCode.NEVER_FITS
E_GAVE_UP = ErrorCode.GAVE_UP
E_BAD_REQUEST = ErrorCode.BAD_REQUEST
E_SPAWN = ErrorCode.SPAWN
E_NO_FILES = ErrorCode.NO_FILES
E_NO_KERNEL = ErrorCode.NO_KERNEL
E_INTERNAL = ErrorCode.INTERNAL

_PY_KINDS: dict[str, tuple[type, ...]] = {
    STR: (str,),
    INT: (int,),
    NUM: (int, float),
    BOOL: (bool,),
    LIST: (list,),
    DICT: (dict,),
}


@dataclass(frozen=True)
class Message:
    """A decoded message: its type, its header fields, and its payload frames (bytes, or
    zmq.Frame where received without copying or joined from pieces: see :func:`as_bytes`).

    Payloads that came in pieces are joined when first read, not when decoded: the gateway
    reads them only once the sender's token is checked, so a peer without a valid token
    cannot make it copy hundreds of MiB."""

    type: str
    header: dict[str, Any]
    frames: tuple[Any, ...] = ()  # the payload frames as they came
    split: tuple[int, ...] | None = None  # how many frames each payload took, if cut

    @functools.cached_property
    def payloads(self) -> tuple[Any, ...]:
        return self.frames if self.split is None else _joined(self.split, self.frames)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def _check_kind(msg_type: str, name: str, kind: str, value: Any) -> None:
    ok = isinstance(value, _PY_KINDS[kind]) and not (kind in (INT, NUM) and isinstance(value, bool))
    if not ok:
        raise ProtocolError(
            f"field {name!r} of a {msg_type!r} message must be {kind}, not {type(value).__name__}."
        )


ENVELOPE = frozenset({"type", "protocol"})  # fields of every message, whatever its type


def peer_version(header: Mapping[str, Any]) -> int:
    """The protocol version the sender of ``header`` speaks (1 if it does not say)."""
    version = header.get("protocol", 1)
    if type(version) is not int or version < 1:
        raise ProtocolError("field 'protocol' must be a protocol version, a whole number from 1.")
    return version


def validate(header: dict[str, Any], n_payloads: int) -> Spec:
    """Check a header (and its payload count) against the table; return its Spec. Fields a
    peer of another protocol version added are removed from ``header``."""
    msg_type = header.get("type")
    if not isinstance(msg_type, str) or msg_type not in MESSAGES:
        raise ProtocolError(f"unknown message type {msg_type!r}.")
    spec = MESSAGES[msg_type]
    for name, kind in spec.required.items():
        if name not in header:
            raise ProtocolError(f"a {msg_type!r} message lacks its {name!r} field.")
        _check_kind(msg_type, name, kind, header[name])
    for name, kind in spec.optional.items():
        if name in header and header[name] is not None:
            _check_kind(msg_type, name, kind, header[name])
    version = peer_version(header)
    unknown = set(header) - set(spec.required) - set(spec.optional) - ENVELOPE
    if unknown and version == PROTOCOL_VERSION:
        raise ProtocolError(f"a {msg_type!r} message has unknown fields {sorted(unknown)}.")
    for name in unknown:  # a peer of another version: what it added is not for us
        del header[name]
    low, high = spec.payloads
    if not low <= n_payloads <= high:
        raise ProtocolError(
            f"a {msg_type!r} message must carry {low} to {high} payload frames, not {n_payloads}."
        )
    return spec


def encode(msg_type: str, payloads: Sequence[Any] = (), **fields: Any) -> list[Any]:
    """Build the frames of one message; raises ProtocolError when the fields do not fit.

    Payloads may be bytes or zmq.Frame objects; a large one is cut into zmq.Frames that view
    it, which pyzmq sends without copying (it copies plain bytes and memoryviews).
    """
    header = {
        "type": msg_type,
        "protocol": PROTOCOL_VERSION,
        **{k: v for k, v in fields.items() if v is not None},
    }
    validate(header, len(payloads))
    frames = list(payloads)
    if any(len(p) > SPLIT_BYTES for p in payloads):
        frames, header["split"] = [], []
        for p in payloads:
            if len(p) <= SPLIT_BYTES:
                pieces = [p]
            else:
                view = memoryview(p)
                pieces = [
                    zmq.Frame(view[i : i + SPLIT_BYTES], copy=False)
                    for i in range(0, len(view), SPLIT_BYTES)
                ]
            frames.extend(pieces)
            header["split"].append(len(pieces))
    return [MAGIC, json.dumps(header, separators=(",", ":")).encode(), *frames]


def as_bytes(frame: Any) -> bytes:
    """A frame's bytes, whether it came as bytes or as a zmq.Frame (received with copy=False)."""
    return frame if isinstance(frame, bytes) else frame.bytes


def _unicode(header: dict[str, Any]) -> bool:
    """False when a string holds a lone surrogate ("\\ud800" is valid JSON, but no text: it
    breaks UTF-8 wherever it goes next, a database, a log, a file name). Only asked when the
    raw header has an escape or such a byte, so plain ASCII headers cost nothing more."""
    try:
        json.dumps(header, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def decode(frames: Sequence[Any]) -> Message:
    """Read the frames of one message; anything malformed raises ProtocolError.

    Frames may be bytes or zmq.Frame objects: payloads are kept as they came, so a large
    Jupyter message is forwarded without being copied into Python bytes on the way.
    """
    if len(frames) < 2 or as_bytes(frames[0]) != MAGIC:
        raise ProtocolError("not a bitfusion message (bad magic or too few frames).")
    raw = as_bytes(frames[1])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {len(raw)} bytes is over {MAX_HEADER_BYTES}.")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"message header is not JSON ({exc.__class__.__name__}).") from None
    except RecursionError:  # json nests by recursion: '[' * 30000 fits in the size limit
        raise ProtocolError("message header is nested too deeply.") from None
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object.")
    if (b"\\u" in raw or b"\xed" in raw) and not _unicode(header):
        raise ProtocolError("message header holds a string that is not Unicode text.")
    split = header.pop("split", None)
    payloads = tuple(frames[2:])
    if split is None:
        for p in payloads:
            if len(p) > MAX_PAYLOAD_BYTES:
                raise ProtocolError(f"payload of {len(p)} bytes is over {MAX_PAYLOAD_BYTES}.")
        validate(header, len(payloads))
        return Message(header["type"], header, payloads)
    _check_split(split, len(payloads))  # all checked here; the join waits for a reader
    validate(header, len(split))
    _check_sizes(split, payloads)
    return Message(header["type"], header, payloads, tuple(split))


def _check_split(split: Any, n_frames: int) -> None:
    if (
        not isinstance(split, list)
        or not all(type(n) is int and n >= 1 for n in split)
        or sum(split) != n_frames
    ):
        raise ProtocolError("message header's 'split' does not match its payload frames.")


def _groups(split: Sequence[int], frames: Sequence[Any]) -> list[Sequence[Any]]:
    """The frames of each payload, as the header's ``split`` counts them."""
    bounds = [0, *itertools.accumulate(split)]
    return [frames[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _check_sizes(split: Sequence[int], frames: Sequence[Any]) -> None:
    for group in _groups(split, frames):
        size = sum(len(f) for f in group)
        if size > MAX_PAYLOAD_BYTES:
            raise ProtocolError(f"payload of {size} bytes is over {MAX_PAYLOAD_BYTES}.")


def _joined(split: Sequence[int], frames: Sequence[Any]) -> tuple[Any, ...]:
    """Join the frames that :func:`encode` cut into the payloads they were (checked by
    :func:`decode` already). Joined into a Frame, so that it is forwarded (shim to
    frontend) without another copy."""
    return tuple(
        group[0] if len(group) == 1 else zmq.Frame(b"".join(map(memoryview, group)), copy=False)
        for group in _groups(split, frames)
    )


def jupyter_endpoint(info: Mapping[str, Any], channel: str) -> str:
    """The ZMQ address of a kernel's channel, as a Jupyter connection file spells it."""
    port = info[f"{channel}_port"]
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{port}"
    return f"tcp://{info['ip']}:{port}"
