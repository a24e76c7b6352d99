"""What a package gives the `bitfusion` CLI for a command of its own.

The client's CLI lists and runs the GPU-server commands (`gateway`, `localhealth`, `up`)
through the entry point group ``bitfusion.commands``, so it never imports the gateway's
code, and a client command such as `run` loads none of it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

GROUP = "bitfusion.commands"


@dataclass(frozen=True)
class Command:
    help: str  # one line, as `bitfusion --help` lists it
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # Its mistakes of the user's: said in one line with exit status 2, like the client's own.
    usage_errors: tuple[type[Exception], ...] = ()
