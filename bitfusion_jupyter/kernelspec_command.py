"""`bitfusion kernelspec install/list/remove`: the command line over bitfusion_jupyter.kernelspecs.

`install` checks what it can before writing anything: a share no server of the pool could ever
hold, a --kernel no server offers, options that --presets would ignore; a server that does not
answer is said, and the kernelspec installed anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bitfusion_jupyter import kernelspecs, share_request

# Its functions are called through the module (kernelspecs.install, ...), where tests and
# callers that replace one find it.
from bitfusion_jupyter.kernelspecs import DEFAULT_KERNEL, METADATA_KEY, PROVISIONER, PoolAnswers
from bitfusion_jupyter.share_request import UsageError
from remoting.util import tables

_TABLE = ("NAME", "DISPLAY NAME", "SHARE", "LOCATION")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernelspec_cmd", metavar="ACTION")
    sub.required = True
    inst = sub.add_parser(
        "install",
        help="install a kernelspec for a share",
        description="Install a Jupyter kernelspec whose kernels run on a share. Like "
        "'ipykernel install', it goes system-wide unless --user, --sys-prefix or --prefix "
        "says otherwise.",
    )
    share_request.add_arguments(inst)
    inst.set_defaults(num_gpus=None)  # so that --presets can tell a given -n from the default 1
    inst.add_argument(
        "-l",
        "--server_list",
        dest="server_list",
        metavar="HOST[:PORT],...",
        help="servers the kernel uses (default: whatever servers.conf says when it starts)",
    )
    inst.add_argument("--name", help="kernelspec name (default e.g. bitfusion-2gpu-4096mib)")
    inst.add_argument(
        "--no-files",
        action="store_true",
        help="its kernels leave their notebook's folder here and work in your home on the "
        "server (by default the folder is carried live to the share, at the same path)",
    )
    inst.add_argument(
        "--display-name", help="name in the launcher (default e.g. 'Python 3 · 1 GPU')"
    )
    inst.add_argument(
        "--provisioner",
        action="store_true",
        help=f"the Jupyter server takes each kernel's share ({PROVISIONER}) and the shim only "
        "forwards; needs this package installed where the Jupyter server runs (opt-in)",
    )
    inst.add_argument(
        "--kernel",
        default=DEFAULT_KERNEL,
        metavar="ENV",
        help=f"the kernel to run on the share (default {DEFAULT_KERNEL})",
    )
    inst.add_argument(
        "--presets",
        action="store_true",
        help="install four kernelspecs instead: ¼ GPU, ½ GPU, 1 GPU and 2 GPUs",
    )
    inst.add_argument(
        "--user",
        action="store_true",
        help="install for the current user (JUPYTER_DATA_DIR/kernels) instead of system-wide",
    )
    inst.add_argument(
        "--sys-prefix",
        action="store_true",
        help=f"install into this Python environment ({sys.prefix}); for conda/virtualenvs",
    )
    inst.add_argument("--prefix", metavar="DIR", help="install under DIR/share/jupyter/kernels")
    listing = sub.add_parser("list", help="the installed bitfusion kernelspecs")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    rm = sub.add_parser("remove", help="remove bitfusion kernelspecs")
    rm.add_argument("names", nargs="+", metavar="NAME", help="kernelspec names, as 'list' shows")


def run(args: argparse.Namespace) -> int:
    handlers = {"install": _cmd_install, "list": _cmd_list, "remove": _cmd_remove}
    return handlers[args.kernelspec_cmd](args)


def _cmd_install(args: argparse.Namespace) -> int:
    if args.presets:
        _refuse_with_presets(args)
    share_args = argparse.Namespace(**vars(args))
    if share_args.num_gpus is None:
        share_args.num_gpus = 1
    request = share_request.from_args(share_args)
    where: dict[str, Any] = {
        "kernel": args.kernel,
        "servers": args.server_list,
        "user": args.user,
        "sys_prefix": args.sys_prefix,
        "prefix": args.prefix,
        "files": not args.no_files,
        "provisioner": args.provisioner,
    }
    if args.provisioner and not kernelspecs.provisioner_installed():
        print(
            f"Note: {PROVISIONER} is not installed as a Jupyter kernel provisioner in this "
            "Python, and Jupyter hides kernelspecs whose provisioner it cannot find; "
            "'pip install' this package where the Jupyter server runs.",
            file=sys.stderr,
        )
    pool = kernelspecs.ask_pool(args.server_list)
    if args.kernel.strip() != DEFAULT_KERNEL:  # every gateway offers python3 by default
        _check_offered(args.kernel.strip(), pool)
    if not args.presets:
        why = kernelspecs.never_held(request, pool, say_unchecked=True)
        if why:
            raise UsageError(
                f"No server could ever hold {request.describe()}: {why}. Change -n, -m, -p "
                "or --filter ('bitfusion list_gpus' shows the GPUs)."
            )
        path = kernelspecs.install(request, name=args.name, display_name=args.display_name, **where)
        spec = json.loads((path / "kernel.json").read_text(encoding="utf-8"))
        print(f"Installed kernelspec {path.name} ({spec['display_name']}) in {path}.")
        _say_if_hidden(path)
        return 0
    rows = []
    for name, preset in kernelspecs.presets():
        # --filter, --wait, -l and --kernel apply to every preset.
        full = replace(preset, filters=request.filters, wait_s=request.wait_s)
        why = kernelspecs.never_held(full, pool, say_unchecked=True)
        if why:  # a launcher tile whose kernel can never start helps nobody
            print(f"Left out {name}: no server could ever hold {full.describe()}: {why}.")
            continue
        path = kernelspecs.install(full, name=name, display_name=None, **where)
        spec = json.loads((path / "kernel.json").read_text(encoding="utf-8"))
        share = kernelspecs.share_text(spec["metadata"][METADATA_KEY])
        rows.append([name, spec["display_name"], share, str(path)])
    if not rows:
        raise UsageError(
            "No server could ever hold any of the presets (above); change --filter, or see "
            "'bitfusion list_gpus'."
        )
    print(tables.render(_TABLE, rows))
    _say_if_hidden(Path(rows[0][3]))
    return 0


def _check_offered(kernel: str, pool: PoolAnswers) -> None:
    """Refuse a --kernel that no server offers: a typo would otherwise show only when a
    notebook's kernel fails to start. Where no server can be asked, install and say so."""
    offered = {server: data["kernels"] for server, data in pool.answered.items()}
    if any(kernel in names for names in offered.values()):
        return
    if not offered or pool.silent:
        asked = (
            "no server could be asked"
            if not offered
            else f"{', '.join(pool.silent)} did not answer"
        )
        print(
            f"Note: {asked}, so --kernel {kernel} was not checked; a kernel start will say "
            "if no server offers it ('bitfusion list_gpus' shows which servers answer).",
            file=sys.stderr,
        )
        return
    each = "; ".join(f"{server} offers {', '.join(names)}" for server, names in offered.items())
    raise UsageError(
        f"No server offers a kernel named {kernel!r} ({each}); name one of those with "
        "--kernel, or ask the admin to add it to the gateway's --kernels file."
    )


