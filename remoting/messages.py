"""What the gateway answers, written down once: the error codes of a refused request, and the
``data`` of each request's reply as a TypedDict.

The gateway fills these types and the clients (CLI, panel, dashboard, magic) read them, so a
field renamed on one side is a type error on the other. With ``BITFUSION_CHECK_REPLIES`` set
(the test suite sets it for every gateway it starts), the gateway also checks every reply it
sends against its type, so each integration test checks the reply shapes as well.

Later protocol versions may add optional fields and new messages, never new required fields
to a message both versions know (see remoting.protocol.PROTOCOL_VERSION).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, NotRequired, TypedDict


class ErrorCode(StrEnum):
    """Why a request failed, so that clients react without parsing sentences."""

    AUTH = "auth"  # token missing, malformed, revoked or not for this gateway
    DENIED = "denied"  # the share belongs to someone else, or the action to admins
    NOT_FOUND = "not_found"
    NO_FIT = "no_fit"  # nothing fits now
    NEVER_FITS = "never_fits"  # nothing on this server could ever fit
    GAVE_UP = "gave_up"  # the answer to a queued allocate whose client gave its place up
    BAD_REQUEST = "bad_request"
    SPAWN = "spawn"
    NO_FILES = "no_files"  # the client's folder cannot be mounted there; the rest could start
    NO_KERNEL = "no_kernel"  # the gateway offers no kernel environment of that name
    INTERNAL = "internal"
    # Never sent by a gateway: the client's own word for no answer (nothing listening, a
    # failed handshake, a timeout).
    UNREACHABLE = "unreachable"


# --- pieces ---------------------------------------------------------------------------------
class SandboxInfo(TypedDict):
    sandboxed: bool
    refused: bool
    line: str


class ServerInfo(TypedDict):
    """What every inventory reply starts with: the gateway and how it runs shares."""

    server: str
    version: str
    protocol: int
    simulated: bool
    sandbox: SandboxInfo
    driver: str | None
    cuda: str | None
    mps: bool
    kernels: list[str]
    web_port: int | None  # its dashboard's port; None: it serves none


class GpuRow(TypedDict):
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_granted_mib: int
    memory_free_mib: int
    memory_used_mib: int | None
    utilization_pct: int | float | None
    temperature_c: int | float | None
    power_w: int | float | None
    shares: int
    share_sizes_mib: list[int]
    simulated: bool
    draining: bool


class Counters(TypedDict):
    grants: int
    refusals: int
    lease_expiries: int
    police_warn: int
    police_stop: int
    idle_reclaims: int


class ShareGpu(TypedDict):
    index: int
    uuid: str
    name: str
    mib: int
    total_mib: int
    simulated: bool


class ShareInfo(TypedDict):
    """A share as its owner and the admins see it (gateway.ledger.Share.public)."""

    share_id: str
    owner: str
    client_host: str
    gpus: list[ShareGpu]
    whole: bool
    created: float
    lease_expires_in: float


class ShareProcess(TypedDict):
    proc_id: str
    argv: list[str]
    pid: int | None
    kernel: str | None


class ShareRow(ShareInfo):
    usage_mib: dict[str, int]
    idle_s: float
    processes: list[ShareProcess]


class Event(TypedDict):
    ts: float
    kind: str
    user: str | None
    share_id: str | None
    detail: str | None


class Package(TypedDict):
    name: str
    version: str


class SmiProcess(TypedDict):
    gpu: int
    pid: int | None  # only for the user's own processes (or an admin)
    share_id: str | None
    mib: int


class Sample(TypedDict):
    t: float
    gpus: list[dict[str, Any]]


# --- replies, by request type ---------------------------------------------------------------
class HelloReply(ServerInfo):
    user: str
    admin: bool
    uptime_s: float


class ListGpusReply(ServerInfo):
    gpus: list[GpuRow]
    queued: int
    idle_timeout_s: float | None
    counters: Counters


class SmiReply(ServerInfo):
    gpus: list[GpuRow]
    processes: list[SmiProcess]


class ListSharesReply(TypedDict):
    server: str
    shares: list[ShareRow]
    events: list[Event]
    packages: list[Package]


class AllocateReply(TypedDict):
    share: ShareInfo
    lease_s: float
    server: str
    env: dict[str, str]
    unconfined: NotRequired[str]  # only when the admin turned the sandbox off


class RenewReply(TypedDict):
    lease_s: float
    usage_mib: dict[str, int]
    gone: list[str]


class ReleaseReply(TypedDict):
    released: str


class ProcessReply(TypedDict):
    proc_id: str


class KernelStartReply(TypedDict):
    kernel_id: str
    proc_id: str
    kernel: str


class HistoryReply(TypedDict):
    server: str
    range: str
    step_s: float
    samples: list[Sample]


class DrainReply(TypedDict):
    index: int
    draining: bool


class IdleTimeoutReply(TypedDict):
    idle_timeout_s: float | None


class RevokeReply(TypedDict):
    revoked: str


class MintReply(TypedDict):
    token: str
    user: str
    admin: bool
    expires: int | None  # Unix time


REPLIES: dict[str, type] = {
    "hello": HelloReply,
    "list_gpus": ListGpusReply,
    "smi": SmiReply,
    "list_shares": ListSharesReply,
    "allocate": AllocateReply,
    "renew": RenewReply,
    "release": ReleaseReply,
    "spawn": ProcessReply,
    "register_pid": ProcessReply,
    "kernel_start": KernelStartReply,
    "history": HistoryReply,
    "drain": DrainReply,
    "set_idle_timeout": IdleTimeoutReply,
    "revoke": RevokeReply,
    "mint": MintReply,
}


class ReplyMismatch(Exception):
    """A reply whose data does not match its type; the text says where."""


def check_reply(msg_type: str, data: dict[str, Any]) -> None:
    """Raise ReplyMismatch unless ``data`` is exactly a ``msg_type`` reply: every required key,
    no key the type does not name, each value of its type (lists and maps item by item).

    typeguard (a test dependency) does the checking; it is imported only when checks are on."""
    from typeguard import CollectionCheckStrategy, TypeCheckError, check_type

    try:
        check_type(
            data,
            REPLIES[msg_type],
            collection_check_strategy=CollectionCheckStrategy.ALL_ITEMS,
        )
    except TypeCheckError as exc:
        raise ReplyMismatch(f"the {msg_type} reply does not match its type: {exc}") from None


# --- What the dashboard and the Jupyter panel both show of a gateway's GPUs -----------------
# Each view builds its rows from these and adds its own columns (the dashboard: draining,
# every share's size, the shares its token may see; the panel: the user's own shares, the
# memory others hold).


class GpuView(TypedDict):
    """A GPU of a list_gpus reply: what it is, its memory and its load."""

    index: int
    uuid: str
    name: str
    simulated: bool
    memory_total_mib: int
    memory_granted_mib: int
    memory_free_mib: int
    memory_used_mib: int | None
    utilization_pct: int | float | None


class ShareOnGpu(TypedDict):
    """One share's part of a GPU, from a list_shares reply."""

    share_id: str
    owner: str
    mib: int
    used_mib: int


