"""The environment of a process inside a share: which GPUs it sees and how much it may use.

CUDA itself has no per-process memory cap, so the caps here are the frameworks' own
(cooperative); the gateway's police is what enforces a share's limit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from remoting import share_env as names

MIB = 1024 * 1024
SHARE_SITE = Path(__file__).resolve().parent / "share_site"

# Set here from the share alone, so a stale value inherited from the base is never kept.
_OWNED = (
    "BITFUSION_SIMULATED_USAGE_DIR",
    names.USAGE_FILE,
    names.FILES,
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
)


@dataclass(frozen=True)
class ShareGpu:
    index: int  # NVML index on the server
    uuid: str
    name: str
    mib: int  # granted to the share
    total_mib: int  # the GPU's whole memory


def share_environment(
    *,
    server: str,
    share_id: str,
    gpus: Sequence[ShareGpu],
    simulated_usage_dir: Path | None,
    mps: bool,
    usage_file: Path | None = None,
    base: Mapping[str, str],
) -> dict[str, str]:
    """A copy of ``base`` plus what a process in the share needs to find and respect its GPUs."""
    env = {k: v for k, v in base.items() if k not in _OWNED}

    def comma(values: Sequence[object]) -> str:
        return ",".join(str(v) for v in values)

    env.update(
        {
            "CUDA_VISIBLE_DEVICES": comma([g.uuid for g in gpus]),
            # Ordinals inside the process then follow the order of CUDA_VISIBLE_DEVICES.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            names.SERVER: server,
            names.SHARE_ID: share_id,
            names.GPU_INDICES: comma([g.index for g in gpus]),
            names.GPU_UUIDS: comma([g.uuid for g in gpus]),
            names.MEMORY_MIB: comma([g.mib for g in gpus]),
            names.GPU_MEMORY_TOTAL_MIB: comma([g.total_mib for g in gpus]),
            names.SIMULATED: "1" if simulated_usage_dir is not None else "0",
            "PYTHONPATH": _with_share_site(base.get("PYTHONPATH", "")),
        }
    )
    if usage_file is not None:
        env[names.USAGE_FILE] = str(usage_file)
    if simulated_usage_dir is not None:
        env["BITFUSION_SIMULATED_USAGE_DIR"] = str(simulated_usage_dir)
    if gpus:
        env.update(_framework_caps(gpus))
    if mps:
        # MPS enforces this one for real; ordinals are as the share's processes see them.
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = comma(
            [f"{i}={g.mib}M" for i, g in enumerate(gpus)]
        )
    return env


def _framework_caps(gpus: Sequence[ShareGpu]) -> dict[str, str]:
    # JAX and CuPy take one cap for every device, so the tightest GPU sets it; the fraction is
    # rounded down so that it never grants more than the share.
    permille = min(min(g.mib, g.total_mib) * 1000 // max(g.total_mib, 1) for g in gpus)
    return {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{permille / 1000:.3f}",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "CUPY_GPU_MEMORY_LIMIT": str(min(g.mib for g in gpus) * MIB),
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }


def _with_share_site(pythonpath: str) -> str:
    # Its sitecustomize caps PyTorch and TensorFlow, which have no environment variable for it.
    site = str(SHARE_SITE)
    rest = [p for p in pythonpath.split(os.pathsep) if p and p != site]
    return os.pathsep.join([site, *rest])
