"""Where a share goes: best-fit placement of N equal slices over a server's GPUs.

Pure functions over plain numbers, so the rule is easy to read and to test: among the GPUs
that pass the filters, are not draining and have room, take the N that would be left with the
least free memory. Small shares then pack onto already-used cards and whole cards stay free
for big shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from remoting import filters
from remoting.util.numbers import finite


@dataclass(frozen=True)
class Slot:
    """One GPU as placement sees it."""

    index: int
    total_mib: int
    free_mib: int
    eligible: bool = True  # passes the request's filters and is not draining


class WantError(ValueError):
    """A share that cannot be asked for; the text is one sentence that says what to do."""


@dataclass(frozen=True)
class Spelling:
    """How one way of asking names a share's fields in its sentences."""

    gpus: str
    mib: str
    fraction: str
    wait: str
    json: bool = False  # examples as JSON fields, not as command-line options

    def eg(self, name: str, value: str) -> str:
        return f'"{name}": {value}' if self.json else f"{name} {value}"


# The command line, the magic, kernelspecs and the wire (whose clients are mostly those).
FLAGS = Spelling("-n", "-m", "-p", "--wait")
# JSON bodies: the Jupyter server extension's REST API and the panel.
FIELDS = Spelling("gpus", "mib", "fraction", "wait_s", json=True)


@dataclass(frozen=True)
class Want:
    """A request: ``gpus`` GPUs, each with ``mib`` MiB, or ``fraction`` of it, or all of it;
    on GPUs that pass ``filters`` (their wire form), queueing up to ``wait_s`` for room.

    The one model of a share asked for: the CLI, the magic, the REST API and the gateway
    build it and check it with the same `validate`, so each refuses the same things."""

    gpus: int = 1
    mib: int | None = None
    fraction: float | None = None
    filters: list[list[Any]] = field(default_factory=list)
    wait_s: float = 0.0

    def validate(self, say: Spelling = FLAGS) -> Want:
        """This request if it can be asked for; else WantError, named as ``say`` names it.
        Values come from the wire too: any JSON number, however large, gets a sentence."""
        if self.gpus < 1:
            raise WantError(
                f"{say.gpus} {_shown(self.gpus)} asks for no GPU; "
                f"give {say.eg(say.gpus, '1')} or more."
            )
        if self.mib is not None and self.fraction is not None:
            raise WantError(f"Give {say.mib} or {say.fraction}, not both.")
        if self.mib is not None and self.mib < 1:
            raise WantError(
                f"{say.mib} {_shown(self.mib)} is not a size; give MiB per GPU, "
                f"e.g. {say.eg(say.mib, '2048')}."
            )
        if self.fraction is not None:
            frac = finite(self.fraction)
            if frac is None or not 0 < frac <= 1:
                raise WantError(
                    f"{say.fraction} {_shown(self.fraction)} is outside (0, 1]; give a fraction "
                    f"of a GPU, e.g. {say.eg(say.fraction, '0.5')}."
                )
        wait = finite(self.wait_s)
        if wait is None:  # NaN would wait in the queue for ever
            raise WantError(f"{say.wait} takes a number of seconds.")
        if wait < 0:
            raise WantError(
                f"{say.wait} {wait:g} is negative; give seconds to wait, "
                f"e.g. {say.eg(say.wait, '60')}."
            )
        try:
            filters.check_wire(self.filters)
        except filters.FilterError as exc:
            raise WantError(str(exc)) from None
        return self

    @classmethod
    def from_wire(cls, fields: Mapping[str, Any]) -> Want:
        """The request an ``allocate`` message carries (its kinds checked by the protocol)."""
        return cls(
            fields["gpus"],
            fields.get("mib"),
            fields.get("fraction"),
            fields.get("filters") or [],
            fields.get("wait_s") or 0.0,
        )

    def wire(self) -> dict[str, Any]:
        """The fields of an ``allocate`` message (``wait_s`` is added where it queues)."""
        return {
            "gpus": self.gpus,
            "mib": self.mib,
            "fraction": self.fraction,
            "filters": self.filters,
        }

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


def never_held(want: Want, answers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each server's reason it could never hold ``want``, by the gateway's own rule (never_fits
    over the GPUs of its list_gpus reply, as on an empty server); {} once one could.
    ``answers``: server address -> its list_gpus reply."""
    whys = {}
    for server, data in answers.items():
        slots = [
            Slot(
                g["index"],
                g["memory_total_mib"],
                g["memory_total_mib"],  # as on an empty server
                filters.matches(
                    want.filters,
                    filters.gpu_attrs(
                        g["name"], g["memory_total_mib"], g["index"], data.get("server", "")
                    ),
                ),
            )
            for g in data.get("gpus", [])
        ]
        why = never_fits(want, slots)
        if why is None:
            return {}
        whys[server] = why
    return whys


def _shown(value: float) -> str:
    """A number for a sentence; a huge one from the wire is not spelt out (Python refuses to
    print an int of over 4300 digits, and nobody would read it)."""
    if isinstance(value, int) and not -(10**15) < value < 10**15:
        return "(a number too large)"
    return f"{value:g}"
