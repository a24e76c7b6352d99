"""The GPUs of this server: what they are, how full they are, and which process uses what.

One interface, two implementations: NVML on a real GPU server, and a simulated pool for machines
without one (development, CI, demos). The simulated pool keeps the same contract, including
per-process memory, so that policing can be exercised without a GPU: a process in a simulated
share claims memory by writing ``<usage_dir>/<pid>.json`` (see ``gateway.simulated_alloc``).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import simulated_claims
from remoting.util.procs import running

MIB = 1024 * 1024
# More simulated GPUs than any real server holds is a typo, not a pool.
MAX_SIMULATED_GPUS = 64
_SPEC_EXAMPLE = "e.g. 2x16GiB or 1x80GiB,1x24GiB"
_SPEC_PART = re.compile(r"^(?:(\d+)\s*x\s*)?(\d+)\s*(mib|gib)$", re.IGNORECASE)


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index on this server
    uuid: str  # "GPU-..."; CUDA_VISIBLE_DEVICES accepts it as is
    name: str
    memory_total_mib: int
    simulated: bool
    minor: int | None = None  # its /dev/nvidiaN, which a share's sandbox shows; None: unknown


@dataclass(frozen=True)
class GpuState:
    """A live sample of one GPU; None where the GPU or driver does not report a field."""

    index: int
    memory_used_mib: int
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None


class InventoryError(Exception):
    """The GPUs cannot be read; the message is one sentence a user can act on."""


class GpuInventory(ABC):
    """The part of NVML (pynvml) the gateway needs, so a simulated pool can stand in for it."""

    simulated: bool

    @abstractmethod
    def driver_version(self) -> str: ...

    @abstractmethod
    def cuda_version(self) -> str | None: ...

    @abstractmethod
    def gpus(self) -> list[GpuInfo]:
        """The fixed inventory, read once when the inventory is opened."""

    @abstractmethod
    def states(self) -> list[GpuState]: ...

    @abstractmethod
    def process_memory(self) -> dict[int, dict[int, int]]:
        """pid -> {GPU index: MiB that pid holds on that GPU}."""

    @abstractmethod
    def close(self) -> None: ...


class NvmlInventory(GpuInventory):
    simulated = False

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise InventoryError(_no_gpu(f"pynvml cannot be imported: {exc}")) from None
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise InventoryError(_no_gpu(str(exc))) from None
        try:
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._gpus = [self._info(i, h) for i, h in enumerate(self._handles)]
            self._driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise InventoryError(_no_gpu(str(exc))) from None
        if not self._gpus:
            pynvml.nvmlShutdown()
            raise InventoryError(_no_gpu(f"NVML works, driver {self._driver}, but lists no GPU"))
        self._closed = False

    def _info(self, index: int, handle: Any) -> GpuInfo:
        nv = self._nv
        return GpuInfo(
            index=index,
            uuid=_text(nv.nvmlDeviceGetUUID(handle)),
            name=_text(nv.nvmlDeviceGetName(handle)),
            memory_total_mib=nv.nvmlDeviceGetMemoryInfo(handle).total // MIB,
            simulated=False,
            minor=self._minor(handle),
        )

    def _minor(self, handle: Any) -> int | None:
        # Unknown (some MIG and virtual GPUs): a share's sandbox then shows every GPU node,
        # and CUDA_VISIBLE_DEVICES still names only the share's GPUs.
        try:
            return int(self._nv.nvmlDeviceGetMinorNumber(handle))
        except (self._nv.NVMLError, AttributeError):
            return None

    def _optional(self, read: Any, *args: Any) -> Any:
        # Consumer GPUs and some drivers lack a field; that field is then unknown, not an error.
        try:
            return read(*args)
        except self._nv.NVMLError_NotSupported:
            return None

    def driver_version(self) -> str:
        return self._driver

    def cuda_version(self) -> str | None:
        version = self._optional(self._nv.nvmlSystemGetCudaDriverVersion)
        if not version:
            return None
        return f"{version // 1000}.{version % 1000 // 10}"  # 12020 -> "12.2"

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    def states(self) -> list[GpuState]:
        nv, out = self._nv, []
        for index, h in enumerate(self._handles):
            util = self._optional(nv.nvmlDeviceGetUtilizationRates, h)
            temp = self._optional(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            milliwatts = self._optional(nv.nvmlDeviceGetPowerUsage, h)
            out.append(
                GpuState(
                    index=index,
                    memory_used_mib=nv.nvmlDeviceGetMemoryInfo(h).used // MIB,
                    utilization_pct=util.gpu if util is not None else None,
                    temperature_c=temp,
                    power_w=milliwatts / 1000 if milliwatts is not None else None,
                )
            )
        return out

    def process_memory(self) -> dict[int, dict[int, int]]:
        nv = self._nv
        usage: dict[int, dict[int, int]] = {}
        for index, h in enumerate(self._handles):
            for read in (
                nv.nvmlDeviceGetComputeRunningProcesses,
                nv.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                for proc in self._optional(read, h) or []:
                    used = proc.usedGpuMemory  # None where the driver cannot attribute memory
                    if used is None:
                        continue
                    per_gpu = usage.setdefault(proc.pid, {})
                    # A process with both a compute and a graphics context is listed twice
                    # with the same memory: take the larger, do not add.
                    per_gpu[index] = max(per_gpu.get(index, 0), used // MIB)
        return usage

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._nv.nvmlShutdown()


class SimulatedInventory(GpuInventory):
    """GPUs that exist only here; their memory is whatever live processes claim in usage_dir."""

    simulated = True

    def __init__(self, sizes_mib: list[int], usage_dir: Path, hostname: str) -> None:
        self.usage_dir = usage_dir
        self._gpus = [
            GpuInfo(
                index=i,
                uuid=simulated_uuid(hostname, i),
                name=f"Simulated GPU {_size_text(mib)}",
                memory_total_mib=mib,
                simulated=True,
            )
            for i, mib in enumerate(sizes_mib)
        ]
        self._index_of = {g.uuid: g.index for g in self._gpus}
        usage_dir.mkdir(parents=True, exist_ok=True)

    def driver_version(self) -> str:
        return "simulated"

    def cuda_version(self) -> str | None:
        return None

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    def states(self) -> list[GpuState]:
        used = dict.fromkeys(self._index_of.values(), 0)
        for per_gpu in self.process_memory().values():
            for index, mib in per_gpu.items():
                used[index] += mib
        # Simulated memory does no work, so utilization is honestly 0.
        return [GpuState(g.index, used[g.index], 0, None, None) for g in self._gpus]

    def process_memory(self) -> dict[int, dict[int, int]]:
        # Host pids, as NVML gives them: a claim names its writer as its sandbox sees it.
        usage: dict[int, dict[int, int]] = {}
        for path in self.usage_dir.glob("*/*.json"):
            pid = simulated_claims.host_pid(path.stem)
            if pid is None or not running(pid):
                if pid is not None or simulated_claims.is_claim_name(path.stem):
                    path.unlink(missing_ok=True)  # killed before it could clean up
                continue
            per_gpu = self._read_claim(path)
            if per_gpu:
                usage[pid] = per_gpu
        return usage

    def _read_claim(self, path: Path) -> dict[int, int]:
        try:
            claim = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(claim, dict):
            return {}
        per_gpu = {}
        for gpu_uuid, mib in claim.items():
            index = self._index_of.get(gpu_uuid)
            if index is not None and type(mib) is int and mib >= 0:
                per_gpu[index] = mib
        return per_gpu

    def close(self) -> None:
        pass


def simulated_uuid(hostname: str, index: int) -> str:
    """Stable across restarts, distinct across servers, shaped like NVML's."""
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{index}.simulated-gpu.{hostname}"))


