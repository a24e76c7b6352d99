"""Share filters (``--filter device.name=A100``), read the same way by client and gateway."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

KEYS = ("device.name", "device.memory", "device.index", "server.hostname")
_NUMERIC = {"device.memory", "device.index"}
_FILTER_RE = re.compile(r"^\s*([a-z.]+)\s*(>=|<=|!=|=|>|<)\s*(.+?)\s*$")
_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(mib|m|gib|g|gb|mb)?$", re.IGNORECASE)


class FilterError(ValueError):
    """A filter that cannot be read; the text is one sentence."""


def memory_mib(text: str) -> int:
    """'16GiB' -> 16384, '2048' -> 2048 (MiB when no unit)."""
    m = _MEM_RE.match(text.strip())
    if not m:
        raise FilterError(
            f"{text!r} is not an amount of memory; write e.g. 2048, 2048MiB or 16GiB."
        )
    value, unit = float(m.group(1)), (m.group(2) or "mib").lower()
    return int(value * 1024) if unit in ("gib", "g", "gb") else int(value)


def parse(text: str) -> list[Any]:
    """'device.memory>=16GiB' -> ['device.memory', '>=', 16384] (the form sent on the wire)."""
    m = _FILTER_RE.match(text)
    if not m or m.group(1) not in KEYS:
        raise FilterError(
            f"filter {text!r} is not understood; write KEY=VALUE (or >=, <=, >, <, !=) "
            f"with KEY one of {', '.join(KEYS)}."
        )
    key, op, value = m.groups()
    if key in _NUMERIC:
        return [key, op, memory_mib(value) if key == "device.memory" else _int(value, text)]
    if op not in ("=", "!="):
        raise FilterError(f"filter {text!r}: {key} can only be compared with = or !=.")
    return [key, op, value]


def _int(value: str, text: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FilterError(f"filter {text!r}: {value!r} is not a whole number.") from None


def check_wire(filters: Sequence[Any]) -> list[list[Any]]:
    """Validate filters received on the wire; raises FilterError."""
    out = []
    for f in filters:
        if not (isinstance(f, list) and len(f) == 3 and isinstance(f[0], str)):
            raise FilterError("a filter on the wire must be [key, op, value].")
        key, op, value = f
        if key not in KEYS or op not in (">=", "<=", "!=", "=", ">", "<"):
            raise FilterError(f"filter {key} {op} is not understood.")
        if key in _NUMERIC and (not isinstance(value, int) or isinstance(value, bool)):
            raise FilterError(f"filter {key} needs a whole number.")
        if key not in _NUMERIC and (not isinstance(value, str) or op not in ("=", "!=")):
            raise FilterError(f"filter {key} compares text with = or != only.")
        out.append([key, op, value])
    return out


def _compare(actual: Any, op: str, wanted: Any) -> bool:
    if isinstance(actual, str):
        # Names match by case-insensitive substring: "A100" finds "NVIDIA A100-SXM4-80GB".
        hit = wanted.lower() in actual.lower()
        return hit if op == "=" else not hit
    return bool(
        {
            "=": actual == wanted,
            "!=": actual != wanted,
            ">=": actual >= wanted,
            "<=": actual <= wanted,
            ">": actual > wanted,
            "<": actual < wanted,
        }[op]
    )


def gpu_attrs(name: str, memory_mib: int, index: int, hostname: str) -> dict[str, Any]:
    """What a filter tests of one GPU: the gateway matches its own GPUs so, and a client the
    rows of a server's `list_gpus` answer."""
    return {
        "device.name": name,
        "device.memory": memory_mib,
        "device.index": index,
        "server.hostname": hostname,
    }


def matches(filters: Sequence[Sequence[Any]], attrs: Mapping[str, Any]) -> bool:
    """True when every filter whose key is in ``attrs`` holds."""
    return all(_compare(attrs[k], op, v) for k, op, v in filters if k in attrs)


def describe(filters: Sequence[Sequence[Any]]) -> str:
    return ", ".join(f"{k}{op}{v}" for k, op, v in filters)
