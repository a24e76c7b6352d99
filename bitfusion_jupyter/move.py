"""A kernel's move, as the %bitfusion magic asks the shim for it: to another share, or back to
a local kernel. The magic's request, the shim's answer, and the move waiting for the asking
cell to end (its reply and its idle status both delivered) before the kernel behind the shim
changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import zmq

from bitfusion_jupyter import config, file_server, jupyter_frames, share_request, share_sidecar
from bitfusion_jupyter.kernel_backends import KernelBackend, LocalChild, RemoteKernel, start_kernel
from bitfusion_jupyter.pool import Grant, Pool, say
from remoting import tokens
from remoting.client import GatewayError

# An input request whose prompt starts with this comes from the %bitfusion magic for the shim.
SHIM_REQUEST = "\x00bitfusion-request "
# What a move means, said by the magic with each move. A frontend cannot rename a running
# kernel, so the label keeps the kernelspec's name; that is also what a restart brings back.
MOVE_NOTE = (
    "It restarts there: its variables are reset. The notebook's kernel label keeps naming "
    "the kernelspec it started with, which a restart goes back to; the status bar and the "
    "GPU pool panel show the share it has now."
)
ADOPT_ENV = "BITFUSION_ADOPT"  # a share a local kernel took and hands to the shim it becomes

Frames = tuple[str, bytes | None, list[Any]]  # (channel, routing id, frames)


def describe(grant: Grant, kernel: str) -> str:
    gpus = ", ".join(
        f"GPU {g['index']} {g['name']} ({g['mib']} MiB{', SIMULATED' if g['simulated'] else ''})"
        for g in grant.share["gpus"]
    )
    return f"{kernel} kernel in share {grant.share_id} on {grant.conn.address}: {gpus}"


def announce(grant: Grant, kernel: str, folder: str | os.PathLike[str] | None) -> str:
    """What the magic says of a move to ``grant``'s share (the shim's answer, or the magic
    itself for a local kernel it moves)."""
    where = f"\nIt works in your folder {folder} there." if folder is not None else ""
    return f"This kernel moves to the {describe(grant, kernel)}.{where}\n{MOVE_NOTE}"


def parse_request(prompt: str) -> dict[str, Any]:
    """The magic's request, from an input request's prompt that starts with SHIM_REQUEST;
    ValueError when it is not one the magic would send."""
    request = json.loads(prompt[len(SHIM_REQUEST) :])
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    return request


@dataclass
class PendingMove:
    """A move answered yes, done once the asking cell has ended. ``action``: "local", or
    "move" with the new share's ``grant`` (and its ``pool``), ``kernel`` and ``files``."""

    action: str
    grant: Grant | None = None
    pool: Pool | None = None
    kernel: str = "python3"
    files: file_server.Choice | None = None
    parent_id: str | None = None  # the cell that asked
    # Cells queued behind it (Run All), which the new kernel runs: {msg_id: (ident, frames)}.
    behind: dict[str, tuple[bytes, list[Any]]] = field(default_factory=dict)
    # What the old kernel says of those cells: shown only if the move fails.
    held: list[Frames] = field(default_factory=list)
    replied: bool = False
    idle: bool = False

    def after(self, asking: str | None, in_flight: dict[str, tuple[bytes, list[Any]]]) -> None:
        """Note the asking cell, and the cells sent after it that wait in the old kernel."""
        cells = list(in_flight)
        behind = cells[cells.index(asking) + 1 :] if asking in in_flight else []
        self.parent_id, self.behind, self.held = asking, {c: in_flight[c] for c in behind}, []

    def ends_cell(self, channel: str, frames: list[Any]) -> bool:
        """True once the asking cell has both its reply (shell) and its idle status (iopub)
        delivered. They reach us through different kernel sockets, in either order; moving
        on the first would lose the other, and leave the cell hanging."""
        parts = jupyter_frames.jupyter_parts(frames)
        if parts is None or parts["parent"].get("msg_id") != self.parent_id:
            return False
        kind = parts["header"].get("msg_type")
        if channel == "shell" and kind == "execute_reply":
            self.replied = True
        elif kind == "status" and parts["content"].get("execution_state") == "idle":
            self.idle = True
        return self.replied and self.idle

    def complete(
        self,
        old: KernelBackend,
        info: dict,
        session: Any,
    ) -> KernelBackend | None:
        """Start the kernel it moves to and end the old one; the new kernel, or None when it
        could not start (the old one stays, its share kept, and this move's share given back)."""
        connection_file = str(info["__file__"])
        old_grant = old.grant if isinstance(old, RemoteKernel) else None
        if self.action == "local":
            share_sidecar.remove(connection_file)  # the panel: no share any more
            new: KernelBackend = LocalChild(zmq.Context.instance(), info, session)
            if old_grant is not None:
                old_grant.release(timeout=3.0)  # ends the remote kernel
            if isinstance(old, RemoteKernel):
                old.close_files()
            say("the kernel now runs locally, on no share.")
            return new
        assert self.grant is not None and self.pool is not None and self.files is not None
        try:
            started, server, _, note = start_kernel(self.grant, info, self.kernel, self.files)
        except (GatewayError, file_server.FilesError) as exc:
            say(f"could not start the kernel on the new share ({exc}); staying where it was.")
            self.grant.release(timeout=3.0)
            self.pool.close()
            return None
        if old_grant is not None:
            old_grant.release(timeout=3.0)  # ends the old kernel
        elif isinstance(old, LocalChild):
            old.close()
        if isinstance(old, RemoteKernel):
            old.close_files()
        new = RemoteKernel(self.grant, started, connection_file, server, note)
        say(describe(self.grant, started["kernel"]))
        return new


def prepare(
    request: dict[str, Any],
    grant_now: Grant | None,
    files: file_server.Choice,
    server_list: str | None,
) -> tuple[dict[str, Any], PendingMove | None]:
    """The shim's answer to the magic's request (ok, and what to say or why not), and the
    move it starts. The new share is taken now, so a refusal is the magic's answer."""
    if request["action"] == "local":
        if grant_now is None:
            return {"ok": False, "error": "this kernel already runs locally."}, None
        return {
            "ok": True,
            "message": "This kernel moves back to a local kernel on the "
            "notebook's machine and gives its share back. It restarts: its variables "
            "are reset.",
        }, PendingMove("local")
    req = share_request.ShareRequest(
        gpus=request["request"]["gpus"],
        mib=request["request"].get("mib"),
        fraction=request["request"].get("fraction"),
        filters=request["request"].get("filters") or [],
        wait_s=request.get("wait_s", 0),
    )
    choice = files
    try:  # the magic's --files is read here, on the notebook's machine
        if request.get("no_files"):
            choice = file_server.Choice(None, "")
        elif request.get("files"):
            # A named folder that cannot go raises; "." may come back with a note, shown
            # in the new kernel's first cell.
            choice = file_server.choose(
                os.getcwd(), request["files"], False, hint=file_server.KERNEL_HINT
            )
    except file_server.FilesError as exc:
        return {"ok": False, "error": str(exc)}, None
    pool = Pool.from_config(request.get("servers") or server_list, zero_copy=True)
    try:
        grant = pool.allocate(req, release_on_exit=True)
    except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
        pool.close()
        return {"ok": False, "error": str(exc)}, None
    move = PendingMove("move", grant, pool, request.get("kernel") or "python3", choice)
    return {"ok": True, "message": announce(grant, move.kernel, choice.folder)}, move
