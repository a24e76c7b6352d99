"""What a share's bubblewrap sandbox adds to its start: sandboxed against `--unconfined`.

In one run, two gateways on loopback with a simulated 2 x 16 GiB pool, one as it starts by
default (every share in a bubblewrap sandbox) and one with `--unconfined`, and in turns, run
by run and start by start, who goes first alternating, so both see the same machine:

1. `bitfusion run -m 1024 -- true`, from process start to exit;
2. a kernel started through the shim (as bench/kernels.py does), from start_kernel to ready
   (`kernel_info` answered);
3. the sandbox alone, without gateway or client: the gateway's bwrap command line for a
   share running `true` (`gateway.sandbox.Layout`), started as the nanny starts it (its
   shield and Landlock scope) and with a plain `subprocess.run`, against `true` started the
   same way; the prelude alone (`sh share_prelude.sh true`); the user's Python layer's
   interpreter against the offered one; and the first use of a user's Python layer
   (`python -I gateway/user_env.py DIR` into a fresh folder) against a bare `python -I`.

Goal (issue): at most 20 ms added to a share's start. Progress goes to stderr, the table to
stdout. BENCH_GATEWAY_ARGS adds options to both gateways: an unconfined gateway's kernels
use CurveZMQ on TCP where a sandboxed one's use Landlock-scoped unix sockets, so
`BENCH_GATEWAY_ARGS="--kernel-channels curve"` compares kernel starts on the same channels.
Every gateway, share and kernel is stopped on the way out, Ctrl-C and SIGTERM included.

    python bench/sandbox.py [--runs 50] [--starts 24] [--direct 60] [--user-envs 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# bench/kernels.py, beside this script (its folder is sys.path[0] when run as a script).
from kernels import Flavour, shim_spec, start, stop  # noqa: I001

from gateway import landlock, sandbox
from gateway.nanny import startup as nanny_startup
from gateway.spawned import SpawnedGateway, free_port, stop_leftovers

GOAL_MS = 20.0
RUN_MIB = 1024
PYTHON = sys.executable


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Side:
    """One gateway of the A/B: how the CLI and the shim reach it, and its kernels' log."""

    name: str
    gw: SpawnedGateway
    env: dict[str, str]
    flavour: Flavour
    first_run_ms: float = 0.0
    channels: str = "?"


