"""What `bitfusion run -- true` adds to a local `true`, median over repeated runs; and how
fast stdin streams into a remote `wc -c` against a local one.

Both are timed in the same run on the same machine, from process start to exit, against a
gateway on loopback with a simulated pool (the network is not what is measured here). The
stdin runs take turns, local and remote, so both see the same machine.

    python bench/run_overhead.py [--runs 30] [--stdin-mib 256] [--stdin-runs 3]
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


def timed(argv: list[str], env: dict[str, str], runs: int, cwd: Path | None = None
          ) -> list[float]:  # fmt: skip
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=cwd,
        )  # fmt: skip
        out.append((time.perf_counter() - start) * 1000)
    return out


def piped_seconds(argv: list[str], env: dict[str, str], mib: int) -> float:
    """Seconds for ``argv`` to read ``mib`` MiB on its stdin and exit (checked by its count)."""
    chunk = b"x" * (1024 * 1024)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    for _ in range(mib):
        proc.stdin.write(chunk)
    proc.stdin.close()
    counted = int(proc.stdout.read())
    if proc.wait() != 0 or counted != mib * len(chunk):
        raise SystemExit(f"{argv[0]} read {counted} bytes of {mib} MiB")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--stdin-mib", type=int, default=256, help="MiB piped into wc -c")
    parser.add_argument("--stdin-runs", type=int, default=3)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(prefix="bench-project-", dir="/var/tmp") as project,
    ):
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
            bare = [*cli, "run", "-m", "256", "--no-files", "--", "true"]
            timed(bare, env, 3)  # warm the page cache
            local = timed(["true"], env, args.runs)
            python = timed([sys.executable, "-c", "import bitfusion_jupyter.cli"], env, args.runs)
            remote = timed(bare, env, args.runs)
            # The default: the folder it is run from goes along (sftp-server here, sshfs there).
            carried = timed([*cli, "run", "-m", "256", "--", "true"], env, args.runs, Path(project))
            piped: dict[str, list[float]] = {"local": [], "remote": []}
            for _ in range(args.stdin_runs):
                piped["local"].append(piped_seconds(["wc", "-c"], env, args.stdin_mib))
                remote_wc = [*cli, "run", "-m", "256", "--no-files", "--", "wc", "-c"]
                piped["remote"].append(piped_seconds(remote_wc, env, args.stdin_mib))
        finally:
            gw.stop()

    def row(name: str, xs: list[float]) -> str:
        q = statistics.quantiles(xs, n=20)
        return f"{name:<34} {statistics.median(xs):>8.1f} {q[18]:>8.1f}"

    print(f"{'command':<34} {'median':>8} {'p95':>8}  (ms, {args.runs} runs)")
    print(row("true (local)", local))
    print(row("python -c 'import the CLI'", python))
    print(row("bitfusion run --no-files -- true", remote))
    print(row("bitfusion run -- true, its folder", carried))
    added = statistics.median(remote) - statistics.median(local)
    print(
        f"\nadded by bitfusion run: {added:.1f} ms median "
        f"({statistics.median(remote) / statistics.median(local):.0f}x a local true); "
        f"goal < 150 ms: {'met' if added < 150 else 'NOT met'}"
    )
    extra = statistics.median(carried) - statistics.median(remote)
    print(f"added by carrying the folder: {extra:.1f} ms median")
    rate = {k: args.stdin_mib / statistics.median(v) for k, v in piped.items()}
    print(f"\nstdin piped into wc -c, {args.stdin_mib} MiB, median of {args.stdin_runs}:")
    print(f"  local {rate['local']:8.1f} MiB/s")
    print(f"  run   {rate['remote']:8.1f} MiB/s   ratio {rate['remote'] / rate['local']:.2f}")


if __name__ == "__main__":
    main()
