"""The client's folder, served to a share: OpenSSH's sftp-server, confined to that folder.

A command or kernel on a share runs on the GPU server; its working folder is the client's,
mounted there by sshfs over the SFTP stream this serves (gateway/files_prelude.sh). The
server is the client's disk, so what it may reach is decided here, not trusted to the other
side: sftp-server runs in a bubblewrap sandbox that holds the folder at its own path, the
sftp-server program and the libraries it loads, and nothing else. A path sent on purpose
(``../secret``, ``/etc/passwd``) or a symlink planted in the folder that points out of it
resolves in that sandbox, where nothing outside the folder exists.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from remoting import protocol
from remoting.client import GatewayError

T = TypeVar("T")

SFTP_SERVER_PATHS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                     "/usr/libexec/sftp-server")  # fmt: skip


class FilesError(Exception):
    """The folder cannot be carried; the message says why and what to do."""


@dataclass(frozen=True)
class Choice:
    folder: Path | None  # None: nothing is carried
    note: str  # one sentence for the user when nothing is carried though they did not say so
    named: bool = False  # the user named it: not carrying it is an error, not a note


RUN_HINT = "run from a project folder, or name one with --files DIR (--no-files keeps this quiet)"
KERNEL_HINT = "keep the notebook in a project folder, and its kernel works there on the share"


def choose(cwd: str | Path, files: str | None, no_files: bool, home: str | Path | None = None,
           hint: str = RUN_HINT) -> Choice:  # fmt: skip
    """The folder a share gets: ``--files DIR``, none with ``--no-files``, else the current
    folder, unless that is ``/`` or holds the user's whole home (where ``~/.ssh`` lives), or
    this machine cannot serve it (then the note says why, and nothing is carried)."""
    if no_files:
        return Choice(None, "")
    home = Path(home or os.path.expanduser("~")).resolve()
    if files is not None and files != ".":
        folder = Path(files).expanduser().resolve()
        if not folder.is_dir():
            raise FilesError(f"--files {files}: no such folder on this machine.")
        if folder == Path("/"):
            raise FilesError("--files /: the whole disk is not carried; name a project folder.")
        _ready()
        return Choice(folder, "", named=True)
    # The current folder, by default: "." says the same (a notebook's, where the Jupyter
    # server starts its kernel), so this machine or the gateway not taking it is a note.
    folder = Path(cwd).resolve()
    if folder == Path("/") or folder == home or home.is_relative_to(folder):
        return Choice(
            None,
            f"not carrying {folder} to the share: it holds your whole home directory; {hint}.",
        )
    try:
        _ready()
    except FilesError as exc:
        return Choice(None, f"not carrying {folder} to the share: {exc}")
    return Choice(folder, "")


def carried(
    send: Callable[[dict[str, Any]], T], choice: Choice, say: Callable[[str], object]
) -> tuple[T, Path | None]:
    """``send(fields)`` (a spawn or kernel start; ``fields``: the request's own, naming the
    chosen folder) and the folder it carried. Where the gateway cannot mount a folder the user
    did not name, they are told, and it goes again without: a command that needs no files
    should not fail for them."""
    folder = choice.folder
    try:
        return send({"files": str(folder)} if folder is not None else {}), folder
    except GatewayError as exc:
        if folder is None or choice.named or exc.code != protocol.E_NO_FILES:
            raise
        say(f"{exc.told()} It runs without it.")
    return send({}), None


def _ready() -> None:
    """bubblewrap and sftp-server are here (a folder is only served confined to itself)."""
    if shutil.which("bwrap") is None:
        raise FilesError(
            "bubblewrap is not installed here, and your folder is only served confined to "
            "itself; install it (Debian: apt-get install bubblewrap) or run with --no-files."
        )
    sftp_server()


def sftp_server() -> str:
    for path in SFTP_SERVER_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise FilesError(
        "OpenSSH's sftp-server is not installed here, so your folder cannot go to the share; "
        "install it (Debian: apt-get install openssh-sftp-server) or run with --no-files."
    )


def _libraries(program: str) -> list[str]:
    """The shared libraries ``program`` loads (and its loader), as ldd names them."""
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=False).stdout
    return sorted({m for m in re.findall(r"(/\S+) \(0x", out)})


def argv(folder: Path, passwd_fd: int) -> tuple[list[str], bytes]:
    """The command that serves ``folder`` over SFTP on its stdin and stdout, and the
    /etc/passwd it needs (sftp-server looks its user up), to give it on ``passwd_fd``."""
    _ready()
    program = sftp_server()
    out = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for path in [program, *_libraries(program)]:
        out += ["--ro-bind", os.path.realpath(path), path]
    out += ["--dev", "/dev", "--ro-bind-data", str(passwd_fd), "/etc/passwd"]
    out += ["--bind", str(folder), str(folder)]
    out += ["--chdir", str(folder), "--", program, "-d", str(folder), "-l", "ERROR", "-e"]
    me = pwd.getpwuid(os.getuid())
    passwd = f"{me.pw_name}:x:{me.pw_uid}:{me.pw_gid}::{folder}:/nonexistent\n".encode()
    return out, passwd


def start(folder: Path) -> subprocess.Popen[bytes]:
    """sftp-server for ``folder``, confined, its SFTP on the returned process's stdin and
    stdout; its complaints go to this process's stderr."""
    read, write = os.pipe()
    try:
        command, passwd = argv(folder, read)
        os.write(write, passwd)  # far below a pipe's buffer
        os.close(write)
        write = -1
        return subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(read,)
        )
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
