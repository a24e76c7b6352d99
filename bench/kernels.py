"""A shared kernel (shim + gateway) against a plain local ipykernel: start, execute, output.

Both are measured in the same run on the same machine: the baseline is a local `python3`
ipykernel (`sys.executable -m ipykernel_launcher`), the shared kernel is the shim's kernelspec
against a gateway on loopback with a simulated 2 x 16 GiB pool. The two take turns, start by
start, cell by cell and output by output, so both see the same machine: a small shared
machine's speed drifts by tens of percent within a minute, which measuring one kernel after
the other would count as overhead (or as none). Only one of them works at a time; the other
waits idle, and the gateway runs throughout.

    python bench/kernels.py [--starts 5] [--executes 300] [--mib 64] [--outputs 5]
                            [--profile-shim DIR] [--encrypted-frontend]

A second table says where a `pass` cell's CPU goes, process by process (Linux).
`--profile-shim DIR` runs every shim under cProfile and leaves one .prof file a shim in DIR.
`--encrypted-frontend` gives both kernels CurveZMQ keys for their frontend channels, as a
Jupyter server with `transport_encryption=auto` does (`bitfusion up` turns it on): the local
baseline then pays for encryption too.
BENCH_GATEWAY_ARGS adds options to the gateway (`--kernel-channels curve`, for an A/B).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.kernelspec import KernelSpec

from gateway.spawned import SpawnedGateway, free_port, stop_leftovers

READY_TIMEOUT_S = 60.0
SHARE_MIB = 2048


def progress(text: str) -> None:
    print(text, flush=True)


@dataclass
class Flavour:
    """One kind of kernel: how to make its spec and the environment it starts with."""

    name: str
    spec: Callable[[], KernelSpec]
    env: dict[str, str]
    log: Path  # the kernels' stdout and stderr
    encrypted: bool = False  # CurveZMQ keys on the frontend's channels
    # The processes whose CPU time a cell costs, by role, given the kernel's manager.
    processes: Callable[[KernelManager], dict[str, int]] = lambda km: {}


# What a kernelspec says so that a kernel manager with transport_encryption=auto gives keys.
CURVE = {"supported_encryption": ["curve"]}


def local_spec() -> KernelSpec:
    return KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Python 3 (local)",
        language="python",
        interrupt_mode="signal",
        metadata=CURVE,
    )


def shim_spec(profile_dir: Path | None) -> Callable[[], KernelSpec]:
    counter = iter(range(1_000_000))

    def make() -> KernelSpec:
        prefix = [sys.executable]
        if profile_dir is not None:
            prefix += ["-m", "cProfile", "-o", str(profile_dir / f"shim-{next(counter)}.prof")]
        return KernelSpec(
            argv=[
                *prefix,
                "-m",
                "bitfusion_jupyter.shim",
                "--connection-file",
                "{connection_file}",
                "-m",
                str(SHARE_MIB),
            ],
            display_name="Python 3 (shared)",
            language="python",
            interrupt_mode="signal",
            metadata=CURVE,
        )

    return make


def start(flavour: Flavour) -> tuple[KernelManager, BlockingKernelClient, float]:
    """A started kernel, its client and the seconds from start_kernel to ready."""
    km = KernelManager(transport_encryption="auto" if flavour.encrypted else "disabled")
    km._kernel_spec = flavour.spec()
    t0 = time.perf_counter()
    with flavour.log.open("ab") as log:
        km.start_kernel(env=flavour.env, stdout=log, stderr=log)
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=READY_TIMEOUT_S)
    except BaseException:  # never ready, or Ctrl-C: leave no kernel behind
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)
        else:
            km.cleanup_resources()  # its connection file
        raise
    return km, kc, time.perf_counter() - t0


def stop(km: KernelManager, kc: BlockingKernelClient) -> None:
    kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel(now=False)


def drain_until_idle(kc: BlockingKernelClient, msg_id: str, timeout: float = 30.0) -> int:
    """Read iopub until the idle status of ``msg_id``; the stream characters it carried."""
    received = 0
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            received += len(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return received


def shell_reply(kc: BlockingKernelClient, msg_id: str, timeout: float = 30.0) -> dict:
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def timed_start(flavour: Flavour) -> float:
    """Milliseconds from start_kernel to ready, for a kernel that is then stopped."""
    km, kc, seconds = start(flavour)
    stop(km, kc)
    return seconds * 1000


def timed_execute(kc: BlockingKernelClient) -> float:
    """Milliseconds from sending a `pass` cell to its reply; then waits for idle, untimed."""
    t0 = time.perf_counter()
    msg_id = kc.execute("pass")
    reply = shell_reply(kc, msg_id)
    elapsed = time.perf_counter() - t0
    assert reply["content"]["status"] == "ok", reply["content"]
    drain_until_idle(kc, msg_id)  # the kernel is idle before the next cell
    return elapsed * 1000


def timed_output(kc: BlockingKernelClient, name: str, mib: int) -> float:
    """MiB/s for a cell writing ``mib`` MiB to stdout, until all of it and idle arrived."""
    size = mib * 1024 * 1024
    t0 = time.perf_counter()
    msg_id = kc.execute(f"import sys; sys.stdout.write('x' * ({mib} * 1024 * 1024))")
    received = drain_until_idle(kc, msg_id, timeout=120)
    elapsed = time.perf_counter() - t0
    if received != size:
        raise RuntimeError(f"{name}: received {received} of {size} characters")
    shell_reply(kc, msg_id)
    return mib / elapsed


def in_turns(
    what: str, rounds: int, flavours: list[Flavour], one: Callable[[Flavour], float]
) -> dict[str, list[float]]:
    """``one(flavour)`` for each flavour in turn, ``rounds`` times, who goes first alternating
    (so neither always runs just after the other); the results by flavour name."""
    out: dict[str, list[float]] = {f.name: [] for f in flavours}
    step = max(1, rounds // 4)
    for i in range(rounds):
        if (i + 1) % step == 0 or i + 1 == rounds:
            progress(f"measuring {what} {i + 1}/{rounds}...")
        for flavour in flavours if i % 2 == 0 else flavours[::-1]:
            out[flavour.name].append(one(flavour))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def pid_running(*words: str) -> int:
    """The pid of a process whose command line holds every word (0 if none)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(w in cmdline for w in words):
            return int(entry.name)
    return 0


