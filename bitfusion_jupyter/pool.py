"""The client's view of the pool: the configured gateways, asked together.

Asking every server is done in threads, so one unreachable server costs one timeout, not one
per server. Allocation tries servers in the configured order and takes the first grant; with
``--wait`` it queues on the first server that could ever hold the share.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bitfusion_jupyter import config
from bitfusion_jupyter.share_request import ShareRequest
from remoting import protocol
from remoting.client import DEFAULT_TIMEOUT_S, GatewayConnection, GatewayError


@dataclass
class Grant:
    """A share granted by one gateway, with the connection that holds it."""

    conn: GatewayConnection
    share: dict[str, Any]
    lease_s: float
    env: dict[str, str] = field(default_factory=dict)  # the share's own variables

    @property
    def share_id(self) -> str:
        return self.share["share_id"]

    def release(self, timeout: float) -> None:
        """Give the share back; an unreachable gateway frees it when the lease runs out."""
        try:
            self.conn.request("release", share_id=self.share_id, timeout=timeout)
        except GatewayError:
            pass


class Pool:
    def __init__(
        self, servers: list[str], timeout: float = DEFAULT_TIMEOUT_S, zero_copy: bool = False
    ):
        self.servers = servers
        self.timeout = timeout
        self.zero_copy = zero_copy  # see GatewayConnection
        self._conns: dict[str, GatewayConnection] = {}

    @classmethod
    def from_config(
        cls, server_list: str | None, timeout: float = DEFAULT_TIMEOUT_S, zero_copy: bool = False
    ) -> Pool:
        return cls(config.servers(server_list).servers, timeout, zero_copy)

    def connect(self, server: str) -> GatewayConnection:
        if server not in self._conns:
            self._conns[server] = GatewayConnection(
                server, config.token_for(server), self.timeout, zero_copy=self.zero_copy
            )
        return self._conns[server]

    def ask_all(self, msg_type: str, **fields: Any) -> list[tuple[str, dict | GatewayError]]:
        """Send one request to every server at once; each answer or its error, in order."""

        def ask(server: str) -> dict | GatewayError:
            try:
                return self.connect(server).request(msg_type, **fields)
            except GatewayError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=min(16, len(self.servers)) or 1) as ex:
            return list(zip(self.servers, ex.map(ask, self.servers), strict=True))

    def allocate(
        self,
        req: ShareRequest,
        release_on_exit: bool,
        on_queue: Callable[[str], None] | None = None,
    ) -> Grant:
        """A share from the first server that grants it; raises GatewayError otherwise."""
        fields = {
            **req.wire(),
            "client_host": socket.gethostname(),
            "release_on_exit": release_on_exit,
        }
        errors: list[GatewayError] = []
        for server in self.servers:
            try:
                data = self.connect(server).request("allocate", **fields)
                return Grant(
                    self.connect(server), data["share"], data["lease_s"], data.get("env", {})
                )
            except GatewayError as exc:
                errors.append(exc)
        could_fit = [e for e in errors if e.code == protocol.E_NO_FIT]
        if req.wait_s > 0 and could_fit:
            server = could_fit[0].server
            if on_queue:
                on_queue(f"Waiting up to {req.wait_s:g} s for {req.describe()} on {server}...")

            def progress(msg: protocol.Message) -> None:
                if on_queue:
                    on_queue(f"Position {msg['position']} in the queue of {server}.")

            conn = self.connect(server)
            data = conn.request(
                "allocate",
                timeout=req.wait_s + self.timeout,
                on_event=progress,
                **{**fields, "wait_s": req.wait_s},
            )
            return Grant(conn, data["share"], data["lease_s"], data.get("env", {}))
        raise combine(errors, req)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def combine(errors: list[GatewayError], req: ShareRequest) -> GatewayError:
    """One error that tells the user what every server said."""
    if len(errors) == 1:
        return errors[0]
    if all(e.code == protocol.E_NEVER_FITS for e in errors):
        head = f"No server in the pool can ever hold {req.describe()}"
    else:
        head = f"No server could grant {req.describe()}"
    details = " ".join(f"[{e.server}] {e}" for e in errors)
    code = errors[0].code if len({e.code for e in errors}) == 1 else "no_fit"
    return GatewayError(",".join(e.server for e in errors), f"{head}: {details}", code)


def say(text: str) -> None:
    """Progress and notices go to stderr, so a command's stdout stays its own."""
    print(f"bitfusion: {text}", file=sys.stderr, flush=True)
