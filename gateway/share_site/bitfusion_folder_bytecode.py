"""Keeps the bytecode of modules imported from the client's folder on this server.

The client's folder is an sshfs mount whose every file operation is a round trip to the
client. Python would read each module's ``__pycache__/*.pyc`` there, and write one for every
module it compiles: about twice the round trips of the import itself, and files of this
server's Python left in the user's folder. A path hook gives the folder's directories a
loader that keeps that bytecode under ``~/.cache/bitfusion/pycache`` instead (the user's
server home, private to them), checked against the source's mtime and size as usual.

The cache would otherwise only grow (one file per module of every folder the user ever
carried here): at most once a day, the first process to start drops what has not been used
for 30 days (a module used again is compiled again, once).

sitecustomize imports this only when BITFUSION_FILES names the folder. Like it, this may run
under any Python a user brings (3.8 and later here: ``sys.pycache_prefix``), and a failure
only leaves the usual ``__pycache__``.
"""

from __future__ import annotations

import os
import sys
import time
from importlib.machinery import (
    BYTECODE_SUFFIXES,
    EXTENSION_SUFFIXES,
    SOURCE_SUFFIXES,
    ExtensionFileLoader,
    FileFinder,
    SourceFileLoader,
    SourcelessFileLoader,
)

CACHE = os.path.join(".cache", "bitfusion", "pycache")  # under the user's home
PRUNED = ".pruned"  # its mtime: when the cache was last pruned
PRUNE_EVERY_S = 86400
UNUSED_S = 30 * 86400
PRUNE_AT_MOST = 50_000  # entries looked at in one go: a bound on one start's delay


def prune(prefix: str, now: float | None = None) -> None:
    """Drop bytecode unused (not read, where the file system records reads, nor written) for
    UNUSED_S, and the folders left empty; at most once every PRUNE_EVERY_S."""
    now = time.time() if now is None else now
    stamp = os.path.join(prefix, PRUNED)
    try:
        if now - os.stat(stamp).st_mtime < PRUNE_EVERY_S:
            return
    except FileNotFoundError:
        if not os.path.isdir(prefix):
            return
    with open(stamp, "a"):
        pass
    os.utime(stamp, (now, now))  # first: a start beside this one does not prune too
    seen = 0
    for top, dirs, files in os.walk(prefix, topdown=False):  # links are not followed
        for name in files:
            seen += 1
            path = os.path.join(top, name)
            if not name.endswith(".pyc"):
                continue
            st = os.lstat(path)
            if now - max(st.st_atime, st.st_mtime) > UNUSED_S:
                os.unlink(path)
        if top != prefix and not os.listdir(top):
            os.rmdir(top)
        seen += len(dirs)
        if seen > PRUNE_AT_MOST:
            return


def install(folder: str, home: str) -> None:
    prefix = os.path.join(home, CACHE)
    top = folder.rstrip("/") + "/"
    try:
        prune(prefix)
    except OSError:
        pass  # a cache we cannot tidy is still a cache

    class LocalBytecode(SourceFileLoader):
        def get_code(self, fullname: str):
            # cache_from_source reads sys.pycache_prefix when called: set it for this
            # module's read or write of its bytecode only.
            saved = sys.pycache_prefix
            sys.pycache_prefix = prefix
            try:
                return super().get_code(fullname)
            finally:
                sys.pycache_prefix = saved

    # The loaders CPython's own file finder uses, in its order, with ours for sources.
    finder = FileFinder.path_hook(
        (ExtensionFileLoader, EXTENSION_SUFFIXES),
        (LocalBytecode, SOURCE_SUFFIXES),
        (SourcelessFileLoader, BYTECODE_SUFFIXES),
    )

    def in_folder(path: str) -> bool:
        try:
            full = os.path.abspath(path) if path else os.getcwd()
        except OSError:  # a working directory that is gone: Python's own finder says so
            return False
        return (full + "/").startswith(top)

    def hook(path: str):
        if not in_folder(path):
            raise ImportError("not in the client's folder")
        return finder(path)

    sys.path_hooks.insert(0, hook)
    # Entries already looked at (the script's directory, the working directory) get ours too.
    for path in [p for p in sys.path_importer_cache if isinstance(p, str) and in_folder(p)]:
        del sys.path_importer_cache[path]