def timed_once(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Milliseconds from start to exit of ``argv``; raises with its stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{' '.join(argv)[:200]} exited {done.returncode}: {said}")
    return elapsed


def as_the_nanny(argv: Sequence[str], env: dict[str, str], sandboxed: bool) -> float:
    """Milliseconds from start to exit of ``argv`` started as a share's nanny starts it: pipes,
    its own session and, for a sandbox, the nanny's own confiner (signals shielded from
    bwrap's monitor, Landlock's scopes where the kernel has them); raises if it fails."""
    flags = ["--shield", *(["--scope"] if landlock.abi() >= landlock.SCOPED_ABI else [])]
    opts, _ = nanny_startup.parse_args(["--socket", "-", "--status", "-", *flags, "--", *argv])
    start = time.perf_counter()
    done = subprocess.run(
        argv,
        env=env,
        input=b"",
        capture_output=True,
        start_new_session=True,
        preexec_fn=nanny_startup._confiner(opts) if sandboxed else None,
    )
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{' '.join(argv)[:200]} exited {done.returncode}: {said}")
    return elapsed


def in_turns(
    what: str, rounds: int, runners: dict[str, Callable[[], float]]
) -> dict[str, list[float]]:
    """Each runner in turn, ``rounds`` times, who goes first alternating; results by name."""
    out: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    step = max(1, rounds // 4)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            out[name].append(runners[name]())
        if (i + 1) % step == 0 or i + 1 == rounds:
            progress(f"  {what}: {i + 1}/{rounds}")
    return out


def kernel_start_ms(flavour: Flavour) -> float:
    """Milliseconds from start_kernel to ready for a shim kernel, which is then stopped."""
    km, kc, seconds = start(flavour)
    stop(km, kc)
    return seconds * 1000


# -- statistics and the table ---------------------------------------------------------------


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[8] if len(xs) > 1 else xs[0]


@dataclass
class Row:
    measure: str
    baseline: str
    a: list[float]  # with the sandbox (or the thing measured)
    b: list[float]  # the baseline, in turns with it
    goal: bool = False  # a share's start: at most GOAL_MS added

    def cells(self) -> tuple[str, ...]:
        med = statistics.median
        paired = [x - y for x, y in zip(self.a, self.b, strict=True)]
        return (
            self.measure,
            self.baseline,
            str(len(self.a)),
            f"{med(self.a):,.1f}",
            f"{p90(self.a):,.1f}",
            f"{med(self.b):,.1f}",
            f"{p90(self.b):,.1f}",
            f"{med(self.a) - med(self.b):+,.1f}",
            f"{med(paired):+,.1f}",
            f"{med(self.a) / med(self.b):.2f}",
        )


HEAD = (
    "measure",
    "against",
    "n",
    "median ms",
    "p90 ms",
    "against: median",
    "p90",
    "added ms (medians)",
    "added ms (median of pairs)",
    "ratio",
)


def table(rows: list[Row]) -> str:
    cells = [HEAD, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]

    def line(row: tuple[str, ...]) -> str:
        parts = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(HEAD), rule, *(line(c) for c in cells[1:])])


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    try:
        bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout
    except OSError:
        bwrap = "no bwrap"
    return (
        f"nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {cpu}, "
        f"Linux {platform.release()}, {bwrap.strip()}, Python {platform.python_version()}"
    )


# -- the measurements -----------------------------------------------------------------------


def make_side(name: str, tmp: Path, base: dict[str, str], extra: list[str]) -> Side:
    root = tmp / name
    root.mkdir()
    gw = SpawnedGateway(
        root / "state",
        free_port(),
        ["--simulate-gpus", "2x16GiB", *extra],
        process_env=base,
        log_path=root / "gateway.log",
    )
    env = {
        **base,
        "BITFUSION_CONFIG_DIR": str(root / "client"),
        "BITFUSION_SESSION": f"bench-{name}",
        "BITFUSION_SYSTEM_SERVERS_CONF": str(root / "no-system-servers.conf"),
    }
    flavour = Flavour(name, shim_spec(None), env, root / "shim-kernels.log")
    return Side(name, gw, env, flavour)


def start_gateway(side: Side) -> None:
    side.gw.start()
    side.env["BITFUSION_TOKEN"] = side.gw.token("bench")
    side.env["BITFUSION_SERVERS"] = side.gw.address
    for text in side.gw.start_log().splitlines():
        if "kernels:" in text:
            side.channels = text.split("kernels:", 1)[1].strip()


def cli_run(*command: str) -> list[str]:
    return [PYTHON, "-m", "bitfusion_jupyter", "run", "-m", str(RUN_MIB), "--", *command]


