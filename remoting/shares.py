"""Where a share goes: best-fit placement of N equal slices over a server's GPUs.

Pure functions over plain numbers, so the rule is easy to read and to test: among the GPUs
that pass the filters, are not draining and have room, take the N that would be left with the
least free memory. Small shares then pack onto already-used cards and whole cards stay free
for big shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One GPU as placement sees it."""

    index: int
    total_mib: int
    free_mib: int
    eligible: bool = True  # passes the request's filters and is not draining


@dataclass(frozen=True)
class Want:
    """A request: ``gpus`` GPUs, each with ``mib`` MiB, or ``fraction`` of it, or all of it."""

    gpus: int
    mib: int | None = None
    fraction: float | None = None

    def need_on(self, total_mib: int) -> int:
        if self.mib is not None:
            return self.mib
        if self.fraction is not None:
            # Floor so that a share never exceeds the fraction asked for.
            return max(1, math.floor(self.fraction * total_mib))
        return total_mib  # whole GPU

    def describe(self) -> str:
        n = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}"
        if self.mib is not None:
            return f"{n} × {self.mib} MiB"
        if self.fraction is not None:
            return f"{n} × {self.fraction:g} of a GPU"
        return f"{n} (whole)"


def place(want: Want, slots: Sequence[Slot]) -> dict[int, int] | None:
    """GPU index -> MiB for the best fit, or None when it does not fit now."""
    fits = [
        (s.free_mib - want.need_on(s.total_mib), s.index, want.need_on(s.total_mib))
        for s in slots
        if s.eligible and s.free_mib >= want.need_on(s.total_mib)
    ]
    if len(fits) < want.gpus:
        return None
    fits.sort()
    return {index: need for _, index, need in fits[: want.gpus]}


def never_fits(want: Want, slots: Sequence[Slot]) -> str | None:
    """Why the request could not fit even on an empty server, or None if it could."""
    eligible = [s for s in slots if s.eligible]
    if not eligible:
        return "no GPU here passes the filters" if slots else "this server has no GPUs"
    roomy = [s for s in eligible if s.total_mib >= want.need_on(s.total_mib)]
    if len(eligible) < want.gpus:
        return f"it asks for {want.gpus} GPUs and this server has {len(eligible)} that qualify"
    if len(roomy) < want.gpus:
        biggest = max(s.total_mib for s in eligible)
        return (
            f"it asks for {want.need_on(biggest)} MiB per GPU and the largest GPU here "
            f"has {biggest} MiB"
        )
    return None
