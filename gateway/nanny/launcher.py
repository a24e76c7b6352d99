"""The gateway's side of starting a process in a share: launch its nanny and wait for it.

The nanny interpreter runs with ``-I -S``: the environment it inherits is the *child's*, and a
user's PYTHONPATH, PYTHONHOME or PYTHONSAFEPATH must not be able to break or hijack the nanny
(``-I``), while site-packages and its .pth files cost more start-up time than the nanny's
entire stdlib imports (``-S``). These flags only shape the nanny's own interpreter: the child is
a fresh exec with the environment untouched, so a Python child still gets its site and
PYTHON* variables. The nanny needs nothing beyond the stdlib and this package, whose root we
put on its sys.path ourselves.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds gateway/
START_TIMEOUT_S = 10.0
# sockaddr_un holds 108 bytes with the NUL; keep a margin for other platforms.
MAX_SOCKET_PATH = 100

_BOOT = (
    f"import sys; sys.path.insert(0, {str(PACKAGE_ROOT)!r}); "
    "from gateway.nanny import main; sys.exit(main())"
)


def _interpreter() -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _BOOT]


# One nanny interpreter is kept started ahead and waits for its command on stdin, so that a
# launch costs a pipe write, not an interpreter start (about 35 ms here). A lock, because the
# gateway launches from worker threads.
_spare_lock = threading.Lock()
_spare: subprocess.Popen[bytes] | None = None


def _start_spare() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*_interpreter(), "--spare"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "")},
    )


def _take_spare() -> subprocess.Popen[bytes]:
    """The waiting spare nanny (or a new one if it died), leaving a fresh spare behind."""
    global _spare
    with _spare_lock:
        spare = _spare if _spare is not None and _spare.poll() is None else _start_spare()
        _spare = _start_spare()
    return spare


def prepare_spare() -> None:
    """Start the spare now, so even the first launch finds one waiting."""
    global _spare
    with _spare_lock:
        if _spare is None or _spare.poll() is not None:
            _spare = _start_spare()


def discard_spare() -> None:
    """End the spare (it exits on EOF); called when the gateway stops."""
    global _spare
    with _spare_lock:
        if _spare is not None:
            try:
                _spare.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                _spare.kill()
            _spare = None


@dataclass(frozen=True)
class Launched:
    nanny_pid: int
    socket_path: Path
    status_path: Path


class LaunchError(Exception):
    """The command could not be started; the message is one sentence for the user."""


def _request(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    run_dir: Path,
    proc_id: str,
    linger_s: float,
    nanny_flags: Sequence[str] = (),
) -> tuple[bytes, Path, Path]:
    """The line a spare nanny reads to become ``argv``'s nanny, and its two paths."""
    if not argv:
        raise LaunchError("bitfusion: no command to run.")
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    socket_path = socket_path_for(run_dir, proc_id)
    status_path = run_dir / f"{proc_id}.json"
    args = [
        "--socket",
        str(socket_path),
        "--status",
        str(status_path),
        "--log",
        str(run_dir / f"{proc_id}.log"),
        "--linger",
        repr(float(linger_s)),
    ]
    if cwd:
        args += ["--cwd", cwd]
    args += nanny_flags
    args += ["--", *argv]
    return (json.dumps({"args": args, "env": dict(env)}) + "\n").encode(), socket_path, status_path


def launch(*args: Any, **kwargs: Any) -> Launched:
    """``launch_async`` for a caller with no event loop (tests, tools)."""
    return asyncio.run(launch_async(*args, **kwargs))


async def launch_async(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    run_dir: Path,
    proc_id: str,
    linger_s: float = 300,
    nanny_flags: Sequence[str] = (),
) -> Launched:
    """Start ``argv`` under a new nanny; return once the nanny's socket is listening.

    The event loop waits on the nanny's pipes, not a worker thread: a thread would contend
    for the GIL with a busy loop, and each of the launch's many small steps would wait for
    its turn, which under load made starts several times slower.
    """
    line, socket_path, status_path = _request(
        argv, env, cwd, run_dir, proc_id, linger_s, nanny_flags
    )
    try:
        spare = _take_spare()
        assert spare.stdin and spare.stdout and spare.stderr
        spare.stdin.write(line)  # one line, read at once by a nanny that waits for it
        spare.stdin.close()
        stdout, stderr = await asyncio.wait_for(
            asyncio.gather(_read_to_end(spare.stdout), _read_to_end(spare.stderr)),
            START_TIMEOUT_S,
        )
        while spare.poll() is None:  # its output is closed: it is exiting
            await asyncio.sleep(0.001)
    except TimeoutError:
        spare.kill()
        spare.wait()
        raise LaunchError(
            f"bitfusion: the process supervisor did not start within {START_TIMEOUT_S:g} s."
        ) from None
    except OSError as exc:
        raise LaunchError(
            f"bitfusion: cannot start the process supervisor: {exc.strerror or exc}."
        ) from None
    if spare.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        raise LaunchError(
            lines[-1]
            if lines
            else f"bitfusion: the process supervisor failed ({spare.returncode})."
        )
    try:
        nanny_pid = int(stdout.split()[0])
    except (IndexError, ValueError):
        raise LaunchError("bitfusion: the process supervisor did not report its pid.") from None
    return Launched(nanny_pid, socket_path, status_path)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _read_to_end(pipe: Any) -> bytes:
    loop = asyncio.get_running_loop()
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, _wake, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(fd)
                continue
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        pipe.close()


def socket_path_for(run_dir: Path, proc_id: str) -> Path:
    """``run_dir/<proc_id>.sock``, or a short private path when that is too long to bind."""
    path = run_dir / f"{proc_id}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    short = Path(tempfile.gettempdir()) / f"bitfusion-{os.getuid()}"
    try:
        short.mkdir(mode=0o700)
    except FileExistsError:
        st = os.lstat(short)  # refuse a directory someone else planted for us
        if not os.path.isdir(short) or os.path.islink(short) or st.st_uid != os.getuid():
            raise LaunchError(f"bitfusion: {short} is not a private directory.") from None
    return short / f"{proc_id}.sock"


def read_status(status_path: Path) -> dict[str, Any] | None:
    """A nanny's status file, or None when it is missing or unreadable."""
    try:
        data = json.loads(status_path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def kill_orphan(status: Mapping[str, Any]) -> None:
    """SIGKILL a nanny that cannot be reached, and its child's whole process group."""
    nanny_pid = status.get("nanny_pid")
    if _is_pid(nanny_pid) and _looks_like_nanny(nanny_pid):
        _kill(os.kill, nanny_pid)
    pgid = status.get("pgid")
    if _is_pid(pgid):
        _kill(os.killpg, pgid)


def _is_pid(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 1


def is_nanny(pid: int) -> bool:
    """True when ``pid`` is a live nanny (so not a process a user may claim)."""
    try:
        return b"gateway.nanny" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _looks_like_nanny(pid: int) -> bool:
    # The nanny may be long gone and its pid reused: only kill a process that is a nanny.
    try:
        return b"gateway.nanny" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc to ask: trust the status file
    except OSError:
        return False


def _kill(kill: Any, pid: int) -> None:
    try:
        kill(pid, signal.SIGKILL)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise
