"""Keeps the bytecode of modules imported from the client's folder on this server.

The client's folder is an sshfs mount whose every file operation is a round trip to the
client. Python would read each module's ``__pycache__/*.pyc`` there, and write one for every
module it compiles: about twice the round trips of the import itself, and files of this
server's Python left in the user's folder. A path hook gives the folder's directories a
loader that keeps that bytecode under ``~/.cache/bitfusion/pycache`` instead (the user's
server home, private to them), checked against the source's mtime and size as usual.

sitecustomize imports this only when BITFUSION_FILES names the folder. Like it, this may run
under any Python a user brings (3.8 and later here: ``sys.pycache_prefix``), and a failure
only leaves the usual ``__pycache__``.
"""

from __future__ import annotations

import os
import sys
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


def install(folder: str, home: str) -> None:
    prefix = os.path.join(home, CACHE)
    top = folder.rstrip("/") + "/"

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
