"""`bitfusion run -e NAME[=VALUE] --env-file FILE`: the user's variables for the remote command,
as Docker's `-e` and `--env-file` give them.

Nothing of the client's environment goes by itself (its paths are not the server's); these
options name what should. `NAME` alone takes the value it has here, and is left out where it
is not set here, as with Docker. A share's own variables (CUDA_VISIBLE_DEVICES, BITFUSION_*)
and its sandbox's HOME are set by the gateway over these.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path

from bitfusion_jupyter.share_request import UsageError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="set a variable for the command (NAME alone: its value here); repeatable",
    )
    p.add_argument(
        "--env-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="read NAME=VALUE lines (or NAME alone) from FILE; '#' starts a comment line",
    )


def from_args(args: argparse.Namespace, here: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables the options ask for; files first, then each -e in order (last wins)."""
    out: dict[str, str] = {}
    for path in args.env_file:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"Cannot read --env-file {path}: {exc.strerror}.") from None
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                _take(out, line, f"line {number} of --env-file {path}", here)
    for item in args.env:
        _take(out, item, "-e", here)
    return out


def _take(out: dict[str, str], item: str, where: str, here: Mapping[str, str]) -> None:
    name, has_value, value = item.partition("=")
    if not _NAME.match(name):
        raise UsageError(
            f"{where} takes NAME or NAME=VALUE, with a NAME of letters, digits and '_', "
            f"not {item!r}."
        )
    if has_value:
        out[name] = value
    elif name in here:
        out[name] = here[name]
