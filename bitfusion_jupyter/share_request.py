"""The share a user asks for: `-n`, `-m`, `-p`, `--filter`, `--wait`, checked before sending."""

from __future__ import annotations

import argparse
import math

from remoting import filters
from remoting.shares import Want, WantError
from remoting.util.cli import UsageError  # the one class of a user's mistake, both sides

# The one model of a share asked for lives in remoting.shares (the gateway checks the same).
ShareRequest = Want


def _positive_int(flag: str):
    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a whole number") from None
        return value

    return read


def _number(flag: str):
    def read(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a finite number")
        return value

    return read


def add_arguments(parser: argparse.ArgumentParser, wait: bool = True) -> None:
    parser.add_argument(
        "-n",
        "--num_gpus",
        dest="num_gpus",
        type=_positive_int("-n"),
        default=1,
        metavar="N",
        help="number of GPUs, all on one server (default 1)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "-m",
        "--memory",
        dest="memory",
        type=_positive_int("-m"),
        metavar="MIB",
        help="MiB of memory on each GPU (default: whole GPUs)",
    )
    size.add_argument(
        "-p",
        "--partial",
        dest="partial",
        type=_number("-p"),
        metavar="F",
        help="fraction of each GPU's memory, 0 < F <= 1",
    )
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"only GPUs that match; keys: {', '.join(filters.KEYS)}",
    )
    if wait:
        parser.add_argument(
            "--wait",
            type=_number("--wait"),
            default=0.0,
            metavar="SECONDS",
            help="queue up to this long when nothing fits: on every server that could hold the "
            "share, taking the first to grant it (each queue is first come, first served)",
        )


def from_args(args: argparse.Namespace) -> ShareRequest:
    try:
        parsed = [filters.parse(f) for f in args.filter]
        wait = getattr(args, "wait", 0.0) or 0.0
        return Want(args.num_gpus, args.memory, args.partial, parsed, wait).validate()
    except (filters.FilterError, WantError) as exc:
        raise UsageError(str(exc)) from None
