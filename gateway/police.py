"""Decides which shares hold more GPU memory than they were granted; the gateway acts on it.

The frameworks' caps set inside a share are cooperative, so the gateway samples every process's
GPU memory and judges each share on each of its GPUs: the first sample over the limit warns the
owner, and a share still over after the grace period is stopped (in mode "stop"). A process
belongs to a share when it runs in the session of a process the share launched (each launched
process starts its own session), so children and grandchildren count too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from traitlets import Enum, Float
from traitlets.config import Configurable

from remoting.util.procs import session_of

Usage = Mapping[int, Mapping[int, int]]  # pid -> {GPU index: MiB}
SessionOf = Callable[[int], int | None]
PoliceMode = Literal["stop", "warn"]
MODES: tuple[PoliceMode, ...] = get_args(PoliceMode)


@dataclass(frozen=True)
class PolicedShare:
    share_id: str
    owner: str
    limits: Mapping[int, int]  # GPU index -> MiB granted on it
    sessions: frozenset[int]  # session ids (= pids) of the processes launched in the share


@dataclass(frozen=True)
class Verdict:
    action: Literal["warn", "stop"]
    share_id: str
    owner: str
    gpu_index: int
    used_mib: int
    limit_mib: int
    pids: tuple[int, ...]  # the share's processes using that GPU
    message: str  # one sentence for the owner


@dataclass(frozen=True)
class Attribution:
    """Whose GPU memory is whose."""

    by_share: dict[str, dict[int, dict[int, int]]]  # share id -> GPU index -> pid -> MiB
    unmanaged: dict[int, dict[int, int]]  # pid -> {GPU index: MiB}, pids of no share

    def share_totals(self) -> dict[str, dict[int, int]]:
        """share id -> {GPU index: MiB used by all its processes}."""
        return {
            sid: {index: sum(pids.values()) for index, pids in per_gpu.items()}
            for sid, per_gpu in self.by_share.items()
        }


def attribute(
    usage: Usage, shares: Sequence[PolicedShare], session_of: SessionOf = session_of
) -> Attribution:
    """Sort the processes using GPU memory by share; every share gets an entry, maybe empty."""
    owner_of_session = {sid: s.share_id for s in shares for sid in s.sessions}
    by_share: dict[str, dict[int, dict[int, int]]] = {s.share_id: {} for s in shares}
    unmanaged: dict[int, dict[int, int]] = {}
    for pid, per_gpu in usage.items():
        # A launched process is matched by its own pid too, in case it left its session.
        share_id = owner_of_session.get(pid)
        if share_id is None:
            session = session_of(pid)
            share_id = owner_of_session.get(session) if session is not None else None
        if share_id is None:
            unmanaged[pid] = dict(per_gpu)
            continue
        for index, mib in per_gpu.items():
            by_share[share_id].setdefault(index, {})[pid] = mib
    return Attribution(by_share, unmanaged)


def usage_by_share(
    usage: Usage, shares: Sequence[PolicedShare], session_of: SessionOf = session_of
) -> dict[str, dict[int, int]]:
    """share id -> {GPU index: MiB used by its processes}."""
    return attribute(usage, shares, session_of).share_totals()


def unmanaged_usage(
    usage: Usage, shares: Sequence[PolicedShare], session_of: SessionOf = session_of
) -> dict[int, dict[int, int]]:
    """pid -> {GPU index: MiB} for the processes using GPU memory that belong to no share."""
    return attribute(usage, shares, session_of).unmanaged


@dataclass
class _Over:
    since: float
    stopped: bool = False


class Police(Configurable):
    """Remembers, per share and GPU, since when it has been over, so each verdict comes once.

    Its settings are traits (``c.Police.mode`` in the gateway's config file, ``--police`` and
    ``--police-grace`` on its command line); their defaults are written here only.
    """

    mode = Enum(
        MODES,
        default_value="stop",
        help="what to do with over-share processes: stop (warn, then stop them) or warn "
        "(only warn)",
    ).tag(config=True)
    grace_s = Float(5.0, help="how long a process may stay over its share after the warning").tag(
        config=True
    )
    interval_s = Float(
        1.0, help="how often the gateway samples every process's GPU memory, in seconds"
    ).tag(config=True)

    def __init__(
        self,
        mode: PoliceMode | None = None,
        grace_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        # Positional mode and grace as before (the service passes its GatewayConfig's);
        # left out, they come from config (parent=, config=) or the traits' defaults.
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"police mode must be 'warn' or 'stop', not {mode!r}.")
            kwargs["mode"] = mode
        if grace_s is not None:
            kwargs["grace_s"] = grace_s
        super().__init__(**kwargs)
        self._clock = clock
        self._over: dict[tuple[str, int], _Over] = {}

    def usage_by_share(
        self, usage: Usage, shares: Sequence[PolicedShare], session_of: SessionOf = session_of
    ) -> dict[str, dict[int, int]]:
        return usage_by_share(usage, shares, session_of)

    def unmanaged(
        self, usage: Usage, shares: Sequence[PolicedShare], session_of: SessionOf = session_of
    ) -> dict[int, dict[int, int]]:
        return unmanaged_usage(usage, shares, session_of)

    def review(
        self, usage: Usage, shares: Sequence[PolicedShare], session_of: SessionOf = session_of
    ) -> list[Verdict]:
        """Judge one sample of per-process usage; returns the verdicts that are new."""
        now = self._clock()
        by_share = attribute(usage, shares, session_of).by_share
        verdicts: list[Verdict] = []
        still_over: set[tuple[str, int]] = set()
        for share in shares:
            for index, pids in sorted(by_share[share.share_id].items()):
                used, limit = sum(pids.values()), share.limits.get(index, 0)
                if used <= limit:
                    continue
                key = (share.share_id, index)
                still_over.add(key)
                state = self._over.get(key)
                if state is None:
                    state = self._over[key] = _Over(since=now)
                    verdicts.append(self._verdict("warn", share, index, used, limit, pids))
                if self.mode == "stop" and not state.stopped and now - state.since >= self.grace_s:
                    state.stopped = True
                    verdicts.append(self._verdict("stop", share, index, used, limit, pids))
        # Back under the limit, or gone: the next time over starts afresh with a warning.
        self._over = {k: v for k, v in self._over.items() if k in still_over}
        return verdicts

    def _verdict(
        self,
        action: Literal["warn", "stop"],
        share: PolicedShare,
        index: int,
        used: int,
        limit: int,
        pids: Mapping[int, int],
    ) -> Verdict:
        over = (
            f"Share {share.share_id} uses {used} MiB on GPU {index}, more than its {limit} MiB"
            if index in share.limits
            else f"Share {share.share_id} uses {used} MiB on GPU {index}, which it was not granted"
        )
        if action == "stop":
            tail = "; its processes on that GPU are being stopped."
        elif self.mode == "stop":
            tail = f"; its processes will be stopped in {self.grace_s:g} s unless they free memory."
        else:
            tail = "; please free memory (this gateway only warns)."
        return Verdict(
            action,
            share.share_id,
            share.owner,
            index,
            used,
            limit,
            tuple(sorted(pids)),
            over + tail,
        )
