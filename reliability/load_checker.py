"""The load run's invariant checker and the parent's record of what every client holds.

Workers report each share their clients got, released or dropped (with times), and the
parent kills whole workers; from that the checker knows, at any moment, who should hold
what. It then asks the gateway, as an admin, for its GPUs and shares and checks:

- on every GPU, memory granted ≤ its memory (from ``list_gpus``, and again summed over the
  shares of one ``list_shares`` snapshot);
- every share the gateway holds has a live holder, or is inside one of the windows that
  are allowed explicitly: just granted and not yet recorded (``record_window_s`` after its
  creation), released by its holder after the snapshot was asked for, or its holder died
  (socket dropped, worker killed) less than lease grace + ``margin_s`` ago, plus the
  gateway's terminate grace when the share still has processes.

Times are ``time.time()`` of one machine, so the gateway's ``created`` compares with ours.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from remoting import tokens
from remoting.client import GatewayConnection, GatewayError

MAX_VIOLATIONS_KEPT = 50


@dataclass
class Holding:
    """One share as its client reported it."""

    user: str
    created: float  # the gateway's grant time
    recorded: float  # when the client had the reply
    ended: float | None = None
    how: str | None = None  # "released" or "abandoned"


@dataclass
class Records:
    """What the workers reported, filled by a reader thread; read under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    shares: dict[str, Holding] = field(default_factory=dict)
    worker_of: dict[str, int] = field(default_factory=dict)  # user -> worker
    died: dict[int, float] = field(default_factory=dict)  # worker -> time it was killed
    latency: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    ready: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    record_delay_max_s: float = 0.0

    def apply(self, worker: int, record: tuple[Any, ...]) -> None:
        kind = record[0]
        with self.lock:
            if kind == "held":
                _, user, share_id, created, got = record
                self.shares[share_id] = Holding(user, created, got)
                self.record_delay_max_s = max(self.record_delay_max_s, got - created)
            elif kind in ("released", "abandoned"):
                _, user, share_id, at = record
                holding = self.shares.get(share_id)
                if holding is not None:
                    holding.ended, holding.how = at, kind
            elif kind == "stats":
                _, latency, counts, errors = record
                for k, values in latency.items():
                    self.latency[k].extend(values)
                self.counts.update(counts)
                self.errors.extend(f"worker {worker}: {e}" for e in errors)
            elif kind == "ready":
                self.ready.add(worker)
            elif kind == "done":
                self.done.add(worker)

    def unexpected(self, text: str) -> None:
        with self.lock:
            self.counts["unexpected"] += 1
            self.errors.append(text)


class Pump:
    """Reads every worker's pipe into the records, on a thread of its own."""

    def __init__(self, records: Records):
        self.records = records
        self._lock = threading.Lock()
        self._conns: dict[Connection, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pump", daemon=True)
        self._thread.start()

    def add(self, conn: Connection, worker: int) -> None:
        with self._lock:
            self._conns[conn] = worker

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                conns = list(self._conns)
            if not conns:
                time.sleep(0.05)
                continue
            for ready in wait(conns, timeout=0.1):
                conn = cast(Connection, ready)
                worker = self._conns[conn]
                try:
                    self.records.apply(worker, conn.recv())
                except (EOFError, OSError):  # the worker ended, or was killed mid-message
                    with self._lock:
                        del self._conns[conn]
                    conn.close()

    def idle(self) -> bool:
        with self._lock:
            return not self._conns

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Checker:
    """Asks the gateway for its state and checks the invariant against the records."""

    address: str
    admin_token: str
    records: Records
    lease_s: float
    margin_s: float
    terminate_grace_s: float
    record_window_s: float
    timeout_s: float = 30.0
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    dead: dict[str, float] = field(default_factory=dict)  # share -> its holder's death
    freed_after_death_s: list[float] = field(default_factory=list)
    last_shares: list[dict[str, Any]] = field(default_factory=list)
    last_gpus: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))

    def __post_init__(self) -> None:
        self.conn = GatewayConnection(
            self.address, tokens.parse(self.admin_token), timeout=self.timeout_s
        )

    def _ask(self, kind: str) -> dict[str, Any]:
        start = time.perf_counter()
        data = self.conn.request(kind)
        self.latency[f"admin {kind}"].append((time.perf_counter() - start) * 1000)
        return data

    def violation(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < MAX_VIOLATIONS_KEPT:
            self.violations.append(f"{time.strftime('%H:%M:%S')} {text}")

    def check(self) -> None:
        """One round: GPUs, then shares, then every share's holder."""
        try:
            gpus = self._ask("list_gpus")
            asked = time.time()
            shares = self._ask("list_shares")["shares"]
        except GatewayError as exc:
            self.records.unexpected(f"checker: {exc.code}: {exc}")
            return
        self.checks += 1
        self.last_gpus, self.last_shares = gpus, shares
        self._check_gpus(gpus["gpus"], shares)
        with self.records.lock:
            self._check_holders(shares, asked)

    def _check_gpus(self, rows: list[dict[str, Any]], shares: list[dict[str, Any]]) -> None:
        total = {g["index"]: g["memory_total_mib"] for g in rows}
        for g in rows:
            granted = g["memory_granted_mib"]
            if granted > g["memory_total_mib"] or sum(g["share_sizes_mib"]) != granted:
                self.violation(
                    f"GPU {g['index']}: granted {granted} MiB of {g['memory_total_mib']}, "
                    f"shares {g['share_sizes_mib']}"
                )
        summed: collections.Counter[int] = collections.Counter()
        for s in shares:
            for g in s["gpus"]:
                summed[g["index"]] += g["mib"]
        for index, mib in summed.items():
            if mib > total.get(index, 0):
                self.violation(f"GPU {index}: its shares add up to {mib} MiB of {total[index]}")

    def _check_holders(self, shares: list[dict[str, Any]], asked: float) -> None:
        recs = self.records
        present = set()
        for s in shares:
            sid, owner, created = s["share_id"], s["owner"], s["created"]
            # A share with processes is freed once they stop: one that ignores SIGTERM gets
            # the gateway's terminate grace before SIGKILL, so its memory is held till then.
            allowed_after_death = self.lease_s + self.margin_s
            if s.get("processes"):
                allowed_after_death += self.terminate_grace_s
            present.add(sid)
            holding = recs.shares.get(sid)
            death = recs.died.get(recs.worker_of.get(owner, -1))
            dead_since: float | None = None
            if holding is None:
                if death is not None:
                    # Granted to a client killed before it could record it, or even after
                    # its death: a request still queued at the gateway is served all the same.
                    dead_since = max(death, created)
                elif asked - created > self.record_window_s:
                    self.violation(
                        f"share {sid} of {owner} has no holder: granted "
                        f"{asked - created:.1f} s ago, no client ever got it"
                    )
            elif holding.how is None:
                dead_since = death  # None: a live client holds it
            elif holding.how == "released":
                if holding.ended is not None and holding.ended < asked:
                    self.violation(
                        f"share {sid} of {owner} still held {asked - holding.ended:.1f} s "
                        "after its release was answered"
                    )
            else:
                dead_since = holding.ended
            if dead_since is not None:
                self.dead.setdefault(sid, dead_since)
                if asked - dead_since > allowed_after_death:
                    self.violation(
                        f"share {sid} of {owner} still held {asked - dead_since:.1f} s after "
                        f"its holder died (allowed {allowed_after_death:g} s)"
                    )
        now = time.time()
        for sid, since in list(self.dead.items()):
            if sid not in present:
                self.freed_after_death_s.append(now - since)
                del self.dead[sid]

    def close(self) -> None:
        self.conn.close()
