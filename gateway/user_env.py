"""Make a user's own Python layer: ``python -I user_env.py DIR``, inside their sandbox.

A venv at DIR on the offered interpreter, whose site-packages chain to the offered
environment's (a ``.pth`` that adds them after its own): the user's packages come first, the
offered ones stay importable, and pip installs into DIR, never into the offered environment
(pip leaves a package it finds outside DIR in place: "outside environment"). Run by
``share_prelude.sh`` with the offered interpreter; stdlib only.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

PIP = '#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n'


def make(target: Path) -> None:
    offered = [p for p in site.getsitepackages() if os.path.isdir(p)]
    # Built beside and renamed into place, so a share started meanwhile never sees half a venv.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".making-", dir=target.parent))
    venv.EnvBuilder(symlinks=True, with_pip=False).create(tmp)
    purelib = sysconfig.get_path("purelib", vars={"base": str(tmp), "platbase": str(tmp)})
    lines = [f"import site; site.addsitedir({p!r})\n" for p in offered]
    Path(purelib, "_bitfusion_offered.pth").write_text("".join(lines))
    for name in ("pip", "pip3", f"pip{sys.version_info.major}.{sys.version_info.minor}"):
        script = tmp / "bin" / name
        script.write_text(PIP)
        script.chmod(0o755)
    # The venv's own paths name the temporary folder; it is moved, so say where it ends up.
    for name in ("activate", "activate.csh", "activate.fish"):
        script = tmp / "bin" / name
        if script.exists():
            script.write_text(script.read_text().replace(str(tmp), str(target)))
    try:
        os.rename(tmp, target)
    except OSError:  # another share made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    make(Path(sys.argv[1]))
