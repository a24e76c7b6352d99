"""Starting a nanny: its command line, the daemonising, and the child's start.

    python -m gateway.nanny --socket PATH --status PATH [--cwd DIR] [--linger S] [--log PATH]
        -- ARGV...

The nanny daemonises (double fork, new session) and starts ARGV in its own session and process
group under gateway.nanny.process.Nanny. The original process prints the nanny's pid once the
socket listens, or a one-sentence error on stderr if ARGV cannot be started.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from gateway import landlock
from gateway.nanny import wire
from gateway.nanny.log import log, log_exception
from gateway.nanny.process import Nanny

DEFAULT_LINGER_S = 300.0


def parse_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in args:
        split = args.index("--")
        args, argv = args[:split], args[split + 1 :]
    else:
        argv = []
    parser = argparse.ArgumentParser(prog="python -m gateway.nanny")
    parser.add_argument("--socket", required=True, help="Unix socket to serve the gateway on")
    parser.add_argument("--status", required=True, help="JSON status file to keep up to date")
    parser.add_argument("--cwd", help="working directory of the command")
    parser.add_argument("--linger", type=float, default=DEFAULT_LINGER_S, help="seconds to wait")
    parser.add_argument("--log", help="file to append the nanny's own log to (else stderr)")
    # The command is a sandbox's (gateway.sandbox): --shield keeps the group's signals from
    # its monitor, --scope adds Landlock's signal and abstract-socket scopes.
    parser.add_argument("--shield", action="store_true", help="child ignores INT/TERM/HUP/QUIT")
    parser.add_argument("--scope", action="store_true", help="child is scoped by Landlock")
    parser.add_argument(
        "--files", action="store_true", help="child gets the files stream on fds 3 and 4"
    )
    opts = parser.parse_args(args)
    if not argv:
        parser.error("give the command to run after '--'")
    # Absolute, so nothing depends on the directory we happen to be in.
    for name in ("socket", "status", "log"):
        if getattr(opts, name):
            setattr(opts, name, os.path.abspath(getattr(opts, name)))
    return opts, argv


def main(args: list[str] | None = None) -> int:
    raw = sys.argv[1:] if args is None else args
    if raw == ["--spare"]:
        # A spare nanny, started ahead by the launcher so that a launch does not wait for an
        # interpreter to start: its arguments and the child's environment arrive as one JSON
        # line on stdin. EOF instead (the gateway went away) ends it quietly.
        line = sys.stdin.buffer.readline()
        if not line:
            return 0
        spec = json.loads(line)
        os.environ.clear()
        os.environ.update(spec["env"])
        raw = spec["args"]
    opts, argv = parse_args(raw)
    report_r, report_w = os.pipe()
    first = os.fork()
    if first == 0:
        # First child: a new session, then fork the nanny and exit, so the nanny is reparented
        # away from the gateway and no signal to the gateway's group or session reaches it.
        code = 1
        try:
            os.close(report_r)
            os.setsid()
            code = serve(opts, argv, report_w) if os.fork() == 0 else 0
        except BaseException:
            log_exception()
        finally:
            os._exit(code)
    os.close(report_w)
    report = b""
    while chunk := os.read(report_r, 4096):
        report += chunk
    os.waitpid(first, 0)
    kind, _, text = report.decode(errors="replace").partition(" ")
    if kind == "ok":
        print(text, flush=True)
        return 0
    print(text or "bitfusion: the process supervisor failed to start.", file=sys.stderr)
    return 1


def serve(opts: argparse.Namespace, argv: list[str], report_w: int) -> int:
    """The nanny proper: start the child, tell the launcher, run the loop."""

    def report(message: str) -> None:
        os.write(report_w, message.encode())
        os.close(report_w)

    _reset_signals()
    try:
        _detach_stdio(opts.log)
        listener = listen(opts.socket)
    except OSError as exc:
        report(f"err bitfusion: cannot listen on {opts.socket}: {exc.strerror or exc}.")
        return 1
    files = _files_pipes() if opts.files else None
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=opts.cwd,
            start_new_session=True,  # own session and group: signalled and mapped as one
            preexec_fn=_confiner(opts, files),
            pass_fds=wire.FILES_FDS if files else (),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        listener.close()
        try:
            os.unlink(opts.socket)
        except OSError:
            pass
        message = cannot_run(argv[0], opts.cwd, exc)
        log(message)
        report("err " + message)
        return 1
    log(f"started {child.pid}: {argv!r}")
    ours = None
    if files is not None:
        child_in, to_sshfs, from_sshfs, child_out = files
        os.close(child_in)
        os.close(child_out)
        ours = (to_sshfs, from_sshfs)
    nanny = Nanny(listener, child, argv, opts.socket, opts.status, opts.linger, ours)
    nanny.write_status()
    report(f"ok {os.getpid()}")
    return nanny.run()


def _files_pipes() -> tuple[int, int, int, int]:
    """(child reads, we write, we read, child writes): the files stream's two pipes, at fds
    of 10 and up, so that putting the child's ends at 3 and 4 overwrites none of them."""
    fds: list[int] = []
    for read, write in (os.pipe(), os.pipe()):
        for fd in (read, write):
            fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
            os.close(fd)
    return fds[0], fds[1], fds[2], fds[3]


def _confiner(
    opts: argparse.Namespace, files: tuple[int, int, int, int] | None = None
) -> Callable[[], None] | None:
    """What the child runs just before exec: confined as asked, or it does not start at all."""
    if not (opts.shield or opts.scope or files):
        return None

    def confine() -> None:
        if files is not None:  # the files stream where files_prelude.sh expects it
            os.dup2(files[0], wire.FILES_FDS[0])
            os.dup2(files[3], wire.FILES_FDS[1])
        if opts.shield:  # bwrap's monitor; `env --default-signal` resets them for the command
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(signum, signal.SIG_IGN)
        if opts.scope:
            landlock.scope()

    return confine


def cannot_run(program: str, cwd: str | None, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if cwd is not None and exc.filename == cwd:
            return f"cannot run {program!r} in {cwd!r}: {reason}"
        return f"cannot run {program!r}: {reason}"
    return f"cannot run {program!r}: {exc}"


def listen(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, readable and writable only by its owner."""
    try:
        os.unlink(path)  # a stale socket from a nanny that was killed
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 from the start, no window with a wider mode
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)  # the child gets the umask it was meant to
    sock.listen(4)
    return sock


def _reset_signals() -> None:
    # A gateway started in the background (nohup, `&`) hands down SIGINT/SIGQUIT/SIGHUP ignored,
    # and an ignored signal stays ignored across exec: the child would never see a forwarded
    # Ctrl-C. A Python handler is reset to the default on exec instead, so with these no-op
    # handlers the child starts with defaults while the nanny, which has no terminal and must
    # outlive stray signals, shrugs them off.
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, _shrug)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _shrug(signum: int, frame: object) -> None:
    pass


def _detach_stdio(log_path: str | None) -> None:
    # Let go of the launcher's pipes: it reads them to EOF. stderr becomes our log.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    os.close(devnull)
