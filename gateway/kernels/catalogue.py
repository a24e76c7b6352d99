"""The kernels a gateway offers: its kernel environments (built in, or from a kernels file),
and how each one's channels are kept from the other shares (see gateway/kernels/__init__.py).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio


@dataclass(frozen=True)
class KernelEnv:
    """A kernel environment the gateway offers: its argv ({connection_file} is replaced),
    whether its kernels encrypt their channels with keys from the connection file, and
    whether they can listen on unix sockets (``"transport": "ipc"``, as ipykernel can)."""

    argv: list[str]
    curve: bool
    ipc: bool = False


# How a kernel's channels are kept from code in other shares (--kernel-channels):
# "auto": unix sockets in the abstract namespace, which Landlock (ABI 6+) scopes so that only
# the gateway and the kernel's own share can connect, for kernels that can use them; else
# TCP on loopback with CurveZMQ, for kernels that take keys; else plain TCP (said at start).
# "curve": never unix sockets. "plain": TCP with no encryption at all.
CHANNEL_MODES = ("auto", "curve", "plain")
SCOPED_UNIX_ABI = 6  # the Landlock ABI that scopes abstract unix sockets


def channel_kind(env: KernelEnv, mode: str, landlock_abi: int) -> str:
    """What the channels of ``env``'s kernels will be: "ipc", "curve" or "plain"."""
    if mode == "auto" and env.ipc and landlock_abi >= SCOPED_UNIX_ABI:
        return "ipc"
    return "curve" if env.curve and mode != "plain" else "plain"


def _runs_ipykernel(argv: list[str]) -> bool:
    return any(a in ("ipykernel_launcher", "ipykernel") for a in argv)


def _ipykernel_takes_curve_keys() -> bool:
    """True when this Python's ipykernel reads CurveZMQ keys from its connection file."""
    try:
        found = re.match(r"(\d+)\.(\d+)", metadata.version("ipykernel"))
    except metadata.PackageNotFoundError:
        return False
    return found is not None and (int(found[1]), int(found[2])) >= (7, 3) and zmq.has("curve")


# The default is this Python with ipykernel.
DEFAULT_KERNELS: dict[str, KernelEnv] = {
    "python3": KernelEnv(
        [
            sys.executable,
            "-P",  # the kernel's modules come from its environment, never its working folder
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--IPKernelApp.extensions=bitfusion_jupyter",  # the %bitfusion magic, ready to use
        ],
        curve=_ipykernel_takes_curve_keys(),
        ipc=True,
    ),
}


class KernelConfigError(ValueError):
    """A kernels file that cannot be used; the text names the file and the problem."""


def _says_curve(metadata_: Any) -> bool:
    """Whether kernelspec-style metadata declares CurveZMQ support, as Jupyter's does."""
    said = metadata_.get("supported_encryption") if isinstance(metadata_, dict) else None
    said = [said] if isinstance(said, str) else said
    return isinstance(said, list) and "curve" in [str(x).strip().lower() for x in said]


def load_kernels(path: Path | None) -> dict[str, KernelEnv]:
    """The kernel environments: the default, plus those of a JSON file whose entries are
    ``name: argv`` or, as in a kernel.json, ``name: {"argv": [...], "metadata": {...}}``."""
    kernels = dict(DEFAULT_KERNELS)
    if path is not None:
        kernels.update(_read_kernels_file(path))
    return kernels


def _read_kernels_file(path: Path) -> dict[str, KernelEnv]:
    kernels = {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KernelConfigError(f"--kernels {path} cannot be read as JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise KernelConfigError(f"--kernels {path} must hold a JSON object {{name: argv}}.")
    for name, entry in data.items():
        argv = entry.get("argv") if isinstance(entry, dict) else entry
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise KernelConfigError(
                f"--kernels {path}: {name!r} needs a list of strings (argv), or an object "
                'with one under "argv".'
            )
        if not any("{connection_file}" in a for a in argv):
            raise KernelConfigError(
                f"--kernels {path}: the argv of {name!r} never mentions {{connection_file}}."
            )
        curve = isinstance(entry, dict) and _says_curve(entry.get("metadata"))
        kernels[name] = KernelEnv(argv, curve and zmq.has("curve"), _runs_ipykernel(argv))
    return kernels


def kernels_line(kernels: dict[str, KernelEnv], mode: str = "auto", landlock_abi: int = 0) -> str:
    """The banner's word on the kernel environments: how each keeps its channels from other
    shares, and why those that do not, do not."""
    by_kind: dict[str, list[str]] = {"ipc": [], "curve": [], "plain": []}
    for name, env in sorted(kernels.items()):
        by_kind[channel_kind(env, mode, landlock_abi)].append(name)
    parts = []
    if by_kind["ipc"]:
        parts.append(
            f"{', '.join(by_kind['ipc'])} on unix sockets that Landlock keeps to its share"
        )
    if by_kind["curve"]:
        parts.append(f"{', '.join(by_kind['curve'])} with CurveZMQ-encrypted channels")
    if by_kind["plain"]:
        why = (
            "--kernel-channels plain"
            if mode == "plain"
            else 'needs ipykernel 7.3+; in --kernels, add "metadata": '
            '{"supported_encryption": "curve"}'
        )
        parts.append(
            f"{', '.join(by_kind['plain'])} NOT encrypted on the loopback, so code in other "
            f"shares can listen ({why})"
        )
    return "; ".join(parts)
