"""Policing's notices to a kernel on a share, shown where a notebook's user looks.

The gateway tells the shim when the kernel's share goes over its memory (a warning with the
seconds left) and when it stops the processes over it. The shim says so in the running cell's
output, as stderr (every frontend shows it, nbclient keeps it), and when the kernel itself was
stopped it ends that cell with an error naming the reason instead of leaving "the kernel
appears to have died" unexplained. Each message carries its numbers in its metadata under
``bitfusion``, which the JupyterLab extension turns into a notification.
"""

from __future__ import annotations

import time
from typing import Any

from bitfusion_jupyter.runner import police_reason
from remoting.protocol import Message

METADATA_KEY = "bitfusion"
ENAME = "GPUShareExceeded"
_FIELDS = ("action", "share_id", "gpu_index", "used_mib", "limit_mib", "stop_in_s")


def fields(notice: Message) -> dict[str, Any]:
    """The notice as JSON: its sentence, its numbers, and when it came."""
    out = {k: notice.get(k) for k in _FIELDS if notice.get(k) is not None}
    return {**out, "message": notice["message"], "at": time.time()}


def in_cell(session: Any, parent: dict, notice: Message) -> list[Any]:
    """The iopub frames that show the notice in the cell ``parent`` (a request's header)."""
    text = f"bitfusion: {notice['message']}\n"
    msg = session.msg(
        "stream",
        {"name": "stderr", "text": text},
        parent=parent,
        metadata={METADATA_KEY: {"notice": fields(notice)}},
    )
    return session.serialize(msg, ident=b"stream.stderr")


def stopped_sentence(notice: Message, code: int) -> str:
    return (
        f"The gateway's policing stopped this kernel: {police_reason(notice)} "
        f"(exit status {code}). Its variables are lost; the kernel restarts on a new share. "
        "Free GPU memory sooner, or ask for more with `%bitfusion -m MIB`."
    )


def stopped_note(notice: Message, code: int) -> dict[str, Any]:
    """What is kept, and shown, of a kernel that policing stopped."""
    return {**fields(notice), "action": "kernel_stopped", "message": stopped_sentence(notice, code)}


def kernel_stopped(
    session: Any,
    cell: tuple[bytes, dict] | None,
    notice: Message,
    code: int,
    note: dict[str, Any] | None = None,
) -> tuple[list[list[Any]], tuple[bytes, list[Any]] | None]:
    """The iopub messages (an error, then idle) and the shell reply that end the running
    ``cell`` (its routing id and header) of a kernel that policing stopped (or, with its own
    ``note``, whose share went back to the pool)."""
    note = note or stopped_note(notice, code)
    evalue = note["message"]
    meta = {METADATA_KEY: {"notice": note}}
    parent = cell[1] if cell else {}
    error = {"ename": ENAME, "evalue": evalue, "traceback": [f"\x1b[0;31m{ENAME}\x1b[0m: {evalue}"]}
    iopub = [
        session.serialize(
            session.msg("error", error, parent=parent, metadata=meta), ident=b"error"
        ),
        session.serialize(
            session.msg("status", {"execution_state": "idle"}, parent=parent), ident=b"status"
        ),
    ]
    if cell is None:
        return iopub, None
    reply = session.msg(
        "execute_reply",
        {"status": "error", "execution_count": None, **error},
        parent=parent,
        metadata=meta,
    )
    return iopub, (cell[0], session.serialize(reply))


def idle_note(notice: Message) -> dict[str, Any]:
    """What is kept, and shown, of a kernel whose idle share the gateway reclaimed."""
    return {
        **fields(notice),
        "action": "idle",
        "message": f"{notice['message']} This kernel now runs locally, on no share, with its "
        "variables reset; `%bitfusion -m MIB` takes a share again.",
    }