def measure(
    flavours: list[Flavour], args: argparse.Namespace
) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """Every metric for every flavour, measured in turns: metric -> flavour -> values; and
    each process's CPU milliseconds a `pass` cell, by "flavour/role"."""
    out = {"start": in_turns("kernel starts", args.starts, flavours, timed_start)}
    running = {f.name: start(f) for f in flavours}
    try:
        clients = {name: kc for name, (_, kc, _) in running.items()}
        for kc in clients.values():
            for _ in range(20):  # warm-up: imports, caches, the first history writes
                timed_execute(kc)
        pids = {
            f.name: {**f.processes(running[f.name][0]), "frontend": os.getpid()} for f in flavours
        }
        used: dict[str, float] = {}

        def execute(f: Flavour) -> float:
            before = {role: cpu_seconds(pid) for role, pid in pids[f.name].items()}
            ms = timed_execute(clients[f.name])
            for role, pid in pids[f.name].items():
                key = f"{f.name}/{role}"
                used[key] = used.get(key, 0.0) + cpu_seconds(pid) - before[role]
            return ms

        out["execute"] = in_turns("`pass` round trips", args.executes, flavours, execute)
        cpu = {key: seconds * 1000 / args.executes for key, seconds in used.items()}
        for f in flavours:  # warm-up: the first big output pays for its allocations
            timed_output(clients[f.name], f.name, args.mib)
        out["output"] = in_turns(
            f"{args.mib} MiB outputs",
            args.outputs,
            flavours,
            lambda f: timed_output(clients[f.name], f.name, args.mib),
        )
    finally:
        for km, kc, _ in running.values():
            stop(km, kc)
    return out, cpu


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) > 1 else xs[0]