def check_sides(boxed: Side, open_: Side) -> None:
    """The sandboxed gateway's shares do not see its state directory; the other's do."""
    for side, hidden in ((boxed, True), (open_, False)):
        argv = cli_run("test", "-e", str(side.gw.state_dir))
        done = subprocess.run(argv, env=side.env, capture_output=True, text=True)
        if (done.returncode != 0) != hidden:
            raise SystemExit(
                f"the {side.name} gateway's share {'sees' if hidden else 'misses'} its state "
                f"directory (exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )


def measure_gateways(sides: list[Side], args: argparse.Namespace) -> list[Row]:
    boxed, open_ = sides
    # A user's first share on a gateway: the sandboxed one makes the user's Python layer then.
    for side in sides:
        side.first_run_ms = timed_once(cli_run("true"), side.env)
        progress(f"first `run -- true` of a user, {side.name}: {side.first_run_ms:,.0f} ms")
    check_sides(boxed, open_)
    for side in sides:  # warm-up: page cache, the spare nanny, the first kernel's imports
        for _ in range(2):
            timed_once(cli_run("true"), side.env)
        if args.starts:
            kernel_start_ms(side.flavour)
    rows = []
    if args.runs:
        progress(f"`bitfusion run -m {RUN_MIB} -- true`, {args.runs} each, in turns")
        runs = in_turns(
            "runs",
            args.runs,
            {s.name: (lambda s=s: timed_once(cli_run("true"), s.env)) for s in sides},
        )
        rows.append(
            Row(
                f"`bitfusion run -m {RUN_MIB} -- true`, sandboxed",
                "the same, `--unconfined`",
                runs[boxed.name],
                runs[open_.name],
                goal=True,
            )
        )
    if args.starts:
        progress(f"kernel starts through the shim to ready, {args.starts} each, in turns")
        starts = in_turns(
            "kernel starts",
            args.starts,
            {s.name: (lambda s=s: kernel_start_ms(s.flavour)) for s in sides},
        )
        rows.append(
            Row(
                "kernel start to ready (shim), sandboxed",
                "the same, `--unconfined`",
                starts[boxed.name],
                starts[open_.name],
                goal=True,
            )
        )
    return rows


def measure_direct(boxed: Side, tmp: Path, args: argparse.Namespace) -> list[Row]:
    """The sandbox alone, as the sandboxed gateway builds it for a share of user "bench"."""
    state = boxed.gw.state_dir
    layout = sandbox.Layout.for_gateway(state, state / "homes", [PYTHON])
    share_dir = tmp / "direct-share"
    (share_dir / "usage").mkdir(parents=True)
    (share_dir / "claims").mkdir()
    binds = [
        sandbox.Bind(str(share_dir / "usage"), f"{sandbox.RUN_IN}/usage"),
        sandbox.Bind(str(share_dir / "claims"), f"{sandbox.RUN_IN}/simulated-usage", True),
    ]
    bwrap_true = layout.argv(["true"], user="bench", binds=binds, gpu_minors=[])
    base = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_")}
    user_env = sandbox.user_env_dir("bench")
    env = sandbox.environment(sandbox.passed(base, True), "bench", user_env)
    # The user's layer as the host sees it (made by the gateways' first runs, or here).
    host_env = layout.homes_dir / Path(user_env).relative_to(sandbox.HOMES_IN)
    timed_once(bwrap_true, env)  # makes the layer if no share has yet
    if not (host_env / "pyvenv.cfg").exists():
        raise SystemExit(f"the user's Python layer was not made at {host_env}")
    mounts = sum(a.startswith("--") and "bind" in a for a in bwrap_true)
    progress(f"the sandbox alone ({len(bwrap_true)} arguments, {mounts} binds), in turns")
    rows = []
    if args.direct:
        direct = in_turns(
            "bwrap",
            args.direct,
            {
                "bwrap": lambda: as_the_nanny(bwrap_true, env, True),
                "bare bwrap": lambda: timed_once(bwrap_true, env),
                "prelude": lambda: timed_once(["/bin/sh", str(sandbox.PRELUDE), "true"], env),
                "true": lambda: as_the_nanny(["true"], env, False),
                "bare true": lambda: timed_once(["true"], env),
            },
        )
        rows.append(
            Row(
                "bwrap (the gateway's layout) + prelude: `true`, as the nanny starts it",
                "`true`, as the nanny starts it",
                direct["bwrap"],
                direct["true"],
            )
        )
        rows.append(
            Row(
                "the same, plain `subprocess.run` (no shield, no scope)",
                "`true`, the same",
                direct["bare bwrap"],
                direct["bare true"],
            )
        )
        rows.append(
            Row(
                "`sh share_prelude.sh true` (layer there), plain",
                "`true`, plain",
                direct["prelude"],
                direct["bare true"],
            )
        )
        pythons = in_turns(
            "interpreters",
            args.direct,
            {
                "layer": lambda: timed_once([str(host_env / "bin" / "python"), "-c", "pass"]),
                "offered": lambda: timed_once([PYTHON, "-c", "pass"]),
            },
        )
        rows.append(
            Row(
                "the user's layer's `python -c pass`",
                "the offered `python -c pass`",
                pythons["layer"],
                pythons["offered"],
            )
        )
    if args.user_envs:
        fresh = tmp / "fresh-envs"
        fresh.mkdir()
        maker = str(Path(sandbox.__file__).with_name("user_env.py"))
        count = iter(range(1_000_000))
        made = in_turns(
            "user envs",
            args.user_envs,
            {
                "make": lambda: timed_once([PYTHON, "-I", maker, str(fresh / str(next(count)))]),
                "bare": lambda: timed_once([PYTHON, "-I", "-c", "pass"]),
            },
        )
        rows.append(
            Row(
                "first use: `python -I gateway/user_env.py DIR`",
                "`python -I -c pass`",
                made["make"],
                made["bare"],
            )
        )
    return rows


def show_logs(tmp: Path, lines: int = 15) -> None:
    """The last lines of every gateway's and shim's log, before the folder goes."""
    for log in sorted(tmp.glob("*/*.log")):
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
        if tail:
            progress(f"--- {log.relative_to(tmp)} (last {len(tail)} lines)")
            progress("\n".join(tail))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="`run -- true` each, in turns")
    parser.add_argument("--starts", type=int, default=24, help="kernel starts each, in turns")
    parser.add_argument("--direct", type=int, default=60, help="bwrap launches, in turns")
    parser.add_argument("--user-envs", type=int, default=6, help="fresh Python layers made")
    args = parser.parse_args()
    if shutil.which("bwrap") is None:
        raise SystemExit("bwrap is not installed: nothing to compare")
    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every gateway and share is stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    base = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_")}
    extra = os.environ.get("BENCH_GATEWAY_ARGS", "").split()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp_name:
        tmp = Path(tmp_name)
        sides = [
            make_side("sandboxed", tmp, base, extra),
            make_side("unconfined", tmp, base, [*extra, "--unconfined"]),
        ]
        with contextlib.ExitStack() as cleanup:
            for side in sides:
                cleanup.callback(stop_leftovers, side.gw.state_dir)
                cleanup.callback(side.gw.stop)  # runs first: no new share meanwhile
                progress(f"starting the {side.name} gateway (simulated 2x16GiB pool)")
                start_gateway(side)
            try:
                rows = measure_gateways(sides, args)
                rows += measure_direct(sides[0], tmp, args)
            except Exception:
                show_logs(tmp)
                raise

    print(f"\nmachine: {machine()}")
    print(f"command: python bench/sandbox.py {' '.join(sys.argv[1:])}".rstrip())
    if extra:
        print(f"BENCH_GATEWAY_ARGS: {' '.join(extra)}")
    for side in sides:
        print(f"kernels on the {side.name} gateway: {side.channels}")
    print(f"{time.monotonic() - began:.0f} s in all\n")
    print(table(rows))
    print(
        f"\na user's first `run -- true` (one each, makes their Python layer when sandboxed): "
        f"sandboxed {sides[0].first_run_ms:,.0f} ms, unconfined {sides[1].first_run_ms:,.0f} ms"
    )
    for row in (r for r in rows if r.goal):
        added = statistics.median(row.a) - statistics.median(row.b)
        verdict = "met" if added <= GOAL_MS else "NOT met"
        print(f"{row.measure}: {added:+.1f} ms (goal ≤ {GOAL_MS:.0f} ms added: {verdict})")


if __name__ == "__main__":
    main()
