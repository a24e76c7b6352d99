"""Jupyter kernels in a share: started like any process, with their ZMQ channels kept by
the gateway and carried to the client's shim as kernel_in/kernel_out messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import zmq.asyncio

from gateway.idle import IdleTracker
from gateway.kernels import (
    KernelChannels,
    channel_info,
    channel_kind,
    write_connection_file,
)
from gateway.ledger import Ledger, Process
from gateway.log_limit import LogLimit
from gateway.service.access import Access
from gateway.service.config import GatewayConfig
from gateway.service.grants import Grants
from gateway.service.outbox import Outbox
from gateway.service.processes import Processes
from gateway.service.state import KernelState, RequestError
from remoting import protocol, tokens
from remoting.protocol import Message

log = logging.getLogger("bitfusion.gateway")


def _remove_connection_file(path: Path) -> None:
    """A kernel's connection file and the folder of its own that its sandbox saw."""
    path.unlink(missing_ok=True)
    if path.parent.name == path.stem.removeprefix("kernel-"):
        shutil.rmtree(path.parent, ignore_errors=True)


@dataclasses.dataclass(eq=False)
class KernelSessions:
    cfg: GatewayConfig
    ctx: zmq.asyncio.Context
    ledger: Ledger
    access: Access
    processes: Processes
    grants: Grants
    out: Outbox
    idle: IdleTracker
    refusals: LogLimit
    run_dir: Path
    landlock_abi: int  # 0: no Landlock scopes, so no abstract sockets
    # kernel id -> its channels and the shim it answers to
    running: dict[str, KernelState] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.processes.ended.append(self.close_of)  # a kernel's process ends: so do its channels

    async def on_kernel_start(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict:
        share = self.access.share(msg["share_id"], tok)
        name = msg.get("kernel") or "python3"
        if name not in self.cfg.kernels:
            raise RequestError(
                protocol.E_NO_KERNEL,
                f"{self.cfg.hostname} offers no kernel {name!r}; it offers "
                f"{', '.join(sorted(self.cfg.kernels))}.",
            )
        files = self.processes.files_path(share, msg.get("files"))
        kernel_id = "k-" + os.urandom(6).hex()
        env_of = self.cfg.kernels[name]
        kind = channel_kind(env_of, self.cfg.kernel_channels, self.landlock_abi)
        conn_file, channels = write_connection_file(
            self.run_dir / "kernels" / kernel_id,
            kernel_id,
            msg["key"],
            msg["signature_scheme"],
            kind,
        )
        argv = [a.replace("{connection_file}", str(conn_file)) for a in env_of.argv]
        # BITFUSION_KERNEL_ID tells the %bitfusion magic that its kernel has a shim to ask.
        # JPY_PARENT_PID=1: the kernel's parent is the sandbox's init, which ipykernel does not
        # poll; without a parent it prints a note that Ctrl-C will not work (it does, through
        # the shim) and its in-sandbox connection file, both only noise in the user's log.
        env = self.grants.share_env(
            share,
            {
                **self.processes.passed_env(),
                "BITFUSION_KERNEL_ID": kernel_id,
                "JPY_PARENT_PID": "1",
            },
        )
        kernel = {
            "kernel_id": kernel_id,
            "connection_file": str(conn_file),
            "name": name,
            "channels": channels,
        }
        try:
            proc = await self.processes.launch(
                tok, share, argv, env, None, ident, kernel, files, opened=self.open
            )
        except RequestError:
            shutil.rmtree(conn_file.parent, ignore_errors=True)
            raise
        self.ledger.event("kernel_start", tok.user, share.id, f"{name} kernel {kernel_id}")
        return {"kernel_id": kernel_id, "proc_id": proc.id, "kernel": name}

    def open(self, proc: Process, subscriber: bytes | None) -> None:
        assert proc.kernel is not None
        kernel_id = proc.kernel["kernel_id"]

        async def forward(channel: str, frontend: bytes, frames: list[bytes]) -> None:
            state = self.running.get(kernel_id)
            if state is not None:
                self.idle.touch(state.share_id)
            if state is not None and state.subscriber is not None:
                await self.out.send(
                    state.subscriber,
                    protocol.encode(
                        "kernel_out",
                        frames,
                        kernel_id=kernel_id,
                        channel=channel,
                        ident=frontend.hex() if frontend else None,
                    ),
                )

        # Kept since the start (a ledger from before has only the file, which the kernel
        # may have rewritten since).
        info = proc.kernel.get("channels") or channel_info(
            json.loads(Path(proc.kernel["connection_file"]).read_text())
        )
        name = f"the {proc.kernel.get('name', 'python3')} kernel {kernel_id}"
        channels = KernelChannels(self.ctx, info, forward, name)
        self.running[kernel_id] = KernelState(
            kernel_id, proc.id, proc.share_id, channels, subscriber
        )

    def resubscribe(self, proc_id: str, ident: bytes) -> None:
        """The kernel of this process answers to the shim on ``ident`` now (it reconnected)."""
        for state in self.running.values():
            if state.proc_id == proc_id:
                state.subscriber = ident

    def close_all(self) -> None:
        """The gateway stops: its links to kernels close; the kernels go on in their shares."""
        for state in self.running.values():
            state.channels.close()

    def close_of(self, proc_id: str) -> None:
        for kernel_id, state in list(self.running.items()):
            if state.proc_id == proc_id:
                state.channels.close()
                del self.running[kernel_id]
                proc = self.ledger.processes.get(proc_id)
                if proc and proc.kernel:
                    _remove_connection_file(Path(proc.kernel["connection_file"]))

    async def on_kernel_in(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        state = self.running.get(msg["kernel_id"])
        if state is None:
            return
        share = self.ledger.shares.get(state.share_id)
        if share is None or (share.owner != tok.user and not tok.admin):
            self.access.denied(
                tok,
                state.share_id,
                "wrote to another's kernel",
                f"kernel {state.kernel_id} of share {state.share_id}",
                "dropped",
            )
            return
        if msg["channel"] not in protocol.KERNEL_REQUEST_CHANNELS:
            return
        try:
            frontend: bytes | None = bytes.fromhex(msg.get("ident") or "")
        except ValueError:
            frontend = None
        if frontend is None or len(frontend) > 255:  # a ZMQ routing id: 1 to 255 bytes, or none
            self.refusals.info(
                "malformed", "dropped kernel_in from user %s: a bad frontend ident", tok.user
            )
            return
        state.subscriber = ident
        self.idle.touch(state.share_id)
        await state.channels.send(msg["channel"], frontend, list(msg.payloads))
