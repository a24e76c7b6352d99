"""The share ledger: which shares exist, on which GPUs, for whom, until when; kept in SQLite.

The gateway's event loop is the only writer, so the ledger needs no locks; every change is one
transaction, so a gateway killed at any point restarts with a ledger that never holds a share
twice or frees one twice. Releasing is idempotent: the second release of a share is a no-op.
"""

from __future__ import annotations

import collections
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.gpus import GpuInfo
from remoting.shares import Slot, Want

SCHEMA = """
CREATE TABLE IF NOT EXISTS shares (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, client_host TEXT NOT NULL,
    gpus TEXT NOT NULL, whole INTEGER NOT NULL, created REAL NOT NULL,
    lease_expires REAL NOT NULL, release_on_exit INTEGER NOT NULL,
    state TEXT NOT NULL, ended REAL, end_reason TEXT
);
CREATE TABLE IF NOT EXISTS processes (
    id TEXT PRIMARY KEY, share_id TEXT NOT NULL, argv TEXT NOT NULL,
    socket_path TEXT, status_path TEXT, nanny_pid INTEGER, pid INTEGER,
    state TEXT NOT NULL, exit_code INTEGER, started REAL NOT NULL, kernel TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    user TEXT, share_id TEXT, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked (nonce TEXT PRIMARY KEY, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS shares_state ON shares(state);
"""
MAX_EVENTS = 10_000
# Columns added after a table was first shipped: (table, column, type). A state database of
# an older gateway gains them on open, so an upgrade keeps its shares and processes.
ADDED_COLUMNS = [("processes", "kernel", "TEXT")]


@dataclass
class Share:
    id: str
    owner: str
    client_host: str
    gpus: dict[int, int]  # GPU index -> MiB granted on it
    whole: bool
    created: float
    lease_expires: float
    release_on_exit: bool
    state: str = "active"

    def public(self, gpus: Sequence[GpuInfo]) -> dict[str, Any]:
        by_index = {g.index: g for g in gpus}
        return {
            "share_id": self.id,
            "owner": self.owner,
            "client_host": self.client_host,
            "gpus": [
                {
                    "index": i,
                    "uuid": by_index[i].uuid,
                    "name": by_index[i].name,
                    "mib": mib,
                    "total_mib": by_index[i].memory_total_mib,
                    "simulated": by_index[i].simulated,
                }
                for i, mib in self.gpus.items()
            ],
            "whole": self.whole,
            "created": self.created,
            "lease_expires_in": round(max(0.0, self.lease_expires - time.time()), 1),
        }


@dataclass
class Process:
    id: str
    share_id: str
    argv: list[str]
    socket_path: str | None
    status_path: str | None
    nanny_pid: int | None
    pid: int | None
    state: str = "running"
    exit_code: int | None = None
    started: float = field(default_factory=time.time)
    # For a kernel: {"kernel_id", "connection_file", "name", "channels"}
    kernel: dict[str, Any] | None = None