def parse_simulate_spec(spec: str) -> list[int]:
    """``"2x16GiB"`` -> ``[16384, 16384]``; ``"1x80GiB,1x24GiB"`` -> ``[81920, 24576]``."""
    sizes: list[int] = []
    for part in spec.split(","):
        m = _SPEC_PART.match(part.strip())
        count = int(m.group(1)) if m and m.group(1) else 1
        size = int(m.group(2)) * (1024 if m.group(3).lower() == "gib" else 1) if m else 0
        if not m or count < 1 or size < 1:
            raise ValueError(
                f"Cannot read {part.strip()!r} in --simulate-gpus {spec!r}: give COUNTxSIZE "
                f"with SIZE in MiB or GiB, {_SPEC_EXAMPLE}."
            )
        sizes += [size] * count
        if len(sizes) > MAX_SIMULATED_GPUS:
            raise ValueError(
                f"--simulate-gpus {spec!r} asks for more than {MAX_SIMULATED_GPUS} GPUs; "
                f"give fewer, {_SPEC_EXAMPLE}."
            )
    return sizes


def open_inventory(simulate: str | None, state_dir: Path, hostname: str) -> GpuInventory:
    """The simulated pool when ``simulate`` is given, else the real GPUs through NVML."""
    if simulate:
        return SimulatedInventory(
            parse_simulate_spec(simulate), state_dir / "simulated-usage", hostname
        )
    return NvmlInventory()


def _no_gpu(reason: str) -> str:
    return (
        f"No NVIDIA GPU was found through NVML ({reason}); run with --simulate-gpus 2x16GiB "
        "to serve a simulated pool instead."
    )


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def _size_text(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"
