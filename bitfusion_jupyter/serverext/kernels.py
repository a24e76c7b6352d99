"""This Jupyter server's kernels and the shares they run on.

The server knows each kernel's connection file; the kernel shim keeps a sidecar file beside
it naming its share (`bitfusion_jupyter.share_sidecar`). A kernel started by the
`bitfusion-provisioner` is known from its provisioner first, which holds the share from its
grant on, before the shim has written anything. The live usage of each share comes from its
gateway's list_shares answer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bitfusion_jupyter import share_sidecar
from bitfusion_jupyter.pool_model import Answer
from bitfusion_jupyter.provisioner import BitfusionProvisioner
from remoting.messages import used_mib


@dataclass(frozen=True)
class KernelShare:
    kernel_id: str
    name: str  # the kernelspec's name
    execution_state: str
    # Its share, in the sidecar's fields (from its provisioner or the shim's sidecar file).
    # None: a local kernel (or a shim still taking its share).
    sidecar: dict[str, Any] | None
    notice: dict[str, Any] | None = None  # policing's last notice on it


def running(kernel_manager: Any) -> list[KernelShare]:
    """Every kernel of ``kernel_manager`` (a jupyter_server MappingKernelManager)."""
    out, connection_files = [], []
    for kid in list(kernel_manager.list_kernel_ids()):
        try:
            km = kernel_manager.get_kernel(kid)
        except KeyError:
            continue  # shut down meanwhile
        cf = getattr(km, "connection_file", None)
        if cf:
            connection_files.append(cf)
        out.append(
            KernelShare(
                kid,
                getattr(km, "kernel_name", "") or "",
                getattr(km, "execution_state", None) or "unknown",
                _share_of(km, cf),
                share_sidecar.read_notice(cf) if cf else None,
            )
        )
    for directory in {os.path.dirname(cf) for cf in connection_files}:
        share_sidecar.prune(directory)
    return out


def _share_of(km: Any, connection_file: str | None) -> dict[str, Any] | None:
    """The share a kernel runs on: its provisioner's, when it is a `bitfusion-provisioner`
    that holds one, else what its shim's sidecar file says."""
    sidecar = share_sidecar.read(connection_file) if connection_file else None
    provisioner = getattr(km, "provisioner", None)
    held = provisioner.share if isinstance(provisioner, BitfusionProvisioner) else None
    if held is None or (sidecar is not None and sidecar.get("share_id") != held["share_id"]):
        # %bitfusion moved the kernel to another share, which the shim's sidecar says at
        # once and the provisioner learns at its next lease renewal.
        return sidecar
    return held


def servers_of(kernels: list[KernelShare]) -> list[str]:
    return list(dict.fromkeys(k.sidecar["server"] for k in kernels if k.sidecar))


def kernel_of(kernels: list[KernelShare]) -> dict[tuple[str, str], str]:
    """(server, share_id) -> kernel id, so the pool can say which kernel holds a share."""
    return {(k.sidecar["server"], k.sidecar["share_id"]): k.kernel_id for k in kernels if k.sidecar}


def _share_usage(answer: Answer | None, share_id: str) -> dict[str, Any] | None:
    if answer is None or answer.shares is None:
        return None
    for share in answer.shares.get("shares", []):
        if share.get("share_id") == share_id:
            return share
    return None


def kernels_view(kernels: list[KernelShare], answers: Mapping[str, Answer]) -> dict[str, Any]:
    """The whole of ``/bitfusion/api/kernels``."""
    rows = []
    for k in kernels:
        share = None
        if k.sidecar:
            s = k.sidecar
            live = _share_usage(answers.get(s["server"]), s["share_id"])
            share = {
                "server": s["server"],
                "share_id": s["share_id"],
                "kernel": s.get("kernel"),
                "since": s.get("since"),
                "gpus": [
                    {
                        "index": g["index"],
                        "name": g["name"],
                        "uuid": g["uuid"],
                        "mib": g["mib"],
                        "simulated": bool(g.get("simulated")),
                        "used_mib": None if live is None else used_mib(live, g["index"]),
                    }
                    for g in s.get("gpus", [])
                ],
            }
        rows.append(
            {
                "kernel_id": k.kernel_id,
                "name": k.name,
                "execution_state": k.execution_state,
                "share": share,
                "notice": k.notice,
            }
        )
    return {"kernels": rows}


def busy_on_a_share(kernel_manager: Any) -> bool:
    """True when a kernel of ``kernel_manager`` runs a cell on a GPU share now."""
    return any(
        k.execution_state == "busy" and k.sidecar is not None for k in running(kernel_manager)
    )
