"""Keep what runs in a share out of the gateway's state directory, with Linux Landlock.

Every command and kernel runs as the gateway's Unix user, so without this a user could read
``STATE_DIR`` from inside a share: the admin token, the pool's keys (and so mint any token),
the ledger, and other users' kernel connection files with their HMAC keys. Landlock lets an
unprivileged process give up access for itself and its children; the nanny does so in the
child just before ``exec``. It also scopes signals and abstract unix sockets (ABI 6): a share
cannot signal the gateway or another share's processes, nor connect to a socket that another
share's process made in the abstract namespace (a kernel's channels). Landlock already
forbids ptrace (``/proc/PID/mem``, ``environ``, ``root``) of processes outside the sandbox.

Landlock only grants, it never subtracts, so "everything but STATE_DIR" is written as: every
entry of every directory on the way down to STATE_DIR, except the next step. Entries made in
those directories later are out of reach of a share started before them; everything below
the entries is untouched. Inside STATE_DIR the share gets only what it needs (its kernel's
connection file, the usage files, the simulated pool's usage directory).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on x86-64, arm64
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights by the ABI that brought them.
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_ABI1 = (1 << 13) - 1  # execute ... make_sym
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
_FILE_ONLY = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV  # valid on a file


class SandboxError(OSError):
    """Landlock refused a step; the share must not start unconfined by accident."""


@dataclass
class Confinement:
    """What a share may not see, and the few paths inside it that it still needs."""

    hide: str
    read: list[str] = field(default_factory=list)  # files or directories, read only
    write: list[str] = field(default_factory=list)  # files or directories, read and write

    def args(self) -> list[str]:
        """The nanny's options that carry it."""
        out = ["--hide", self.hide]
        for path in self.read:
            out += ["--read", path]
        for path in self.write:
            out += ["--write", path]
        return out


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise SandboxError(errno, os.strerror(errno))
    return result


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or turned off."""
    try:
        return _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    except (SandboxError, AttributeError):
        return 0


def _handled(version: int) -> int:
    rights = _ABI1
    if version >= 2:
        rights |= _REFER
    if version >= 3:
        rights |= _TRUNCATE
    if version >= 5:
        rights |= _IOCTL_DEV
    return rights


def _allow(ruleset: int, path: str, rights: int, is_dir: bool | None = None) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # gone meanwhile, or a dangling link: nothing to grant
    try:
        if is_dir is None:
            is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
        attr = _PathBeneathAttr(rights if is_dir else rights & _FILE_ONLY, fd)
        _syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(attr), 0)
    finally:
        os.close(fd)


def _around(hidden: Path) -> tuple[list[str], list[tuple[str, bool]]]:
    """The directories on the way down to ``hidden``, and every entry beside that way (with
    whether it is a directory)."""
    way: list[str] = []
    beside: list[tuple[str, bool]] = []
    parent = Path(hidden.anchor)
    for step in hidden.parts[1:]:
        way.append(str(parent))
        try:
            with os.scandir(parent) as entries:
                for entry in entries:
                    if entry.name == step:
                        continue
                    # A link may lead back onto the way (pytest's "pytest-current" does):
                    # granting it would grant STATE_DIR itself. Only links need the look.
                    if entry.is_symlink() and _leads_to(entry.path, hidden):
                        continue
                    try:
                        beside.append((entry.path, entry.is_dir()))
                    except OSError:
                        continue
        except OSError:
            pass
        parent = parent / step
    return way, beside


def _leads_to(path: str, hidden: Path) -> bool:
    target = Path(os.path.realpath(path))
    return target == hidden or hidden in target.parents or target in hidden.parents


def confine(rules: Confinement) -> None:
    """Give up ``rules.hide`` for this process and its future children.

    Raises SandboxError where Landlock is missing or refuses, so the caller decides whether
    to run unconfined (and says so)."""
    version = abi()
    if version < 1:
        raise SandboxError(0, "Landlock is not available in this kernel")
    rights = _handled(version)
    # Scoped abstract sockets keep other shares off a kernel's channels (gateway.kernels).
    scoped = _SCOPE_SIGNAL | _SCOPE_ABSTRACT_UNIX if version >= 6 else 0
    attr = _RulesetAttr(rights, 0, scoped)
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    try:
        way, beside = _around(Path(os.path.realpath(rules.hide)))
        for path in way:
            # The directories on the way down may be listed (their names, as `ls` shows them),
            # which also lists STATE_DIR's names; never its files' contents.
            _allow(ruleset, path, _READ_DIR, is_dir=True)
        for path, is_dir in beside:
            _allow(ruleset, path, rights, is_dir)
        for path in rules.read:
            _allow(ruleset, path, _READ_FILE | _READ_DIR)
        for path in rules.write:
            _allow(ruleset, path, rights)
        _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _syscall(_SYS_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)


def plan(state_dir: Path, workdirs: Sequence[Path], wanted: bool = True) -> tuple[int, str]:
    """The Landlock ABI to confine shares with (0: none), and one line that says so.

    Landlock cannot grant a directory but for one of its subdirectories, so the directories
    on the way down to STATE_DIR only stay listable: nothing new can be made in them. Where
    the shares' working directory or the gateway user's home is one of them, shares could
    not even save a file there, so they are not confined and the line says what to change.
    """
    if not wanted:
        return 0, "NOT confined (--unconfined): code in a share can read the state directory"
    version = abi()
    if version < 1:
        return 0, (
            "NOT confined: this kernel has no Landlock, so code in a share can read the state "
            "directory (keys, admin token); use Linux 5.13 or newer with Landlock enabled"
        )
    hidden = Path(os.path.realpath(state_dir))
    for place in workdirs:
        real = Path(os.path.realpath(place))
        if real in hidden.parents:
            return 0, (
                f"NOT confined: the state directory {state_dir} is inside {place}, where "
                "shares could then not make new files; give the gateway a --state-dir "
                "outside it (as /var/lib/bitfusion) to keep shares out of it"
            )
    signals = ", signals and abstract unix sockets scoped" if version >= 6 else ""
    return version, f"confined by Landlock ABI {version}: no access to {state_dir}{signals}"
