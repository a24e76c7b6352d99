"""What `bitfusion run -- true` adds to a local `true`, median over repeated runs.

Both are timed in the same run on the same machine, from process start to exit, against a
gateway on loopback with a simulated pool (the network is not what is measured here).

    python bench/run_overhead.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.spawned import SpawnedGateway, free_port


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gw = SpawnedGateway(
            Path(tmp) / "state",
            free_port(),
            ["--simulate-gpus", "2x16GiB", *os.environ.get("BENCH_GATEWAY_ARGS", "").split()],
            log_path=Path(tmp) / "gateway.log",
        )
        gw.start()
        env = {
            **os.environ,
            "BITFUSION_TOKEN": gw.token("bench"),
            "BITFUSION_SERVERS": gw.address,
            "BITFUSION_CONFIG_DIR": tmp,
            "BITFUSION_SESSION": "bench",
        }
        try:
            cli = [sys.executable, "-m", "bitfusion_jupyter"]
            timed([*cli, "run", "-m", "256", "--", "true"], env, 3)  # warm the page cache
            local = timed(["true"], env, args.runs)
            python = timed([sys.executable, "-c", "import bitfusion_jupyter.cli"], env, args.runs)
            remote = timed([*cli, "run", "-m", "256", "--", "true"], env, args.runs)
        finally:
            gw.stop()

    def row(name: str, xs: list[float]) -> str:
        q = statistics.quantiles(xs, n=20)
        return f"{name:<34} {statistics.median(xs):>8.1f} {q[18]:>8.1f}"

    print(f"{'command':<34} {'median':>8} {'p95':>8}  (ms, {args.runs} runs)")
    print(row("true (local)", local))
    print(row("python -c 'import the CLI'", python))
    print(row("bitfusion run -m 256 -- true", remote))
    added = statistics.median(remote) - statistics.median(local)
    print(
        f"\nadded by bitfusion run: {added:.1f} ms median "
        f"({statistics.median(remote) / statistics.median(local):.0f}x a local true); "
        f"goal < 150 ms: {'met' if added < 150 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
