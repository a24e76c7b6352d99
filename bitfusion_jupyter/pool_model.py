"""The pool as the notebook widget and the Jupyter server extension show it.

`ask_all` asks every gateway for its GPUs and the user's shares, one short-lived connection
per server in threads, so an unreachable server costs one timeout, not one per request.
`pool_view` turns those answers into the JSON served at ``/bitfusion/api/pool`` (the shape
is written down in ``bitfusion_jupyter.serverext``); the widget shows the same JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bitfusion_jupyter import config
from remoting import fanout, messages, tokens
from remoting.protocol import DASHBOARD_PORT

NO_SERVERS = "No GPU servers are configured: run `bitfusion init --token TOKEN --server HOST:PORT`."
TIMEOUT_S = fanout.TIMEOUT_S  # a browser panel or a widget waits on this


@dataclass
class Answer:
    """What one gateway said (or why it said nothing)."""

    address: str
    state: str = "ok"  # "ok" | "unreachable" | "unauthorized" | "error"
    error: str | None = None
    gpus: dict[str, Any] | None = None  # the list_gpus reply
    shares: dict[str, Any] | None = None  # the list_shares reply
    user: str | None = None  # the token's user: an admin token lists everyone's shares


def configured() -> tuple[list[str], str | None]:
    """The configured servers, or none and the sentence that says what to do."""
    try:
        return config.servers().servers, None
    except config.ConfigError as exc:
        text = str(exc)
        # config words "none configured" for the CLI (-l); the UIs point at `bitfusion init`.
        return [], NO_SERVERS if text.startswith("No servers are configured") else text


def ask_all(servers: list[str], timeout: float = TIMEOUT_S) -> list[Answer]:
    """list_gpus and list_shares of every gateway, one connection each, in threads."""
    users: dict[str, str] = {}  # each server's token user, as the fan-out read it

    def token_for(server: str) -> tokens.Token:
        tok = config.token_for(server)
        users[server] = tok.user
        return tok

    replies = fanout.ask_each(servers, token_for, [("list_gpus", {}), ("list_shares", {})], timeout)
    return [_answer(server, users.get(server), *replies[server]) for server in servers]


def _answer(server: str, user: str | None, gpus: fanout.Reply, shares: fanout.Reply) -> Answer:
    failed = gpus if gpus.data is None else shares
    if failed.data is None:
        return Answer(server, failed.state, failed.error, user=user)
    return Answer(server, gpus=gpus.data, shares=shares.data, user=user)


def dashboard_url(address: str, web_port: int | None) -> str | None:
    """The dashboard of the gateway at ``address``; None when it serves none."""
    from remoting.client import split_address

    if not web_port:
        return None
    host = split_address(address)[0]
    return f"http://{f'[{host}]' if ':' in host else host}:{web_port}/"


def my_shares(answer: Answer) -> list[dict[str, Any]]:
    """The token user's own shares in a list_shares reply."""
    if answer.shares is None:
        return []
    return [s for s in answer.shares.get("shares", []) if s.get("owner") == answer.user]


def server_view(
    answer: Answer, kernel_of: Mapping[tuple[str, str], str] | None = None
) -> dict[str, Any]:
    """One server of ``/bitfusion/api/pool``; ``kernel_of`` maps (server, share_id) -> kernel."""
    kernel_of = kernel_of or {}
    row: dict[str, Any] = {
        "address": answer.address,
        "state": answer.state,
        "error": answer.error,
        "hostname": None,
        "simulated": False,
        "sandbox": None,  # how it walls shares off, once it has answered
        "dashboard_url": None,  # known once the gateway has answered
        "gpus": [],
    }
    if answer.gpus is None:
        return row
    row["hostname"] = answer.gpus.get("server")
    row["simulated"] = bool(answer.gpus.get("simulated"))
    row["sandbox"] = answer.gpus.get("sandbox")
    # A gateway older than the "web_port" field serves it on the default port.
    row["dashboard_url"] = dashboard_url(
        answer.address, answer.gpus.get("web_port", DASHBOARD_PORT)
    )
    own = my_shares(answer)
    for g in answer.gpus.get("gpus", []):
        gpu = messages.gpu_view(g)
        held: list[dict[str, Any]] = [
            {
                "share_id": s["share_id"],
                "mib": s["mib"],
                "used_mib": s["used_mib"],
                "kernel_id": kernel_of.get((answer.address, s["share_id"])),
            }
            for s in messages.shares_on(own, g["index"])
        ]
        granted = gpu["memory_granted_mib"]
        row["gpus"].append(
            {
                **gpu,
                "shares": g["shares"],
                "mine": held,
                "others_mib": max(0, granted - sum(m["mib"] for m in held)),
            }
        )
    return row


def pool_view(
    message: str | None,
    answers: list[Answer],
    kernel_of: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, Any]:
    """The whole of ``/bitfusion/api/pool`` from `configured()`'s message and the answers."""
    if message is not None and not answers:
        return {"configured": False, "message": message, "servers": []}
    return {
        "configured": True,
        "message": message,
        "servers": [server_view(a, kernel_of) for a in answers],
    }


def snapshot(timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """The pool as this process's configuration sees it, asked now."""
    servers, message = configured()
    return pool_view(message, ask_all(servers, timeout))