def table(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    local = {metric: by["local"] for metric, by in results.items()}
    shared = {metric: by["shared"] for metric, by in results.items()}
    med = statistics.median
    rows: list[tuple[str, str, str, str, str, str]] = []

    def add(metric: str, lo: float, sh: float, fmt: str, goal: str = "") -> None:
        """A row; ``goal`` is "≤ X" or "≥ X" for the ratio shared / local, or none."""
        ratio = sh / lo
        verdict = ""
        if goal:
            bound = float(goal[2:])
            met = ratio <= bound if goal.startswith("≤") else ratio >= bound
            verdict = "met" if met else "**NOT met**"
        rows.append((metric, format(lo, fmt), format(sh, fmt), f"{ratio:.2f}", goal, verdict))

    def medians(key: str) -> tuple[float, float]:
        return med(local[key]), med(shared[key])

    add(f"start to ready, median ms ({args.starts})", *medians("start"), ",.0f", "≤ 1.25")
    add(f"`pass` round trip, median ms ({args.executes})", *medians("execute"), ".2f", "≤ 1.10")
    add("`pass` round trip, p99 ms", p99(local["execute"]), p99(shared["execute"]), ".2f")
    add(f"{args.mib} MiB stdout, median MiB/s ({args.outputs})", *medians("output"), ",.1f",
        "≥ 0.80")  # fmt: skip

    head = ("metric", "local", "shared", "ratio", "goal", "")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(6)]

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":" if i else "-" * (w + 2)) for i, w in enumerate(widths)
    )
    return "\n".join([line(head), rule + "|", *(line(r) for r in rows)])


def cpu_table(cpu: dict[str, float]) -> str:
    """Where a `pass` cell's CPU goes, by process: the added processes of a shared kernel,
    and what each costs, next to the kernel's own work (a far steadier figure than time on a
    small machine, where that CPU is taken from the kernel the user waits for)."""
    roles = [("kernel", "the kernel"), ("shim", "the shim"), ("gateway", "the gateway"),
             ("frontend", "the frontend (this script)")]  # fmt: skip

    def cell(flavour: str, role: str) -> str:
        found = cpu.get(f"{flavour}/{role}")
        return "-" if found is None else f"{found:.2f}"

    total = {
        f: sum(v for k, v in cpu.items() if k.startswith(f + "/")) for f in ("local", "shared")
    }
    lines = [
        "| CPU ms a `pass` cell (all threads) | local | shared |",
        "|------------------------------------|------:|-------:|",
        *(
            f"| {label:<34} | {cell('local', r):>5} | {cell('shared', r):>6} |"
            for r, label in roles
        ),
        f"| {'all of them':<34} | {total['local']:>5.2f} | {total['shared']:>6.2f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--executes", type=int, default=300)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--outputs", type=int, default=5, help="big outputs per kernel")
    parser.add_argument("--profile-shim", type=Path, default=None, metavar="DIR")
    parser.add_argument("--encrypted-frontend", action="store_true")
    args = parser.parse_args()
    if args.profile_shim is not None:
        args.profile_shim.mkdir(parents=True, exist_ok=True)
        args.profile_shim = args.profile_shim.resolve()

    base = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_")}
    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as tmp:
        gw = SpawnedGateway(
            Path(tmp) / "state",
            free_port(),
            ["--simulate-gpus", "2x16GiB", *os.environ.get("BENCH_GATEWAY_ARGS", "").split()],
            process_env=base,
            log_path=Path(tmp) / "gateway.log",
        )
        progress("starting a gateway on loopback (simulated 2x16GiB pool)")
        gw.start()
        try:
            env = {
                **base,
                "BITFUSION_TOKEN": gw.token("bench"),
                "BITFUSION_SERVERS": gw.address,
                "BITFUSION_CONFIG_DIR": tmp,
                "BITFUSION_SESSION": "bench",
                "BITFUSION_SYSTEM_SERVERS_CONF": str(Path(tmp) / "no-system-servers.conf"),
            }
            flavours = [
                Flavour(
                    "local", local_spec, base, Path(tmp) / "local-kernels.log",
                    args.encrypted_frontend,
                    lambda km: {"kernel": km.provisioner.process.pid},
                ),
                Flavour(
                    "shared", shim_spec(args.profile_shim), env, Path(tmp) / "shim-kernels.log",
                    args.encrypted_frontend,
                    lambda km: {
                        "kernel": pid_running("ipykernel_launcher", str(gw.state_dir)),
                        "shim": km.provisioner.process.pid,
                        "gateway": gw.proc.pid,
                    },
                ),
            ]  # fmt: skip
            results, cpu = measure(flavours, args)
        finally:
            gw.stop()
            stop_leftovers(gw.state_dir)

    print()
    print(table(results, args))
    executes = results["execute"]
    print(
        f"\n`pass` p99 ratio {p99(executes['shared']) / p99(executes['local']):.2f}; "
        "ratios are shared / local.\n"
    )
    print(cpu_table(cpu))


if __name__ == "__main__":
    main()
