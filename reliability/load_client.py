"""The clients of the load run: one worker process drives many clients, one thread each.

Every client is a user of its own with its own token and its own GatewayConnection (its own
DEALER socket and Curve key pair), exactly as separate machines would be. A client loops:
allocate a share of a random size, use it (renew, list_shares, now and then run a tiny
command in it), then release it, or now and then drop it on the floor (close the socket
without releasing), so the gateway has holders that vanish.

The worker tells the parent what its clients hold over a pipe of its own: a worker killed
with SIGKILL can only break its own pipe, and each record is one small write (atomic on a
pipe), so it arrives whole or not at all.
"""

from __future__ import annotations

import collections
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from remoting import protocol, tokens
from remoting.client import GatewayConnection, GatewayError

REFUSALS = (protocol.E_NO_FIT, protocol.E_NEVER_FITS)
MAX_ERRORS_KEPT = 40  # per worker and flush: enough to diagnose, not a flood
MAX_REFUSAL_CHARS = 600

# Tiny commands run in a share now and then, with the output each must print.
COMMANDS: list[tuple[list[str], bytes]] = [
    (["true"], b""),
    (["echo", "ok"], b"ok\n"),
    ([sys.executable, "-c", "print(6 * 7)"], b"42\n"),
]
# A command still running when its share is released, which ignores SIGTERM: the gateway
# must wait out its terminate grace and kill it, without keeping other clients waiting.
STUBBORN = ["sh", "-c", "trap '' TERM; sleep 30"]
STUBBORN_SHARE = 0.2  # of the commands run


@dataclass(frozen=True)
class Plan:
    """What every client of a run is told (picklable, passed to worker processes)."""

    address: str
    gpus: int  # the simulated pool's GPU count and MiB per GPU, to know what never fits
    gpu_mib: int
    lease_s: float
    spawn_prob: float
    abandon_prob: float
    timeout_s: float
    seed: int


@dataclass(frozen=True)
class Ask:
    """One allocation request."""

    gpus: int
    mib: int | None = None
    fraction: float | None = None

    def never_fits(self, plan: Plan) -> bool:
        return self.gpus > plan.gpus or (self.mib is not None and self.mib > plan.gpu_mib)


def pick_ask(rng: random.Random) -> Ask:
    """A mix of sizes: mostly small slices, which fit unless the pool is nearly full; some
    big or whole GPUs, which often find no room now; and a few that this pool can never
    hold. So both kinds of refusal happen, yet most requests are granted."""
    r = rng.random()
    if r < 0.45:
        return Ask(1, mib=rng.choice([128, 256, 512, 1024]))
    if r < 0.70:
        return Ask(1, fraction=rng.choice([0.01, 0.02, 0.05, 0.1]))
    if r < 0.80:
        return Ask(2, mib=rng.choice([256, 512, 1024]))
    if r < 0.85:
        return Ask(4, fraction=0.02)
    if r < 0.93:
        return rng.choice([Ask(1, mib=rng.choice([8192, 12288])), Ask(1, fraction=0.75)])
    if r < 0.96:
        return Ask(1)  # a whole GPU
    return rng.choice([Ask(1, mib=20480), Ask(5, mib=256), Ask(8, fraction=0.1)])


def clear_refusal(exc: GatewayError) -> bool:
    """A refusal a user can act on: the right code and one line of plain text."""
    text = str(exc)
    return (
        exc.code in REFUSALS
        and 0 < len(text) <= MAX_REFUSAL_CHARS
        and "\n" not in text
        and "Traceback" not in text
        and text.endswith(".")
    )


class Unexpected(Exception):
    """Something a client saw that is neither success nor a clear refusal."""


