"""Landlock, the second layer of a share's sandbox: signals and abstract unix sockets.

bubblewrap (``gateway.sandbox``) builds what a share sees of the file system and of the
processes. Two things it cannot wall off, since shares keep the host's network namespace:
abstract unix sockets (a kernel's channels listen there, see ``gateway.kernels``) and signals
to processes it does not see but could name. Landlock ABI 6 scopes both to the share's own
domain: the nanny sets it up in the child just before ``exec``; the gateway, outside every
domain, still connects to the sockets and signals the processes.
"""

from __future__ import annotations

import ctypes
import os

_SYS_CREATE_RULESET, _SYS_RESTRICT_SELF = 444, 446  # the same on x86-64 and arm64
_CREATE_RULESET_VERSION = 1
_PR_SET_NO_NEW_PRIVS = 38
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
SCOPED_ABI = 6  # the Landlock ABI that brought scopes (Linux 6.12)


class LandlockError(OSError):
    """Landlock refused a step; the share must not start unscoped by accident."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise LandlockError(errno, os.strerror(errno))
    return result


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or turned off."""
    try:
        return _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    except (LandlockError, AttributeError):
        return 0


def scope() -> None:
    """Keep this process and its future children from signalling, or connecting to abstract
    unix sockets of, anything outside their own domain.

    Handles no file-system right on purpose: a domain that does cannot mount, and bubblewrap,
    which runs inside it, must. Raises LandlockError below ABI 6."""
    if abi() < SCOPED_ABI:
        raise LandlockError(0, f"Landlock ABI {SCOPED_ABI} (Linux 6.12) is needed for scopes")
    attr = _RulesetAttr(0, 0, _SCOPE_SIGNAL | _SCOPE_ABSTRACT_UNIX)
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    try:
        _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _syscall(_SYS_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
