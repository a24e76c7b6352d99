"""Load: many concurrent clients allocating, using and releasing shares against one gateway.

    python reliability/load.py [--clients 200] [--seconds 60] [--json FILE]

Starts its own gateway on a simulated pool, then the clients (each its own user, token and
connection), spread over worker processes with a thread per client. Partway through, one
worker is killed with SIGKILL (its clients' shares lose their holders at once) and a fresh
worker with fresh users takes its place; clients also drop shares now and then by closing
their socket without releasing. Throughout, an admin connection checks the invariant (see
load_checker.py). At the end every share must be gone, and the gateway's log must hold no
traceback. Prints the figures (operations, refusals, latency, gateway memory); exits 1 on
any violation or unexpected error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import cluster_keys  # noqa: E402
from gateway.spawned import SpawnedGateway, free_port, stop_leftovers  # noqa: E402
from reliability.load_checker import Checker, Pump, Records  # noqa: E402
from reliability.load_client import Plan, worker_main  # noqa: E402
from reliability.load_report import (  # noqa: E402
    OPERATIONS,
    log_problems,
    print_report,
    summarize,
    verdict,
)
from remoting import tokens  # noqa: E402

PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 200
    seconds: float = 60.0
    workers: int = 4
    gpus: int = 4
    gpu_gib: int = 16
    lease_s: float = 3.0
    margin_s: float = 1.5  # past lease grace: the gateway's 0.25 s tick and a busy loop
    terminate_grace_s: float = 5.0  # the gateway's default: SIGTERM, then SIGKILL after it
    record_window_s: float = 5.0
    spawn_prob: float = 0.01
    abandon_prob: float = 0.01
    kill_at: float = 0.4  # of the run, when one worker is killed
    check_every_s: float = 0.25
    timeout_s: float = 30.0
    seed: int = 7


def gateway_rss_mib(pid: int) -> float | None:
    """The gateway's resident memory (psutil is not a dependency: read /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Run:
    """One load run against one gateway: workers, checker, the kill, the final sweep."""

    def __init__(self, cfg: LoadConfig, gw: SpawnedGateway):
        self.cfg = cfg
        self.gw = gw
        self.keys = cluster_keys.load_or_create(gw.state_dir)
        self.ctx = mp.get_context("spawn")  # no fork of a process that has threads and zmq
        self.go = self.ctx.Event()
        self.until = self.ctx.RawValue("d", 0.0)
        self.records = Records()
        self.pump = Pump(self.records)
        self.plan = Plan(
            address=gw.address,
            gpus=cfg.gpus,
            gpu_mib=cfg.gpu_gib * 1024,
            lease_s=cfg.lease_s,
            spawn_prob=cfg.spawn_prob,
            abandon_prob=cfg.abandon_prob,
            timeout_s=cfg.timeout_s,
            seed=cfg.seed,
        )
        self.procs: list[Any] = []
        self.users = 0
        self.killed: int | None = None
        self.held_at_kill = 0
        self.rss: list[float] = []

    def start_worker(self, clients: int) -> None:
        index = len(self.procs)
        users = []
        # Tokens are minted here with the pool's keys: a `token create` process per user
        # would take minutes on two cores.
        for _ in range(clients):
            user = f"load-{self.users:03d}"
            self.users += 1
            users.append((user, str(tokens.mint(self.keys.token_secret, self.keys.public, user))))
        with self.records.lock:
            self.records.worker_of.update((u, index) for u, _ in users)
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=worker_main,
            args=(self.plan, users, self.until, self.go, writer),
            name=f"load-worker-{index}",
            daemon=True,
        )
        proc.start()
        writer.close()
        self.pump.add(reader, index)
        self.procs.append(proc)

    def kill_one(self) -> None:
        """SIGKILL a worker: its clients vanish mid-whatever, holding their shares."""
        victim = 0
        self.procs[victim].kill()
        self.procs[victim].join(10)
        with self.records.lock:
            self.records.died[victim] = time.time()
            self.held_at_kill = sum(
                1
                for h in self.records.shares.values()
                if h.how is None and self.records.worker_of.get(h.user) == victim
            )
        self.killed = victim
        print(f"  killed worker {victim} (SIGKILL), its clients held {self.held_at_kill} shares")
        self.start_worker(self._clients_of(victim))

    def _clients_of(self, index: int) -> int:
        return sum(1 for w in self.records.worker_of.values() if w == index)

    def sample_rss(self) -> None:
        assert self.gw.proc is not None
        rss = gateway_rss_mib(self.gw.proc.pid)
        if rss is not None:
            self.rss.append(rss)

    def workers_finished(self) -> bool:
        return all(not p.is_alive() for i, p in enumerate(self.procs) if i != self.killed)

    def drive(self) -> dict[str, Any]:
        cfg = self.cfg
        checker = Checker(
            self.gw.address,
            self.gw.token("load-admin", admin=True),
            self.records,
            lease_s=cfg.lease_s,
            margin_s=cfg.margin_s,
            terminate_grace_s=cfg.terminate_grace_s,
            record_window_s=cfg.record_window_s,
            timeout_s=cfg.timeout_s,
        )
        for i in range(cfg.workers):
            self.start_worker(cfg.clients // cfg.workers + (i < cfg.clients % cfg.workers))
        self.wait_ready(cfg.workers)
        self.sample_rss()
        started = time.time()
        self.until.value = started + cfg.seconds
        self.go.set()
        kill_at = started + cfg.seconds * cfg.kill_at
        next_progress = started + PROGRESS_EVERY_S
        stop_by = self.until.value + cfg.timeout_s + 10
        while True:
            tick = time.monotonic()
            checker.check()
            self.sample_rss()
            now = time.time()
            if self.killed is None and now >= kill_at:
                self.kill_one()
            if now >= next_progress:
                self.progress(checker, now - started)
                next_progress += PROGRESS_EVERY_S
            if now >= self.until.value and self.workers_finished():
                break
            if now >= stop_by:
                self.records.unexpected("a worker did not stop after the run's end")
                break
            time.sleep(max(0.0, cfg.check_every_s - (time.monotonic() - tick)))
        elapsed = time.time() - started
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        self.wait_pump()
        leaked = self.final_sweep(checker)
        self.progress(checker, time.time() - started)
        checker.close()
        self.pump.stop()
        return summarize(self.records, self.rss, self.held_at_kill, checker, elapsed, leaked)

    def wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.records.ready) < workers:
            if time.monotonic() > deadline or not all(p.is_alive() for p in self.procs):
                raise RuntimeError("the load's worker processes did not start")
            time.sleep(0.05)

    def wait_pump(self) -> None:
        deadline = time.monotonic() + 10
        while not self.pump.idle() and time.monotonic() < deadline:
            time.sleep(0.05)

    def final_sweep(self, checker: Checker) -> list[dict[str, Any]]:
        """Every client is gone: within lease grace + margin (+ terminate grace, for a
        process that ignores SIGTERM) the gateway must hold nothing."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.lease_s + cfg.margin_s + cfg.terminate_grace_s + 2
        while True:
            checker.check()
            self.sample_rss()
            if not checker.last_shares or time.monotonic() > deadline:
                break
            time.sleep(self.cfg.check_every_s)
        for s in checker.last_shares:
            checker.violation(f"share {s['share_id']} of {s['owner']} leaked: held after the run")
        return checker.last_shares

    def expired_live(self, ledger: Path) -> list[str]:
        """Shares whose lease expired although, by the records, a live client held them
        (read from the stopped gateway's ledger: its events name every expiry)."""
        db = sqlite3.connect(ledger)
        try:
            rows = db.execute(
                "SELECT ts, share_id, user FROM events WHERE kind = 'lease_expired'"
            ).fetchall()
        finally:
            db.close()
        out = []
        with self.records.lock:
            for ts, sid, user in rows:
                holding = self.records.shares.get(sid)
                death = self.records.died.get(self.records.worker_of.get(user, -1))
                if death is not None:
                    continue
                if holding is not None and holding.how == "abandoned":
                    continue
                out.append(f"{sid} of {user}: {holding} expired at {ts:.3f}")
        return out

    def progress(self, checker: Checker, t: float) -> None:
        with self.records.lock:
            ops = sum(len(v) for k, v in self.records.latency.items() if k in OPERATIONS)
            refused = sum(n for k, n in self.records.counts.items() if k.startswith("refused_"))
            unexpected = self.records.counts["unexpected"]
        print(
            f"  {t:5.0f} s  ops {ops:>8,} ({ops / max(t, 1e-9):>5.0f}/s)  refusals {refused:>7,}"
            f"  unexpected {unexpected}  shares {len(checker.last_shares):>3}"
            f"  dead-freed {len(checker.freed_after_death_s):>3}"
            f"  checks {checker.checks:>4}  violations {checker.violation_count}"
            f"  gateway RSS {self.rss[-1] if self.rss else 0:.0f} MiB",
            flush=True,
        )


def run_load(cfg: LoadConfig, log_copy: Path | None = None) -> dict[str, Any]:
    """Start a gateway, drive the load against it, stop it; the figures as a dict."""
    with tempfile.TemporaryDirectory(prefix="bf-load-") as tmp:
        gw = SpawnedGateway(
            state_dir=Path(tmp) / "state",
            port=free_port(),
            args=[
                "--simulate-gpus",
                f"{cfg.gpus}x{cfg.gpu_gib}GiB",
                "--lease-grace",
                f"{cfg.lease_s:g}",
            ],
            log_path=Path(tmp) / "gateway.log",
            name="loadhost",
        )
        gw.start()
        print(
            f"gateway {gw.address}, simulated {cfg.gpus} × {cfg.gpu_gib} GiB, lease grace "
            f"{cfg.lease_s:g} s; {cfg.clients} clients in {cfg.workers} worker processes "
            f"for {cfg.seconds:g} s",
            flush=True,
        )
        run = Run(cfg, gw)
        try:
            figures = run.drive()
        finally:
            gw.stop()
            stop_leftovers(gw.state_dir)
        figures["expired_live"] = run.expired_live(gw.state_dir / "ledger.sqlite3")
        log = gw.log()
        if log_copy is not None:
            log_copy.write_text(log)
    figures["config"] = asdict(cfg)
    figures["gateway_log"] = log_problems(log)
    figures["ok"] = verdict(figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = LoadConfig()
    parser.add_argument("--clients", type=int, default=d.clients)
    parser.add_argument("--seconds", type=float, default=d.seconds)
    parser.add_argument("--workers", type=int, default=d.workers, help="client processes")
    parser.add_argument("--lease-grace", type=float, default=d.lease_s, dest="lease_s")
    parser.add_argument("--spawn-prob", type=float, default=d.spawn_prob)
    parser.add_argument("--abandon-prob", type=float, default=d.abandon_prob)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures here")
    parser.add_argument("--gateway-log", type=Path, metavar="FILE", help="keep its log here")
    args = parser.parse_args(argv)
    if args.workers < 2 or args.clients < args.workers:
        parser.error("give at least 2 workers (one is killed) and a client per worker")
    cfg = LoadConfig(
        clients=args.clients,
        seconds=args.seconds,
        workers=args.workers,
        lease_s=args.lease_s,
        spawn_prob=args.spawn_prob,
        abandon_prob=args.abandon_prob,
        seed=args.seed,
    )
    figures = run_load(cfg, args.gateway_log)
    print_report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