class Reporter:
    """A worker's one pipe to the parent, shared by its client threads."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._lock = threading.Lock()
        self._latency: dict[str, list[float]] = collections.defaultdict(list)
        self._counts: collections.Counter[str] = collections.Counter()
        self._errors: list[str] = []

    def send(self, *record: Any) -> None:
        with self._lock:
            self._conn.send(record)

    def latency(self, kind: str, ms: float) -> None:
        with self._lock:
            self._latency[kind].append(ms)

    def count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def unexpected(self, text: str) -> None:
        with self._lock:
            self._counts["unexpected"] += 1
            if len(self._errors) < MAX_ERRORS_KEPT:
                self._errors.append(text)

    def flush(self) -> None:
        """Send what was measured since the last flush (every second, and at the end)."""
        with self._lock:
            record = ("stats", dict(self._latency), dict(self._counts), self._errors)
            self._latency, self._counts = collections.defaultdict(list), collections.Counter()
            self._errors = []
            self._conn.send(record)


class Client:
    """One user looping over allocate, use, release until the run's end."""

    def __init__(self, user: str, token: str, plan: Plan, until: float, report: Reporter):
        self.user = user
        self.token = tokens.parse(token)
        self.plan = plan
        self.until = until
        self.report = report
        self.rng = random.Random(f"{plan.seed}-{user}")
        self.conn = self._connect()
        self.held: str | None = None

    def _connect(self) -> GatewayConnection:
        return GatewayConnection(self.plan.address, self.token, timeout=self.plan.timeout_s)

    def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return self.conn.request(kind, **fields)
        finally:
            self.report.latency(kind, (time.perf_counter() - start) * 1000)

    def run(self) -> None:
        while time.time() < self.until:
            try:
                self.cycle()
            except Exception as exc:
                self._failed(exc)
        if self.held is not None:  # a failure at the very end left one
            self._release()
        self.conn.close()

    def _failed(self, exc: Exception) -> None:
        """Record what went wrong; give back what we hold on a fresh connection, go on."""
        if isinstance(exc, GatewayError | Unexpected):
            text = f"{type(exc).__name__} {getattr(exc, 'code', '')}: {exc}"
        else:
            text = "".join(traceback.format_exception(exc)).strip()
        self.report.unexpected(f"{self.user}: {text}")
        self.conn.close()
        self.conn = self._connect()
        if self.held is not None:
            try:
                self._release()
            except Exception:  # it stays a dead holder's share; the checker allows its grace
                self.report.send("abandoned", self.user, self.held, time.time())
                self.held = None
        time.sleep(0.5)

    def cycle(self) -> None:
        ask = pick_ask(self.rng)
        try:
            data = self.request(
                "allocate",
                gpus=ask.gpus,
                mib=ask.mib,
                fraction=ask.fraction,
                wait_s=0,
                client_host="load",
            )
        except GatewayError as exc:
            if exc.code not in REFUSALS:
                raise
            self._refused(ask, exc)
            time.sleep(self.rng.uniform(0.05, 0.3))
            return
        share = data["share"]
        self.held = share["share_id"]
        self.report.send("held", self.user, self.held, share["created"], time.time())
        self._check_grant(ask, share)
        self.request("renew", share_id=self.held)
        time.sleep(self.rng.uniform(0.0, 0.25))
        mine = self.request("list_shares")["shares"]
        if self.held not in {s["share_id"] for s in mine}:
            raise Unexpected(f"list_shares does not show the held share {self.held}")
        if any(s["owner"] != self.user for s in mine):
            raise Unexpected("list_shares shows another user's share to a user token")
        if self.rng.random() < self.plan.spawn_prob:
            if self.rng.random() < STUBBORN_SHARE:
                self.request("spawn", share_id=self.held, argv=STUBBORN)
                self.report.count("released_running")
            else:
                self._run_command(self.rng.choice(COMMANDS))
        time.sleep(self.rng.uniform(0.0, 0.25))
        if self.rng.random() < self.plan.abandon_prob:
            self._abandon()
        else:
            self._release()
        time.sleep(self.rng.uniform(0.0, 0.1))

    def _refused(self, ask: Ask, exc: GatewayError) -> None:
        self.report.count(f"refused_{exc.code}")
        expected = protocol.E_NEVER_FITS if ask.never_fits(self.plan) else protocol.E_NO_FIT
        if exc.code != expected:
            raise Unexpected(f"{ask} was refused with {exc.code!r}, not {expected!r}: {exc}")
        if not clear_refusal(exc):
            raise Unexpected(f"an unclear refusal of {ask}: {str(exc)[:300]!r}")

    def _check_grant(self, ask: Ask, share: dict[str, Any]) -> None:
        sizes = [g["mib"] for g in share["gpus"]]
        want = ask.mib if ask.mib is not None else None
        if ask.never_fits(self.plan):
            raise Unexpected(f"{ask} can never fit, yet was granted {sizes}")
        if len(sizes) != ask.gpus or (want is not None and any(s != want for s in sizes)):
            raise Unexpected(f"{ask} was granted {sizes}")

    def _release(self) -> None:
        assert self.held is not None
        self.request("release", share_id=self.held)
        self.report.send("released", self.user, self.held, time.time())
        self.held = None

    def _abandon(self) -> None:
        """Vanish without releasing; now and then with a process still running in the share,
        which the gateway must end too before it frees the share."""
        assert self.held is not None
        if self.rng.random() < 0.3:
            self.request("spawn", share_id=self.held, argv=["sleep", "30"])
            self.report.count("abandoned_running")
        self.report.send("abandoned", self.user, self.held, time.time())
        self.report.count("abandoned")
        self.conn.close()
        self.held = None
        self.conn = self._connect()

    def _run_command(self, command: tuple[list[str], bytes]) -> None:
        """Run a tiny command in the share and wait for its output and exit, renewing the
        lease meanwhile as `bitfusion run` does."""
        argv, expected = command
        assert self.held is not None
        start = time.perf_counter()
        proc_id = self.request("spawn", share_id=self.held, argv=argv)["proc_id"]
        self.conn.send("stdin_close", proc_id=proc_id, seq=1)
        out = b""
        renew_every = self.plan.lease_s / 4
        next_renew = time.monotonic() + renew_every
        give_up = time.monotonic() + self.plan.timeout_s
        while True:
            msg = self.conn.receive(0.1)
            now = time.monotonic()
            if now >= next_renew:
                self.request("renew", share_id=self.held)
                next_renew = now + renew_every
            if now > give_up:
                raise Unexpected(f"{argv[0]} in share {self.held} did not exit within the timeout")
            if msg is None or msg.get("proc_id") != proc_id:
                continue
            if msg.type == "out":
                out += protocol.as_bytes(msg.payloads[0])
            elif msg.type == "exit":
                self.conn.send("ack", proc_id=proc_id, seq=msg["seq"])
                self.report.latency("spawn→exit", (time.perf_counter() - start) * 1000)
                if msg["code"] != 0 or out != expected:
                    raise Unexpected(f"{argv} exited {msg['code']} with output {out[:200]!r}")
                return


def worker_main(
    plan: Plan, users: list[tuple[str, str]], until: Any, go: Any, conn: Connection
) -> None:
    """One worker process: a thread per client until ``until`` (a shared double, set before
    ``go``), measurements flushed to the parent every second."""
    report = Reporter(conn)
    report.send("ready")  # imported and about to connect: the parent starts the clock
    go.wait()
    deadline = until.value
    clients = []
    for user, token in users:
        try:
            clients.append(Client(user, token, plan, deadline, report))
        except Exception as exc:
            report.unexpected(f"{user}: could not connect: {exc}")
    threads = [threading.Thread(target=c.run, name=c.user, daemon=True) for c in clients]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        report.flush()
    report.flush()
    report.send("done")
    conn.close()
