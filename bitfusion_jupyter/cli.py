"""The `bitfusion` command: the pool from a client, and `bitfusion gateway` on GPU servers.

Every error a user can cause ends here as one line, ``bitfusion: <what happened and what to
do>``, and a non-zero exit status: 2 for bad usage, 1 for anything else.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable

from bitfusion_jupyter import __version__, cli_views, config, session_share, share_request
from bitfusion_jupyter.pool import Grant, Pool, say
from remoting import tokens
from remoting.client import DEFAULT_TIMEOUT_S, GatewayError
from remoting.messages import ErrorCode
from remoting.protocol import DEFAULT_PORT
from remoting.util import cli as cli_util
from remoting.util.cli import EXIT_USAGE, Command, Parser


def _server_list(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-l",
        "--server_list",
        dest="server_list",
        metavar="HOST[:PORT],...",
        help="servers to use (default: servers.conf or BITFUSION_SERVERS)",
    )


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _command(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="the command to run inside the share",
    )


def _init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", required=True, help="a token from 'bitfusion gateway token create'")
    p.add_argument("--server", metavar="HOST[:PORT]", help="a gateway to add to servers.conf")


def _view(p: argparse.ArgumentParser) -> None:
    _server_list(p)
    _json(p)


def _run(p: argparse.ArgumentParser) -> None:
    from bitfusion_jupyter import env_options

    share_request.add_arguments(p)
    _server_list(p)
    env_options.add_arguments(p)
    files = p.add_mutually_exclusive_group()
    files.add_argument(
        "--files",
        metavar="DIR",
        help="this folder of yours (default: the current one) is the command's working folder "
        "on the server, live, at the same path (served from here, confined to it)",
    )
    files.add_argument(
        "--no-files",
        action="store_true",
        help="carry no folder: the command works in your home on the server",
    )
    _command(p)


def _local(p: argparse.ArgumentParser) -> None:
    share_request.add_arguments(p)
    p.add_argument(
        "--server",
        default=os.environ.get("BITFUSION_LOCAL_SERVER", f"127.0.0.1:{DEFAULT_PORT}"),
        help="the local gateway (default %(default)s)",
    )
    _command(p)


def _request(p: argparse.ArgumentParser) -> None:
    share_request.add_arguments(p)
    _server_list(p)


def _kernelspec(p: argparse.ArgumentParser) -> None:
    from bitfusion_jupyter import kernelspec_command  # imports jupyter_client: when asked for

    kernelspec_command.add_arguments(p)


# name -> (help, the function that adds its options), in the order `--help` lists them.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": ("run a command on a share of a remote GPU server", _run),
    "local": ("on a GPU server: run a command in a share of its own GPUs", _local),
    "request_gpus": ("hold a share for the later commands of this shell", _request),
    "release_gpus": ("give back the share this shell holds", lambda p: None),
    "list_gpus": ("the pool's GPUs, their free memory and shares", _view),
    "smi": ("driver, GPU state and GPU processes on each server", _view),
    "health": ("can each server be reached, and does it accept your token", _view),
    "list_shares": ("your shares, their usage, and recent events", _view),
    "kernelspec": ("install Jupyter kernelspecs whose kernels run on a share", _kernelspec),
    "init": ("record your token and a server", _init),
}
# The GPU server's commands come from the gateway's package, through entry points; listed
# in this order, after the client's own.
SERVER_COMMANDS = ("localhealth", "gateway", "up")


def server_commands(only: str | None = None) -> dict[str, Command]:
    """The GPU-server commands installed (entry point group bitfusion.commands): loaded only
    when one is named, or for --help, so a client command never imports the gateway."""
    from importlib.metadata import entry_points

    found = {e.name: e for e in entry_points(group=cli_util.GROUP) if only in (None, e.name)}
    order = {name: i for i, name in enumerate(SERVER_COMMANDS)}
    names = sorted(found, key=lambda n: (order.get(n, len(order)), n))
    return {name: found[name].load() for name in names}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that command's (every call pays for what it builds)."""
    parser = Parser(
        prog="bitfusion",
        description="Share GPUs over the network: run commands and Jupyter kernels on a share "
        "of a remote GPU server's GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"bitfusion-jupyter {__version__}")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for a gateway to answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    for name, (text, add) in COMMANDS.items():
        if only is None or name == only:
            add(sub.add_parser(name, help=text))
    if only is None or only not in COMMANDS:
        found = server_commands(only)
        if only is not None and only not in found:
            parser.error(
                f"'{only}' is a GPU server's command, from the gateway's package, which this "
                "installation does not list; install bitfusion-jupyter with pip (a wheel or "
                "pip install -e .), not only its files"
            )
        for name, command in found.items():
            command.add_arguments(sub.add_parser(name, help=command.help))
    parser.set_defaults(_commands=sub.choices)
    return parser


def _parse(raw: list[str]) -> argparse.Namespace:
    """Like parse_args, but an unknown option is reported by the command it was given to,
    so the message points to that command's --help, not the top level's."""
    args, extra = build_parser(_command_named(raw)).parse_known_args(raw)
    if extra:
        command = args._commands[args.cmd]
        if args.cmd == "local" and extra[0] in ("-l", "--server_list"):
            command.error(
                "-l chooses among remote servers; `bitfusion local` runs on this machine's "
                "gateway, which --server HOST:PORT names"
            )
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    del args._commands
    return args


def _command_named(argv: list[str]) -> str | None:
    """The subcommand in ``argv`` (skipping top-level options), if it is a known one."""
    i = 0
    while i < len(argv):
        if argv[i] == "--timeout":
            i += 2
            continue
        if argv[i].startswith("-"):
            return None  # --help, --version, or a mistake: build everything
        if argv[i] in COMMANDS or argv[i] in SERVER_COMMANDS:
            return argv[i]
        return None
    return None


def _argv(args: argparse.Namespace) -> list[str]:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise share_request.UsageError(
            "No command given; put it after '--', e.g. bitfusion run -n 1 -m 2048 -- nvidia-smi."
        )
    return argv


def _describe_grant(grant: Grant) -> str:
    gpus = ", ".join(
        f"GPU {g['index']} {g['name']} ({g['mib']} MiB{', simulated' if g['simulated'] else ''})"
        for g in grant.share["gpus"]
    )
    return f"share {grant.share_id} on {grant.conn.address}: {gpus}"


def _refuse_other_share(current: session_share.SessionShare, args: argparse.Namespace) -> None:
    """A `run` in a shell that holds a share uses it: one that asks for another, different
    share is told so, rather than run silently in the held one."""
    gpus = current.share["gpus"]
    asked = []
    if args.num_gpus != 1 and args.num_gpus != len(gpus):
        asked.append(f"-n {args.num_gpus}")
    if args.memory is not None and any(g["mib"] != args.memory for g in gpus):
        asked.append(f"-m {args.memory}")
    if args.partial is not None:
        asked.append(f"-p {args.partial:g}")
    if args.filter:
        asked.append("--filter")
    if asked:
        sizes = ", ".join(f"GPU {g['index']} × {g['mib']} MiB" for g in gpus)
        raise share_request.UsageError(
            f"This shell holds share {current.share_id} ({sizes}) on {current.server}, not "
            f"{' '.join(asked)}; run without share options to use it, or "
            "'bitfusion release_gpus' first to ask for another."
        )


def cmd_run(args: argparse.Namespace) -> int:
    from bitfusion_jupyter import env_options, file_server
    from bitfusion_jupyter.runner import FilesPump, ProcessStream

    argv = _argv(args)
    req = share_request.from_args(args)
    env = env_options.from_args(args)
    try:
        choice = file_server.choose(os.getcwd(), args.files, args.no_files)
        if choice.note:
            say(choice.note)
    except file_server.FilesError as exc:
        raise share_request.UsageError(str(exc)) from None
    current = session_share.held_by_this_session(on_lost=say)
    if current is not None:
        _refuse_other_share(current, args)
    pool = (
        Pool.from_config(args.server_list, args.timeout)
        if current is None
        else Pool([current.server], args.timeout)
    )
    stream: ProcessStream | None = None
    try:
        if current is not None:
            grant = Grant(pool.connect(current.server), current.share, current.lease_s)
            ephemeral = False
        else:
            grant = pool.allocate(req, release_on_exit=True, on_queue=say)
            ephemeral = True
        try:
            data, folder = file_server.carried(
                lambda files: grant.conn.request(
                    "spawn",
                    share_id=grant.share_id,
                    argv=argv,
                    env={**env, "BITFUSION_CLIENT_HOST": socket.gethostname()},
                    **files,
                ),
                choice,
                say,
            )
            stream = ProcessStream(grant.conn, grant.share_id, data["proc_id"], grant.lease_s)
            if folder is not None:
                # Started once the gateway took the command (a refusal starts nothing); what
                # sshfs asks meanwhile waits in the stream until the loop runs.
                stream.files = FilesPump(grant.conn, data["proc_id"], file_server.start(folder))
                say(f"the command runs on {grant.conn.address}, in your folder {folder}.")
            return stream.run()
        finally:
            if stream is not None and stream.files is not None:
                stream.files.close()
            # A share whose lease ran out is gone already: say so now, not after a release
            # that cannot reach anyone.
            if ephemeral and not (stream and stream.lease_gone):
                grant.release(timeout=5.0)
    finally:
        pool.close()


def cmd_local(args: argparse.Namespace) -> int:
    from bitfusion_jupyter.local_run import run_local

    argv = _argv(args)
    req = share_request.from_args(args)
    pool = Pool([config.normalise(args.server)], args.timeout)
    try:
        grant = pool.allocate(req, release_on_exit=True, on_queue=say)
        try:
            return run_local(grant, grant.env, argv)
        finally:
            grant.release(timeout=5.0)
    finally:
        pool.close()


def cmd_request_gpus(args: argparse.Namespace) -> int:
    if session_share.held_by_this_session() is not None:
        raise share_request.UsageError(
            "This shell already holds a share; run 'bitfusion release_gpus' first."
        )
    req = share_request.from_args(args)
    pool = Pool.from_config(args.server_list, args.timeout)
    try:
        grant = pool.allocate(req, release_on_exit=False, on_queue=say)
        session_share.start_holder(grant.conn.address, grant.share, grant.lease_s)
        print(f"Holding {_describe_grant(grant)}.")
        print(
            "Later 'bitfusion run' commands in this shell use it; "
            "'bitfusion release_gpus' gives it back."
        )
        return 0
    finally:
        pool.close()


def cmd_release_gpus(args: argparse.Namespace) -> int:
    current = session_share.held_by_this_session()
    if current is None:
        raise share_request.UsageError(
            "This shell holds no share (request one with 'bitfusion request_gpus')."
        )
    pool = Pool([current.server], args.timeout)
    try:
        pool.connect(current.server).request("release", share_id=current.share_id)
    except GatewayError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
    finally:
        session_share.stop_holder(current)
        pool.close()
    print(f"Released share {current.share_id} on {current.server}.")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    path, added = config.init(args.token, args.server)
    tok = tokens.parse(args.token)
    print(f"Recorded the token of {tok.user}{' (admin)' if tok.admin else ''} in {path}.")
    if args.server:
        conf = config.config_dir() / "servers.conf"
        said = "Added" if added else "Kept"
        print(f"{said} {config.normalise(args.server)} {'to' if added else 'in'} {conf}.")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    if args.cmd not in COMMANDS:
        command = server_commands(args.cmd)[args.cmd]
        try:
            return command.run(args)
        except command.usage_errors as exc:
            print(f"bitfusion: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.cmd == "kernelspec":
        from bitfusion_jupyter import kernelspec_command

        return kernelspec_command.run(args)
    simple = {
        "list_gpus": cli_views.list_gpus,
        "smi": cli_views.smi,
        "health": cli_views.health,
        "list_shares": cli_views.list_shares,
    }
    if args.cmd in simple:
        pool = Pool.from_config(args.server_list, args.timeout)
        try:
            return simple[args.cmd](pool, args.json)
        finally:
            pool.close()
    handlers = {
        "run": cmd_run,
        "local": cmd_local,
        "request_gpus": cmd_request_gpus,
        "release_gpus": cmd_release_gpus,
        "init": cmd_init,
    }
    return handlers[args.cmd](args)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = _parse(raw)
    if args.timeout <= 0:
        print("bitfusion: --timeout must be more than 0 seconds.", file=sys.stderr)
        return EXIT_USAGE
    try:
        return dispatch(args)
    except share_request.UsageError as exc:
        print(f"bitfusion: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
        print(f"bitfusion: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bitfusion: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