def _refuse_with_presets(args: argparse.Namespace) -> None:
    given = {
        "-n": args.num_gpus is not None,
        "-m": args.memory is not None,
        "-p": args.partial is not None,
        "--name": args.name is not None,
        "--display-name": args.display_name is not None,
    }
    clashes = [flag for flag, on in given.items() if on]
    if clashes:
        raise UsageError(
            "--presets sets the share and name of each kernelspec itself; "
            f"leave out {', '.join(clashes)}."
        )


def _say_if_hidden(path: Path) -> None:
    """Jupyter only finds kernelspecs on its path; say so rather than fail silently later."""
    dirs = {str(Path(d).resolve()) for d in kernelspecs.spec_manager().kernel_dirs}
    if str(path.parent.resolve()) not in dirs:
        print(
            f"Note: Jupyter does not look in {path.parent}; add {path.parent.parent} "
            "to JUPYTER_PATH to see this kernel.",
            file=sys.stderr,
        )


def _cmd_list(args: argparse.Namespace) -> int:
    specs = kernelspecs.installed()
    if args.json:
        print(json.dumps(specs, indent=2, ensure_ascii=False))
        return 0
    if not specs:
        print(
            "No bitfusion kernelspecs are installed; add one with 'bitfusion kernelspec install'."
        )
        return 0
    rows = [[s["name"], s["display_name"], s["share"], s["location"]] for s in specs]
    print(tables.render(_TABLE, rows))
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    for path in kernelspecs.remove(args.names):
        print(f"Removed kernelspec {path.name} from {path.parent}.")
    return 0