def gpu_view(gpu: Mapping[str, Any]) -> GpuView:
    """A GPU row of a list_gpus reply, as both views show it (an older gateway's row may lack
    the load, which is then unknown)."""
    return {
        "index": gpu["index"],
        "uuid": gpu["uuid"],
        "name": gpu["name"],
        "simulated": bool(gpu["simulated"]),
        "memory_total_mib": gpu["memory_total_mib"],
        "memory_granted_mib": int(gpu["memory_granted_mib"]),
        "memory_free_mib": gpu["memory_free_mib"],
        "memory_used_mib": gpu.get("memory_used_mib"),
        "utilization_pct": gpu.get("utilization_pct"),
    }


def used_mib(share: Mapping[str, Any], index: int) -> int:
    """The GPU memory a share's processes use on GPU ``index`` (policing's last sample)."""
    return int((share.get("usage_mib") or {}).get(str(index), 0))


def shares_on(shares: Iterable[Mapping[str, Any]], index: int) -> list[ShareOnGpu]:
    """The part of GPU ``index`` that each of ``shares`` (list_shares rows) holds."""
    return [
        {
            "share_id": share["share_id"],
            "owner": share["owner"],
            "mib": g["mib"],
            "used_mib": used_mib(share, index),
        }
        for share in shares
        for g in share["gpus"]
        if g["index"] == index
    ]
