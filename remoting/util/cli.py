"""What a package gives the `bitfusion` CLI for a command of its own.

The client's CLI lists and runs the GPU-server commands (`gateway`, `localhealth`, `up`)
through the entry point group ``bitfusion.commands``, so it never imports the gateway's
code, and a client command such as `run` loads none of it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

GROUP = "bitfusion.commands"
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad option or setting; the text is one sentence that says what to do. The CLI says
    it in one line and exits 2, whichever package's command raised it."""


@dataclass(frozen=True)
class Command:
    help: str  # one line, as `bitfusion --help` lists it
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # Its mistakes of the user's: said in one line with exit status 2, like the client's own.
    usage_errors: tuple[type[Exception], ...] = (UsageError,)


class Parser(argparse.ArgumentParser):
    """argparse, except that a mistake is one line that says where to read more: the
    whole usage block buried the sentence that mattered."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {plain(message)}; see '{self.prog} --help'.\n")


def plain(message: str) -> str:
    """argparse's words for a mistake, as the user would say them."""
    named = re.match(r"argument (\S+): (.*)", message, re.S)
    if not named:
        return message
    flags, rest = named.groups()
    flag = flags.split("/")[0]  # -m, as people type it, rather than --memory
    if rest.startswith("-"):  # our own readers' sentences name the flag already
        return rest
    other = re.match(r"not allowed with argument (\S+)", rest)
    if other:
        return f"{flag} is not allowed with {other[1].split('/')[0]}"
    kind = re.match(r"invalid (int|float) value: (.*)", rest)
    if kind:
        return f"{flag} {kind[2]} is not a {'whole number' if kind[1] == 'int' else 'number'}"
    choice = re.match(r"invalid choice: ('.*?') \(choose from (.*)\)", rest)
    if choice and flag == "COMMAND":
        return f"{choice[1]} is not a bitfusion command"
    if choice:
        return f"{flag} {choice[1]} is not one of {choice[2]}"
    return f"{flag}: {rest}"
