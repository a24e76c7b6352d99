"""The `%bitfusion` magic: move this notebook's kernel onto a share, between shares, or back.

- In a local kernel, `%bitfusion -n 2 -m 4096` takes the share here (so a refusal leaves the
  kernel as it was), says where the kernel goes, lets the cell finish, then turns this kernel
  process into the kernel shim (`exec`, same pid and same ports, so the notebook's Jupyter
  server keeps talking to it) and the shim starts the new kernel inside the share.
- In a kernel that runs on a share, the magic asks its shim, through a marked stdin request
  the shim answers itself, to move to another share or (`--local`) back to this machine.
  After `--local` the shim stays, in front of a local kernel it started, and moves that
  one the same way.
- With no arguments it shows this kernel's share: a line of text and the live widget.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from bitfusion_jupyter import share_request
from bitfusion_jupyter.kernel_backends import UNDER_SHIM_ENV
from bitfusion_jupyter.move import ADOPT_ENV, SHIM_REQUEST, announce
from remoting import share_env as names

EXEC_DELAY_S = 0.5  # lets the cell's reply and idle status leave before the exec


def in_share() -> bool:
    return bool(os.environ.get(names.KERNEL_ID))


def under_shim() -> bool:
    """True in the local kernel a shim runs after `%bitfusion --local`: the shim moves it."""
    return os.environ.get(UNDER_SHIM_ENV) == "1"


def share_status() -> str:
    """What this kernel runs on, from the variables its share gave it."""
    if not in_share():
        return (
            "This kernel runs locally, on no share. `%bitfusion -n 1 -m 2048` moves it onto "
            "a share of the pool."
        )
    env = os.environ
    indices = env.get(names.GPU_INDICES, "").split(",")
    mibs = env.get(names.MEMORY_MIB, "").split(",")
    totals = env.get(names.GPU_MEMORY_TOTAL_MIB, "").split(",")
    sim = " (SIMULATED)" if env.get(names.SIMULATED) == "1" else ""
    lines = [
        f"This kernel runs in share {env.get(names.SHARE_ID)} on {env.get(names.SERVER)}{sim}:"
    ]
    for index, mib, total in zip(indices, mibs, totals, strict=False):
        lines.append(f"  GPU {index}: {mib} MiB of {total} MiB")
    return "\n".join(lines)


def show_share() -> None:
    """This kernel's share in a line of text, then the live widget (of the share or the pool).

    The text stays for frontends that draw no widgets (nbconvert, papermill, consoles).
    """
    print(share_status(), flush=True)
    try:
        import ipywidgets  # noqa: F401
        from IPython.core.getipython import get_ipython
    except ImportError:
        return
    if getattr(get_ipython(), "kernel", None) is None:  # a terminal IPython draws no widgets
        return
    from bitfusion_jupyter.live_widget import widget

    widget()


def _restore_std_fds() -> None:
    # ipykernel points fds 1 and 2 at pipes read by its own threads; those threads do not
    # survive an exec, so give the fds back to where they went before (the server's log).
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "_original_stdstream_copy", None) is not None:
            try:
                stream.close()
            except Exception:
                pass


def _become_shim(connection_file: str, adopt: dict[str, Any]) -> None:
    _restore_std_fds()
    from jupyter_client.jsonutil import json_default  # headers hold datetimes

    env = {**os.environ, ADOPT_ENV: json.dumps(adopt, default=json_default)}
    argv = [
        sys.executable,
        "-m",
        "bitfusion_jupyter.shim",
        "--connection-file",
        connection_file,
        "--kernel",
        adopt["kernel"],
        *(["--files", adopt["files"]] if adopt.get("files") else []),
        *(["--no-files"] if adopt.get("no_files") else []),
    ]
    os.execve(sys.executable, argv, env)


def _move_when_cell_ends(shell: Any, connection_file: str, adopt: dict[str, Any]) -> None:
    """Become the shim once this cell's reply and idle status are out (EXEC_DELAY_S).

    The frontend's requests that come meanwhile are not run here but kept and handed to the
    shim, which replays them to the new kernel: the next cells, which JupyterLab's Run All
    has already sent and nbclient sends the moment this one ends, run there instead of being
    lost with this process. ipykernel 7 (a dependency) looks up `dispatch_shell` for each
    message, so replacing it keeps every one.
    """
    kernel = shell.kernel
    guard = threading.Lock()  # the move waits for a request being kept
    kept: list[dict[str, Any]] = []

    def move() -> None:
        with guard:
            _become_shim(connection_file, {**adopt, "replay": kept})

    async def keep_request(frames: list[Any], *_args: Any, **_kwargs: Any) -> None:
        ident, rest = kernel.session.feed_identities(frames, copy=False)
        msg = kernel.session.deserialize(rest, copy=False)
        with guard:
            kept.append(
                {
                    "ident": [bytes(i).hex() for i in ident],
                    "msg": {k: msg[k] for k in ("header", "parent_header", "metadata", "content")},
                }
            )

    kernel.dispatch_shell = keep_request
    timer = threading.Timer(EXEC_DELAY_S, move)
    timer.daemon = True
    timer.start()


@magics_class
class BitfusionMagics(Magics):
    @magic_arguments()
    @argument(
        "-n",
        "--num_gpus",
        dest="num_gpus",
        type=int,
        default=None,
        help="number of GPUs, all on one server",
    )
    @argument("-m", "--memory", dest="memory", type=int, default=None, help="MiB on each GPU")
    @argument(
        "-p",
        "--partial",
        dest="partial",
        type=float,
        default=None,
        help="fraction of each GPU's memory, 0 < F <= 1",
    )
    @argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only GPUs that match (device.name, device.memory, server.hostname)",
    )
    @argument(
        "-l",
        "--server_list",
        dest="server_list",
        default=None,
        help="servers to ask (default: servers.conf)",
    )
    @argument("--wait", type=float, default=0.0, help="queue up to SECONDS for room")
    @argument("--kernel", default="python3", help="the gateway's kernel environment")
    @argument("--local", action="store_true", help="move back to a local kernel")
    @argument(
        "--files",
        metavar="DIR",
        default=None,
        help="this folder of the notebook's machine (default, or . : the kernel's) is the "
        "kernel's working folder on the share, at the same path",
    )
    @argument(
        "--no-files",
        action="store_true",
        help="carry no folder: the kernel works in your home on the server",
    )
    @line_magic
    def bitfusion(self, line: str) -> None:
        """Run this notebook's kernel on a share of the GPU pool.

        %bitfusion -n 2 -m 4096   move the kernel onto 2 GPUs with 4096 MiB each
        %bitfusion -p 0.5         half of one GPU's memory
        %bitfusion --local        back to a kernel on this machine
        %bitfusion                show this kernel's share

        Moving restarts the kernel: its variables are reset.
        """
        args = parse_argstring(self.bitfusion, line)
        sizing = args.num_gpus is not None or args.memory is not None or args.partial is not None
        if not sizing and not args.filter and not args.local:
            show_share()
            return
        if args.local:
            if not in_share():
                print("This kernel already runs locally.")
                return
            self._ask_shim({"action": "local"})
            return
        if args.memory is not None and args.partial is not None:
            print("bitfusion: give -m or -p, not both.", file=sys.stderr)
            return
        ns = _namespace(args)
        try:
            req = share_request.from_args(ns)
        except share_request.UsageError as exc:
            print(f"bitfusion: {exc}", file=sys.stderr)
            return
        if args.files is not None and args.no_files:
            print("bitfusion: give --files or --no-files, not both.", file=sys.stderr)
            return
        if in_share() or under_shim():
            # The shim, on the notebook's machine, reads --files there.
            self._ask_shim(
                {
                    "action": "move",
                    "request": req.wire(),
                    "wait_s": req.wait_s,
                    "servers": args.server_list,
                    "kernel": args.kernel,
                    "files": args.files,
                    "no_files": args.no_files,
                }
            )
        else:
            self._move_local_kernel(req, args.server_list, args.kernel, args.files, args.no_files)

    def _move_local_kernel(
        self,
        req: share_request.ShareRequest,
        servers: str | None,
        kernel: str,
        files: str | None,
        no_files: bool,
    ) -> None:
        from ipykernel.connect import get_connection_file

        from bitfusion_jupyter import config, file_server
        from bitfusion_jupyter.pool import Pool
        from remoting import tokens
        from remoting.client import GatewayError

        try:  # this kernel runs on the notebook's machine: its folder is read here
            choice = file_server.choose(os.getcwd(), files, no_files, hint=file_server.KERNEL_HINT)
            folder = choice.folder
            if choice.note:
                print(f"bitfusion: {choice.note}", file=sys.stderr)
        except file_server.FilesError as exc:
            print(f"bitfusion: {exc} The kernel stays as it was.", file=sys.stderr)
            return
        pool = None
        try:
            pool = Pool.from_config(servers)
            grant = pool.allocate(req, release_on_exit=True, on_queue=print)
        except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
            print(f"bitfusion: {exc} The kernel stays as it was.", file=sys.stderr)
            return
        finally:
            if pool is not None:
                pool.close()
        print(announce(grant, kernel, folder), flush=True)
        adopt = {
            "server": grant.conn.address,
            "share": grant.share,
            "lease_s": grant.lease_s,
            "env": grant.env,
            "kernel": kernel,
            "files": files,  # the shim, in this same folder, chooses as this did
            "no_files": no_files,
        }
        _move_when_cell_ends(self.shell, get_connection_file(), adopt)

    def _ask_shim(self, request: dict[str, Any]) -> None:
        kernel = self.shell.kernel  # type: ignore[union-attr]  # a kernel's shell has one
        answer = kernel._input_request(
            SHIM_REQUEST + json.dumps(request),
            kernel._get_shell_context_var(kernel._shell_parent_ident),
            kernel.get_parent("shell"),
            password=False,
        )
        try:
            reply = json.loads(answer)
        except ValueError:
            print(
                "bitfusion: this kernel's shim did not understand the request; is it an "
                "older version?",
                file=sys.stderr,
            )
            return
        if reply.get("ok"):
            print(reply["message"], flush=True)
        else:
            print(f"bitfusion: {reply.get('error')} The kernel stays as it was.", file=sys.stderr)


def _namespace(args: Any) -> Any:
    """The magic's options in the shape share_request.from_args reads."""
    import argparse

    return argparse.Namespace(
        num_gpus=1 if args.num_gpus is None else args.num_gpus,
        memory=args.memory,
        partial=args.partial,
        filter=args.filter,
        wait=args.wait,
    )


def load(ipython: Any) -> None:
    ipython.register_magics(BitfusionMagics)
