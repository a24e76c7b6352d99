"""The client's folder in a share (`run --files`): through the gateway against the same two
ends over plain local pipes.

Both sides are the same parts: OpenSSH's sftp-server confined to the folder
(bitfusion_jupyter.file_server) and sshfs mounting it in a share's sandbox
(gateway.sandbox). The baseline joins them by two pipes on this machine; the measured side
carries the SFTP bytes as stream 3 of a `bitfusion run --files` through a real gateway on
loopback (nanny, gateway, CurveZMQ connection, client). In turns, who goes first
alternating, each workload timed inside the share, so starts are not counted:

1. sequential read of a SIZE MiB file (goal: at least 0.5 x the pipes' speed);
2. sequential write of SIZE MiB (same goal);
3. 2,000 small files, each stat'ed and read (goal: at most 2 x the pipes' time);
4. importing a package of 500 modules from the folder;
5. a file saved on the client while the share looks for it (new) or has read it (changed):
   seconds until the share sees it (the issue's "within about a second").

Progress goes to stderr, the table to stdout. Everything made is removed on the way out.

    python bench/files.py [--rounds 3] [--size 256] [--only read write small import new changed]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bitfusion_jupyter import file_server
from gateway import sandbox
from gateway.spawned import SpawnedGateway, free_port, stop_leftovers

PYTHON = sys.executable
SMALL_FILES = 2000
MODULES = 500

# Runs in the share, in the folder; prints the seconds the workload took.
WORKLOAD = r"""
import importlib, os, sys, time
what, size = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
if what == "read":
    with open("big.bin", "rb") as f:
        while f.read(1 << 20):
            pass
elif what == "write":
    chunk = b"x" * (1 << 20)
    with open("written.bin", "wb") as f:
        for _ in range(size):
            f.write(chunk)
elif what == "small":
    for name in sorted(os.listdir("small")):
        os.stat("small/" + name)
        with open("small/" + name, "rb") as f:
            f.read()
elif what == "import":
    sys.path.insert(0, os.getcwd())
    importlib.import_module("manymods.all")
elif what == "new":  # has looked for new.txt; the driver saves it once told
    os.listdir("."); os.path.exists("new.txt")
    print("ready", flush=True)
    while not os.path.exists("new.txt"):
        time.sleep(0.01)
    print(time.time())  # wall clock: compared with the driver's, on the same machine
    sys.exit()
elif what == "changed":  # has read note.txt; the driver saves it anew once told
    old = open("note.txt").read()
    print("ready", flush=True)
    while open("note.txt").read() == old:
        time.sleep(0.01)
    print(time.time())  # wall clock: compared with the driver's, on the same machine
    sys.exit()
