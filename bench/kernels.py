"""A shared kernel (shim + gateway) against a plain local ipykernel: start, execute, output.

Both are measured in the same run on the same machine: the baseline is a local `python3`
ipykernel (`sys.executable -m ipykernel_launcher`), the shared kernel is the shim's kernelspec
against a gateway on loopback with a simulated 2 x 16 GiB pool. Each kernel runs alone while
it is measured (the machine may have few cores).

    python bench/kernels.py [--starts 5] [--executes 300] [--mib 64] [--profile-shim DIR]
                            [--encrypted-frontend]

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
    kc.start_channels()
    kc.wait_for_ready(timeout=READY_TIMEOUT_S)
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


def measure_starts(flavour: Flavour, n: int) -> list[float]:
    times = []
    for i in range(n):
        progress(f"measuring {flavour.name} kernel starts {i + 1}/{n}...")
        km, kc, seconds = start(flavour)
        times.append(seconds * 1000)
        stop(km, kc)
    return times


def measure_executes(kc: BlockingKernelClient, name: str, n: int, warmup: int = 20) -> list[float]:
    times = []
    for i in range(warmup + n):
        if i >= warmup and (i - warmup + 1) % 100 == 0:
            progress(f"measuring {name} execute round trips {i - warmup + 1}/{n}...")
        t0 = time.perf_counter()
        msg_id = kc.execute("pass")
        reply = shell_reply(kc, msg_id)
        elapsed = time.perf_counter() - t0
        assert reply["content"]["status"] == "ok", reply["content"]
        drain_until_idle(kc, msg_id)  # not timed: the kernel is idle before the next
        if i >= warmup:
            times.append(elapsed * 1000)
    return times


def measure_output(kc: BlockingKernelClient, name: str, mib: int, runs: int = 3) -> list[float]:
    """MiB/s for a cell writing ``mib`` MiB to stdout, until all of it and idle arrived."""
    size = mib * 1024 * 1024
    code = f"import sys; sys.stdout.write('x' * ({mib} * 1024 * 1024))"
    rates = []
    for i in range(runs + 1):  # the first is a warm-up
        progress(f"measuring {name} {mib} MiB output {i}/{runs}{' (warm-up)' if i == 0 else ''}...")
        t0 = time.perf_counter()
        msg_id = kc.execute(code)
        received = drain_until_idle(kc, msg_id, timeout=120)
        elapsed = time.perf_counter() - t0
        if received != size:
            raise RuntimeError(f"{name}: received {received} of {size} characters")
        shell_reply(kc, msg_id)
        if i > 0:
            rates.append(mib / elapsed)
    return rates


def measure(flavour: Flavour, args: argparse.Namespace) -> dict[str, list[float]]:
    out = {"start": measure_starts(flavour, args.starts)}
    km, kc, _ = start(flavour)
    try:
        out["execute"] = measure_executes(kc, flavour.name, args.executes)
        out["output"] = measure_output(kc, flavour.name, args.mib)
    finally:
        stop(km, kc)
    return out


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) > 1 else xs[0]


def table(local: dict[str, list[float]], shared: dict[str, list[float]], args) -> str:
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
    add(f"{args.mib} MiB stdout, median MiB/s (3)", *medians("output"), ",.1f", "≥ 0.80")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--executes", type=int, default=300)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--profile-shim", type=Path, default=None, metavar="DIR")
    parser.add_argument("--encrypted-frontend", action="store_true")
    args = parser.parse_args()
    if args.profile_shim is not None:
        args.profile_shim.mkdir(parents=True, exist_ok=True)
        args.profile_shim = args.profile_shim.resolve()

    base = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_")}
    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as tmp:
        local = Flavour(
            "local", local_spec, base, Path(tmp) / "local-kernels.log", args.encrypted_frontend
        )
        progress("local kernel (baseline) first")
        local_results = measure(local, args)
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
            shared = Flavour(
                "shared",
                shim_spec(args.profile_shim),
                env,
                Path(tmp) / "shim-kernels.log",
                args.encrypted_frontend,
            )
            shared_results = measure(shared, args)
        finally:
            gw.stop()
            stop_leftovers(gw.state_dir)

    print()
    print(table(local_results, shared_results, args))
    print(
        f"\n`pass` p99 ratio {p99(shared_results['execute']) / p99(local_results['execute']):.2f}; "
        "ratios are shared / local."
    )


if __name__ == "__main__":
    main()
