"""The client's folder in a share (`run --files`): through the gateway against the same two
ends over plain local pipes, and over OpenSSH on loopback.

All sides are the same parts: OpenSSH's sftp-server and sshfs mounting its folder in a
share's sandbox (gateway.sandbox). The first baseline joins them by two pipes on this machine
(sftp-server confined by bitfusion_jupyter.file_server); the second is what a user would do
without us, sshfs to a remote machine over ssh, here `ssh -s sftp` to an sshd on loopback
(encrypted, one TCP connection, two C processes in the way). The measured side carries the
SFTP bytes as stream 3 of a `bitfusion run --files` through a real gateway on loopback
(nanny, gateway, CurveZMQ connection, client). In turns, who goes first rotating, each
workload timed inside the share, so starts are not counted:

1. sequential read of a SIZE MiB file (goal: at least 0.5 x the pipes' speed);
2. sequential write of SIZE MiB (same goal);
3. 2,000 small files, each stat'ed and read (goal: at most 2 x the pipes' time);
4. importing a package of 500 modules from the folder, its bytecode new (import), and once
   more with the bytecode the first import wrote (import-again). Through the gateway that
   bytecode is kept in the user's server home (share_site), not in the folder's
   __pycache__ as on the other sides;
5. a file saved on the client while the share looks for it (new) or has read it (changed):
   seconds until the share sees it (the issue's "within about a second").

Progress goes to stderr, the table to stdout. Everything made is removed on the way out.

    python bench/files.py [--rounds 3] [--size 256] [--no-ssh]
        [--only read write small import import-again new changed]
"""

from __future__ import annotations

import argparse
import os
import platform
import pwd
import shutil
import socket
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
elif what in ("import", "import-again"):
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


def over_pipes(
    layout: sandbox.Layout, folder: Path, what: str, size: int, ssh: SshLoopback | None = None
) -> float:
    """sshfs in a share's sandbox, joined by two pipes to sftp-server (or to `ssh -s sftp`)."""
    server = ssh.client() if ssh else file_server.start(folder)
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
            folder, f"over {'ssh' if ssh else 'pipes'}, {what}",
        )  # fmt: skip
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.stdout.close()  # type: ignore[union-attr]
        server.wait()


class SshLoopback:
    """The realistic alternative: the same sftp-server reached over OpenSSH (ssh to an sshd on
    loopback, encrypted, as sshfs to a remote machine would), started for the run and removed
    with it. Runs only where sshd and ssh are installed."""

    def __init__(self, top: Path) -> None:
        self.top = top
        top.mkdir(mode=0o700)
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(top / name)],
                           check=True)  # fmt: skip
        (top / "authorized_keys").write_text((top / "user_key.pub").read_text())
        self.port = free_port()
        sftp = next(p for p in file_server.SFTP_SERVER_PATHS if os.path.exists(p))
        (top / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {top / 'host_key'}\n"
            f"AuthorizedKeysFile {top / 'authorized_keys'}\nPidFile {top / 'sshd.pid'}\n"
            f"StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            f"Subsystem sftp {sftp}\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation, when run as root
        with open(top / "sshd.log", "wb") as sshd_log:
            self.sshd = subprocess.Popen(
                [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f",
                 str(top / "sshd_config")], stderr=sshd_log,
            )  # fmt: skip
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {(top / 'sshd.log').read_text()[-1000:]}")

    def client(self) -> subprocess.Popen[bytes]:
        """`ssh -s sftp`: SFTP on its stdin and stdout, as sftp-server's own are."""
        return subprocess.Popen(
            ["ssh", "-F", "none", "-i", str(self.top / "user_key"), "-p", str(self.port),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-s",
             f"{pwd.getpwuid(os.getuid()).pw_name}@127.0.0.1", "sftp"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> None:
        self.sshd.terminate()
        self.sshd.wait()


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
    parser.add_argument("--no-ssh", action="store_true", help="leave out ssh on loopback")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-files-", dir="/var/tmp"))
    gw = None
    ssh: SshLoopback | None = None
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
        ssh = None
        if shutil.which("sshd") and shutil.which("ssh") and not args.no_ssh:
            ssh = SshLoopback(tmp / "ssh")
        else:
            progress("no sshd or ssh here: the comparison over ssh on loopback is left out")
        sides = ["gateway", "pipes"] + (["ssh"] if ssh else [])
        rows = []
        workloads = [("read", "MiB/s"), ("write", "MiB/s"), ("small", "s"), ("import", "s"),
                     ("import-again", "s"), ("new", "s"), ("changed", "s")]  # fmt: skip
        server_bytecode = tmp / "state" / "homes" / "bench" / ".cache" / "bitfusion"
        for what, unit in [w for w in workloads if not args.only or w[0] in args.only]:
            times: dict[str, list[float]] = {side: [] for side in sides}
            for i in range(args.rounds):
                for side in sides[i % len(sides) :] + sides[: i % len(sides)]:  # in turns
                    clear_outputs(folder)
                    shutil.rmtree(server_bytecode, ignore_errors=True)

                    def run(side: str = side, what: str = what) -> float:
                        if side == "gateway":
                            return through_gateway(env, folder, what, args.size)
                        return over_pipes(
                            layout, folder, what, args.size, ssh if side == "ssh" else None
                        )

                    if what == "import-again":
                        run()  # writes the bytecode the timed import reads
                    times[side].append(run())
                progress(f"  {what}: {i + 1}/{args.rounds}")
            med = {side: statistics.median(t) for side, t in times.items()}
            if unit == "MiB/s":
                shown = {side: f"{args.size / t:.0f} MiB/s" for side, t in med.items()}
                ratios = {side: t / med["gateway"] for side, t in med.items()}  # speed
                note = "speed ratio, goal >= 0.5 x pipes"
            else:
                digits = 3 if what in ("new", "changed") else 2
                shown = {side: f"{t:.{digits}f} s" for side, t in med.items()}
                ratios = {
                    side: med["gateway"] / t if t else float("nan") for side, t in med.items()
                }
                note = {"small": "time ratio, goal <= 2 x pipes", "new": "goal: about 1 s",
                        "changed": "goal: about 1 s"}.get(what, "time ratio")  # fmt: skip
            rows.append((what, shown, ratios, note))
        machine = f"{os.cpu_count()} cores, Linux {platform.release()}"
        print(f"\nMachine: {machine}, Python {platform.python_version()}; ", end="")
        print(f"medians of {args.rounds} rounds in turns.\n")
        names = {"gateway": "through the gateway", "pipes": "over local pipes",
                 "ssh": "over ssh on loopback"}  # fmt: skip
        head = [names[s] for s in sides] + [
            f"ratio to {names[s].split(' ', 1)[1]}" for s in sides[1:]
        ]
        print("| workload | " + " | ".join(head) + " | |")
        print("|---" * (len(head) + 2) + "|")
        for what, shown, ratios, note in rows:
            cells = [shown[s] for s in sides] + [f"{ratios[s]:.2f}" for s in sides[1:]]
            print(f"| {what} | " + " | ".join(cells) + f" | {note} |")
        return 0
    finally:
        if ssh is not None:
            ssh.stop()
        if gw is not None:
            gw.stop()
            stop_leftovers(tmp / "state")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