print(time.perf_counter() - start)
"""


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_folder(top: Path, size_mib: int) -> Path:
    folder = top / "project"
    (folder / "small").mkdir(parents=True)
    with open(folder / "big.bin", "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    for i in range(SMALL_FILES):
        (folder / "small" / f"f{i:04d}.txt").write_text(f"file {i}\n" * 20)
    pkg = folder / "manymods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for i in range(MODULES):
        (pkg / f"m{i:03d}.py").write_text(f"VALUE = {i}\n\ndef f(x):\n    return x + {i}\n")
    (pkg / "all.py").write_text("".join(f"from . import m{i:03d}\n" for i in range(MODULES)))
    return folder


def clear_outputs(folder: Path) -> None:
    (folder / "written.bin").unlink(missing_ok=True)
    (folder / "new.txt").unlink(missing_ok=True)
    (folder / "note.txt").write_text("as it was\n")
    for cache in folder.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def over_pipes(layout: sandbox.Layout, folder: Path, what: str, size: int) -> float:
    server = file_server.start(folder)
    fds = (server.stdout.fileno(), server.stdin.fileno())  # type: ignore[union-attr]

    def at_3_and_4() -> None:
        os.dup2(fds[0], 3)
        os.dup2(fds[1], 4)

    try:
        argv = layout.argv(
            [PYTHON, "-c", WORKLOAD, what, str(size)],
            user="bench",
            files=sandbox.FilesMount(str(folder), 3, 4),
        )
        return measure(
            subprocess.Popen(argv, pass_fds=(3, 4), preexec_fn=at_3_and_4, **PIPED),
            folder, f"over pipes, {what}",
        )  # fmt: skip
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.stdout.close()  # type: ignore[union-attr]
        server.wait()


def through_gateway(env: dict[str, str], folder: Path, what: str, size: int) -> float:
    argv = [PYTHON, "-m", "bitfusion_jupyter", "run", "-m", "1024", "--files", str(folder)]
    command = [*argv, "--", PYTHON, "-c", WORKLOAD, what, str(size)]
    return measure(
        subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, **PIPED),
        folder, f"through the gateway, {what}",
    )  # fmt: skip


PIPED: dict = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def measure(proc: subprocess.Popen[str], folder: Path, label: str) -> float:
    """The workload's figure; for "new" and "changed", saves the file once the share
    watches, and returns the seconds until the share saw it."""
    saved = None
    first = proc.stdout.readline()  # type: ignore[union-attr]
    if first == "ready\n":
        saved = time.time()
        (folder / "new.txt").write_text(f"saved on the client at {saved}\n")
        (folder / "note.txt").write_text(f"saved on the client at {saved}\n")
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: {err.strip()[-1500:]}")
    seen = float((first + out).split()[-1])
    return seen - saved if saved is not None else seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="MiB read and written")
    parser.add_argument("--only", nargs="+", metavar="WORKLOAD", help="run only these")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-files-", dir="/var/tmp"))
    gw = None
    try:
        progress(f"making the folder ({args.size} MiB, {SMALL_FILES} files, {MODULES} modules)")
        folder = make_folder(tmp / "client", args.size)
        layout = sandbox.Layout.for_gateway(tmp / "pipes-state", tmp / "pipes-homes")
        base = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION")}
        gw = SpawnedGateway(
            tmp / "state", free_port(), ["--simulate-gpus", "1x16GiB"], process_env=base,
            log_path=tmp / "gateway.log",
        )  # fmt: skip
        gw.start()
        env = {
            **base,
            "BITFUSION_CONFIG_DIR": str(tmp / "config"),
            "BITFUSION_SYSTEM_SERVERS_CONF": str(tmp / "none.conf"),
            "BITFUSION_TOKEN": gw.token("bench"),
            "BITFUSION_SERVERS": gw.address,
        }
        rows = []
        workloads = [("read", "MiB/s"), ("write", "MiB/s"), ("small", "s"), ("import", "s"),
                     ("new", "s"), ("changed", "s")]  # fmt: skip
        for what, unit in [w for w in workloads if not args.only or w[0] in args.only]:
            times: dict[str, list[float]] = {"gateway": [], "pipes": []}
            for i in range(args.rounds):
                order = ["gateway", "pipes"] if i % 2 == 0 else ["pipes", "gateway"]
                for side in order:
                    clear_outputs(folder)
                    if side == "gateway":
                        times[side].append(through_gateway(env, folder, what, args.size))
                    else:
                        times[side].append(over_pipes(layout, folder, what, args.size))
                progress(f"  {what}: {i + 1}/{args.rounds}")
            g, p = statistics.median(times["gateway"]), statistics.median(times["pipes"])
            if unit == "MiB/s":
                rows.append((what, f"{args.size / g:.0f} MiB/s", f"{args.size / p:.0f} MiB/s",
                             p / g, "speed ratio, goal >= 0.5"))  # fmt: skip
            else:
                goal = "goal <= 2" if what == "small" else ""
                goal = "goal: about 1 s" if what in ("new", "changed") else goal
                digits = 3 if what in ("new", "changed") else 2
                rows.append((what, f"{g:.{digits}f} s", f"{p:.{digits}f} s", g / p,
                             f"time ratio, {goal}"))  # fmt: skip
        machine = f"{os.cpu_count()} cores, Linux {platform.release()}"
        print(f"\nMachine: {machine}, Python {platform.python_version()}; ", end="")
        print(f"medians of {args.rounds} rounds in turns.\n")
        print("| workload | through the gateway | over local pipes | ratio | |")
        print("|---|---|---|---|---|")
        for what, g, p, ratio, note in rows:
            print(f"| {what} | {g} | {p} | {ratio:.2f} | {note} |")
        return 0
    finally:
        if gw is not None:
            gw.stop()
            stop_leftovers(tmp / "state")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
