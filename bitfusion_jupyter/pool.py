"""The client's view of the pool: the configured gateways, asked together.

Asking every server is done in threads, so one unreachable server costs one timeout, not one
per server. Allocation tries servers in the configured order and takes the first grant; with
``--wait`` it queues on every server that could hold the share and takes whichever grants
first.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from bitfusion_jupyter import config
from bitfusion_jupyter.share_request import ShareRequest
from remoting import fanout, protocol
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

        return list(zip(self.servers, fanout.each(self.servers, ask), strict=True))

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
                return self._grant(server, self.connect(server).request("allocate", **fields))
            except GatewayError as exc:
                errors.append(exc)
        could_fit = [e.server for e in errors if e.code == protocol.E_NO_FIT]
        if req.wait_s > 0 and could_fit:
            if on_queue:
                where = ", ".join(could_fit)
                on_queue(f"Waiting up to {req.wait_s:g} s for {req.describe()} on {where}...")
            waits = self._first_grant(could_fit, {**fields, "wait_s": req.wait_s}, on_queue)
            if isinstance(waits, Grant):
                return waits
            errors = [waits.get(e.server, e) for e in errors]
        raise combine(errors, req)

    def _first_grant(
        self,
        servers: list[str],
        fields: dict[str, Any],
        on_queue: Callable[[str], None] | None,
    ) -> Grant | dict[str, GatewayError]:
        """Queue on every server at once and keep the first grant, as a user who waits for
        "any GPU that frees" expects; the other places are given up, and a share granted in
        the same instant elsewhere is given back. Each server's error if none grants."""
        won = threading.Event()  # set: the other servers' places are given up
        news: queue.SimpleQueue[str] = queue.SimpleQueue()

        def wait_on(server: str) -> dict[str, Any]:
            def progress(msg: protocol.Message) -> None:
                news.put(f"Position {msg['position']} in the queue of {server}.")

            return self.connect(server).request(
                "allocate",
                timeout=fields["wait_s"] + self.timeout,
                on_event=progress,
                cancel=won,
                **fields,
            )

        grant: Grant | None = None
        errors: dict[str, GatewayError] = {}
        # One thread per server, each on its own connection; progress is said from here, the
        # caller's thread (a kernel shows only its own thread's prints in the cell).
        with ThreadPoolExecutor(max_workers=len(servers)) as ex:
            pending = {ex.submit(wait_on, server): server for server in servers}
            try:
                while pending:
                    done, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                    while on_queue and not news.empty():
                        on_queue(news.get())
                    for fut in done:
                        server = pending.pop(fut)
                        try:
                            data = fut.result()
                        except GatewayError as exc:
                            errors[server] = exc
                            continue
                        got = self._grant(server, data)
                        if grant is None:
                            grant = got
                            won.set()
                        else:
                            got.release(self.timeout)
            except BaseException:  # Ctrl-C: leave every queue, and keep no share
                won.set()
                for fut, server in pending.items():
                    with contextlib.suppress(GatewayError):
                        self._grant(server, fut.result()).release(self.timeout)
                if grant is not None:
                    grant.release(self.timeout)
                raise
        return grant if grant is not None else errors

    def _grant(self, server: str, data: dict[str, Any]) -> Grant:
        if data.get("unconfined"):
            say(
                f"{server} runs shares UNCONFINED, by its admin's choice: other users' code "
                "there can read this share's files and processes."
            )
        return Grant(self.connect(server), data["share"], data["lease_s"], data.get("env", {}))

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
    details = " ".join(e.told("[{server}] {message}") for e in errors)
    code = errors[0].code if len({e.code for e in errors}) == 1 else "no_fit"
    return GatewayError(",".join(e.server for e in errors), f"{head}: {details}", code)


def say(text: str) -> None:
    """Progress and notices go to stderr, so a command's stdout stays its own."""
    print(f"bitfusion: {text}", file=sys.stderr, flush=True)