class Ledger:
    """Shares, processes and events of one gateway, mirrored in memory for speed."""

    def __init__(self, db_path: Path, gpus: Sequence[GpuInfo]):
        self.gpus = list(gpus)
        self.draining: set[int] = set()
        self.db = sqlite3.connect(db_path, isolation_level=None)
        # WAL with synchronous=NORMAL: a commit is durable against a process crash (what we
        # guard against) without an fsync per grant, which keeps allocation fast.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()
        self.shares: dict[str, Share] = {}
        self.processes: dict[str, Process] = {}
        self._revoked: set[str] = set()
        self._revoked_version: int | None = None
        self.counts: collections.Counter[str] = collections.Counter()  # events since start
        self._load()
        self.draining = set(self.setting("draining", []))

    # --- loading -------------------------------------------------------------------------
    def _migrate(self) -> None:
        for table, column, kind in ADDED_COLUMNS:
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _load(self) -> None:
        for row in self.db.execute(
            "SELECT id, owner, client_host, gpus, whole, created, lease_expires, release_on_exit"
            " FROM shares WHERE state='active'"
        ):
            sid, owner, host, gpus, whole, created, expires, roe = row
            gpu_map = {int(k): v for k, v in json.loads(gpus).items()}
            self.shares[sid] = Share(
                sid, owner, host, gpu_map, bool(whole), created, expires, bool(roe)
            )
        for row in self.db.execute(
            "SELECT id, share_id, argv, socket_path, status_path, nanny_pid, pid, started, kernel"
            " FROM processes WHERE state='running'"
        ):
            pid_, share_id, argv, sock, status, nanny, pid, started, kernel = row
            self.processes[pid_] = Process(
                pid_,
                share_id,
                json.loads(argv),
                sock,
                status,
                nanny,
                pid,
                started=started,
                kernel=json.loads(kernel) if kernel else None,
            )

    # --- memory accounting ---------------------------------------------------------------
    def granted_mib(self, index: int) -> int:
        return sum(s.gpus.get(index, 0) for s in self.shares.values())

    def free_mib(self, index: int) -> int:
        gpu = next(g for g in self.gpus if g.index == index)
        return gpu.memory_total_mib - self.granted_mib(index)

    def shares_on(self, index: int) -> list[Share]:
        return [s for s in self.shares.values() if index in s.gpus]

    def slots(self, eligible: Iterable[int], draining_too: bool = False) -> list[Slot]:
        """The GPUs as placement sees them; draining ones take no share unless asked."""
        ok = set(eligible) - (set() if draining_too else self.draining)
        return [
            Slot(g.index, g.memory_total_mib, self.free_mib(g.index), g.index in ok)
            for g in self.gpus
        ]

    # --- shares --------------------------------------------------------------------------
    def grant(
        self,
        owner: str,
        client_host: str,
        placement: dict[int, int],
        want: Want,
        lease_s: float,
        release_on_exit: bool,
    ) -> Share:
        for index, mib in placement.items():
            if mib > self.free_mib(index):  # the invariant, checked where it is kept
                raise RuntimeError(f"refusing to over-grant GPU {index}")
        now = time.time()
        share = Share(
            id=self.new_id("s-", "shares"),
            owner=owner,
            client_host=client_host,
            gpus=dict(placement),
            whole=want.mib is None and want.fraction is None,
            created=now,
            lease_expires=now + lease_s,
            release_on_exit=release_on_exit,
        )
        with self._tx():
            self.db.execute(
                "INSERT INTO shares VALUES (?,?,?,?,?,?,?,?,'active',NULL,NULL)",
                (
                    share.id,
                    owner,
                    client_host,
                    json.dumps(share.gpus),
                    int(share.whole),
                    now,
                    share.lease_expires,
                    int(release_on_exit),
                ),
            )
            self._event("grant", owner, share.id, f"{want.describe()} on GPUs {list(placement)}")
        self.shares[share.id] = share
        return share

    def new_id(self, prefix: str, table: str) -> str:
        """A short id (prefix + 8 hex digits) that no row of ``table`` has had: ended shares
        and processes stay in the tables, and 32 random bits collide after some 10^4 ids."""
        assert table in ("shares", "processes")
        while True:
            candidate = prefix + secrets.token_hex(4)
            if not self.db.execute(f"SELECT 1 FROM {table} WHERE id=?", (candidate,)).fetchone():
                return candidate

    def renew(self, share: Share, lease_s: float) -> None:
        share.lease_expires = time.time() + lease_s
        # Lease renewals are frequent; they are written so a restart keeps the right expiry.
        self.db.execute(
            "UPDATE shares SET lease_expires=? WHERE id=?", (share.lease_expires, share.id)
        )

    def extend_all(self, lease_s: float) -> None:
        """After a restart, give every holder a full grace to reconnect."""
        for share in self.shares.values():
            self.renew(share, lease_s)

    def release(self, share_id: str, reason: str, user: str | None = None) -> Share | None:
        """End a share; returns it, or None when it had already ended (idempotent)."""
        share = self.shares.pop(share_id, None)
        if share is None:
            return None
        with self._tx():
            self.db.execute(
                "UPDATE shares SET state='released', ended=?, end_reason=? WHERE id=?",
                (time.time(), reason, share_id),
            )
            self._event("release", user or share.owner, share_id, reason)
        return share

    def expired(self, now: float) -> list[Share]:
        return [s for s in self.shares.values() if s.lease_expires < now]

    # --- processes -----------------------------------------------------------------------
    def add_process(self, proc: Process) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO processes VALUES (?,?,?,?,?,?,?,'running',NULL,?,?)",
                (
                    proc.id,
                    proc.share_id,
                    json.dumps(proc.argv),
                    proc.socket_path,
                    proc.status_path,
                    proc.nanny_pid,
                    proc.pid,
                    proc.started,
                    json.dumps(proc.kernel) if proc.kernel else None,
                ),
            )
        self.processes[proc.id] = proc

    def set_pid(self, proc: Process, pid: int) -> None:
        proc.pid = pid
        self.db.execute("UPDATE processes SET pid=? WHERE id=?", (pid, proc.id))

    def finish_process(self, proc_id: str, exit_code: int | None) -> Process | None:
        proc = self.processes.pop(proc_id, None)
        if proc is None:
            return None
        proc.state, proc.exit_code = "exited", exit_code
        self.db.execute(
            "UPDATE processes SET state='exited', exit_code=? WHERE id=?", (exit_code, proc_id)
        )
        return proc

    def processes_of(self, share_id: str) -> list[Process]:
        return [p for p in self.processes.values() if p.share_id == share_id]

    # --- events and tokens ---------------------------------------------------------------
    def _event(self, kind: str, user: str | None, share_id: str | None, detail: str) -> None:
        self.counts[kind] += 1
        self.db.execute(
            "INSERT INTO events (ts, kind, user, share_id, detail) VALUES (?,?,?,?,?)",
            (time.time(), kind, user, share_id, detail),
        )

    def event(self, kind: str, user: str | None, share_id: str | None, detail: str) -> None:
        with self._tx():
            self._event(kind, user, share_id, detail)

    def trim_events(self) -> None:
        self.db.execute(
            "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (MAX_EVENTS,)
        )

    def events(self, user: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        where, args = ("WHERE user=?", (user,)) if user else ("", ())
        rows = self.db.execute(
            f"SELECT ts, kind, user, share_id, detail FROM events {where} ORDER BY id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        keys = ("ts", "kind", "user", "share_id", "detail")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One transaction: the statements inside commit together or not at all."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def revoke(self, nonce: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO revoked VALUES (?,?)", (nonce, time.time()))
        self._revoked.add(nonce)  # our own writes do not move data_version

    # --- settings an admin changes at run time (they survive a restart) -------------------
    def setting(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO settings VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, json.dumps(value)),
        )

    def set_draining(self, index: int, drain: bool) -> None:
        if drain:
            self.draining.add(index)
        else:
            self.draining.discard(index)
        self.set_setting("draining", sorted(self.draining))

    def is_revoked(self, nonce: str) -> bool:
        """Asked on every message, so answered from memory. `token revoke` writes from another
        process; SQLite's data_version (a cheap counter) says when to read the table again."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._revoked_version:
            self._revoked = {r[0] for r in self.db.execute("SELECT nonce FROM revoked")}
            self._revoked_version = version
        return nonce in self._revoked

    def close(self) -> None:
        self.db.close()
