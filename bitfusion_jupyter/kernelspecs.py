"""Jupyter kernelspecs whose kernels run on a share: what one holds, and installing, listing
and removing them (the `bitfusion kernelspec` command is bitfusion_jupyter.kernelspec_command).

A bitfusion kernelspec starts the kernel shim (``python -m bitfusion_jupyter.shim``) with the
share options; ``metadata["bitfusion"]`` records the share, which is how `list` and `remove`
(and the Jupyter extensions) tell our kernelspecs from everyone else's. With ``--provisioner``
it also names the `bitfusion-provisioner` (``metadata["kernel_provisioner"]``), which takes the
share in the Jupyter server and hands it to the shim; the argv stays the shim's, for frontends
that ignore provisioners.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitfusion_jupyter import config
from bitfusion_jupyter.share_request import ShareRequest, UsageError
from remoting import filters as share_filters
from remoting import shares

if TYPE_CHECKING:
    from jupyter_client.kernelspec import KernelSpecManager

METADATA_KEY = "bitfusion"
PROVISIONER = "bitfusion-provisioner"  # the entry point of bitfusion_jupyter.provisioner
DEFAULT_KERNEL = "python3"
LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
_FRACTIONS = {0.25: "¼", 0.5: "½", 0.75: "¾"}
_NAME_RE = re.compile(r"[a-z0-9._-]+")  # what jupyter_client accepts (after lowercasing)
ASK_TIMEOUT_S = 3.0  # for asking the servers what they offer


def spec_manager() -> KernelSpecManager:
    # Imported here: jupyter_client costs ~0.1 s, and every `bitfusion` command imports this module.
    from jupyter_client.kernelspec import KernelSpecManager

    return KernelSpecManager()


def presets() -> list[tuple[str, ShareRequest]]:
    return [
        ("bitfusion-quarter-gpu", ShareRequest(1, fraction=0.25)),
        ("bitfusion-half-gpu", ShareRequest(1, fraction=0.5)),
        ("bitfusion-1gpu", ShareRequest(1)),
        ("bitfusion-2gpu", ShareRequest(2)),
    ]


def _number(value: float) -> str:
    """Shortest text that reads back as the same number (``:g`` alone would round 1/3)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def shim_argv(
    request: ShareRequest, kernel: str, servers: str | None, files: bool = True
) -> list[str]:
    """The kernel's command line: the shim, with options that mirror the share options."""
    argv = [
        sys.executable,
        "-m",
        "bitfusion_jupyter.shim",
        "--connection-file",
        "{connection_file}",
    ]
    argv += ["-n", str(request.gpus)]
    if request.mib is not None:
        argv += ["-m", str(request.mib)]
    elif request.fraction is not None:
        argv += ["-p", _number(request.fraction)]
    for key, op, value in request.filters:
        argv += ["--filter", f"{key}{op}{value}"]  # device.memory reads back as MiB
    if request.wait_s > 0:
        argv += ["--wait", _number(request.wait_s)]
    if servers:
        argv += ["-l", servers]
    if not files:  # else the shim carries the notebook's folder, where the kernel starts
        argv += ["--no-files"]
    return argv + ["--kernel", kernel]


def share_summary(request: ShareRequest) -> str:
    """'2 GPUs × 4 GiB', '1 GPU × ½', '1 GPU': the size of a share, as the launcher shows it."""
    gpus = f"{request.gpus} GPU{'' if request.gpus == 1 else 's'}"
    if request.mib is not None:
        size = f"{request.mib // 1024} GiB" if request.mib % 1024 == 0 else f"{request.mib} MiB"
        return f"{gpus} × {size}"
    if request.fraction is not None and request.fraction < 1:
        return f"{gpus} × {_FRACTIONS.get(request.fraction, f'{request.fraction:g} of a GPU')}"
    return gpus


NO_FILES_SUFFIX = " · no folder"  # a kernelspec whose kernels leave their notebook's folder


def display_name_for(request: ShareRequest, kernel_display: str = "Python 3") -> str:
    return f"{kernel_display} · {share_summary(request)}"


def default_name(request: ShareRequest) -> str:
    name = f"bitfusion-{request.gpus}gpu"
    if request.mib is not None:
        name += f"-{request.mib}mib"
    elif request.fraction is not None:
        name += f"-p{request.fraction * 100:g}"
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())


def _kernel_display(kernel: str) -> str:
    return "Python 3" if kernel == DEFAULT_KERNEL else kernel


def provisioner_config(
    request: ShareRequest, kernel: str, servers: str | None, files: bool = True
) -> dict[str, Any]:
    """The `bitfusion-provisioner`'s traits for ``request``: the shim's options in words,
    filters as --filter takes them (what someone editing kernel.json would write)."""
    return {
        "gpus": request.gpus,
        "mib": request.mib,
        "fraction": request.fraction,
        "filters": [f"{key}{op}{value}" for key, op, value in request.filters],
        "wait_s": request.wait_s,
        "servers": servers,
        "kernel": kernel,
        "files": files,
    }


def kernel_json(
    request: ShareRequest,
    *,
    kernel: str,
    servers: str | None,
    display_name: str,
    files: bool = True,
    provisioner: bool = False,
) -> dict[str, Any]:
    """``provisioner``: the share is taken by the `bitfusion-provisioner` (opt-in for now: a
    kernelspec that names a provisioner is hidden where its entry point is not installed)."""
    spec: dict[str, Any] = {
        "argv": shim_argv(request, kernel, servers, files),
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",  # the shim forwards SIGINT to the remote kernel
        "metadata": {
            # The shim takes CurveZMQ keys from its connection file, as ipykernel does.
            "supported_encryption": ["curve"],
            METADATA_KEY: {
                "gpus": request.gpus,
                "mib": request.mib,
                "fraction": request.fraction,
                "filters": request.filters,
                "wait_s": request.wait_s,
                "kernel": kernel,
                "servers": servers,
                "files": files,
            },
            "debugger": False,
        },
    }
    if provisioner:
        spec["metadata"]["kernel_provisioner"] = {
            "provisioner_name": PROVISIONER,
            "config": provisioner_config(request, kernel, servers, files),
        }
    return spec


def _check_name(name: str) -> str:
    low = name.lower()  # jupyter_client lowercases names itself; say the name it will have
    if not _NAME_RE.fullmatch(low):
        raise UsageError(
            f"--name {name!r} cannot name a kernelspec; use letters, digits, '.', '_' and '-', "
            "e.g. --name bitfusion-a100."
        )
    return low


def _check_servers(servers: str | None) -> str | None:
    """The -l list in its normal form; a typo here would otherwise surface only at kernel start."""
    if servers is None:
        return None
    try:
        found = config.servers(servers).servers if servers.strip(", ") else []
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not found:
        raise UsageError(
            f"-l {servers!r} names no server; give HOST[:PORT],... e.g. -l gpu1:56001."
        )
    return ",".join(found)


def _place(user: bool, sys_prefix: bool, prefix: str | None) -> str | None:
    """The prefix to install under (None: user dir or system-wide), from the location flags."""
    chosen = [flag for flag, on in (("--user", user), ("--sys-prefix", sys_prefix)) if on]
    chosen += ["--prefix"] if prefix is not None else []
    if len(chosen) > 1:
        raise UsageError(
            f"{' and '.join(chosen)} name different places to install; give only one of them."
        )
    if prefix is not None and not prefix.strip():
        # jupyter_client would read an empty prefix as "system-wide".
        raise UsageError("--prefix is empty; give a directory, e.g. --prefix ~/envs/ml.")
    return sys.prefix if sys_prefix else prefix


def _spec_of(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The bitfusion metadata of a get_all_specs() entry, or None for other kernelspecs."""
    meta = (entry.get("spec") or {}).get("metadata") or {}
    found = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    return found if isinstance(found, dict) else None


def install(
    request: ShareRequest,
    *,
    name: str | None,
    display_name: str | None,
    kernel: str,
    servers: str | None,
    user: bool,
    sys_prefix: bool,
    prefix: str | None = None,
    files: bool = True,
    provisioner: bool = False,
) -> Path:
    """Write a kernelspec for ``request``; returns its directory. Replaces a bitfusion one.
    ``files``: its kernels work in their notebook's folder, carried to the share.
    ``provisioner``: the `bitfusion-provisioner` takes their share (see kernel_json)."""
    prefix = _place(user, sys_prefix, prefix)
    kernel = kernel.strip()
    if not kernel:
        raise UsageError("--kernel is empty; name the kernel to run on the share, e.g. python3.")
    servers = _check_servers(servers)
    if name is None:  # beside the same share without the folder, not over it
        name = default_name(request) + ("" if files else "-nofiles")
    else:
        name = _check_name(name)
    manager = spec_manager()
    existing = manager.get_all_specs().get(name)
    if existing is not None and _spec_of(existing) is None:
        # Writing it would hide (or replace) someone's ordinary kernel of that name.
        raise UsageError(
            f"{name!r} is already a kernelspec that is not a bitfusion one "
            f"({existing['resource_dir']}); pick another --name."
        )
    spec = kernel_json(
        request,
        kernel=kernel,
        servers=servers,
        display_name=display_name
        or display_name_for(request, _kernel_display(kernel)) + ("" if files else NO_FILES_SUFFIX),
        files=files,
        provisioner=provisioner,
    )
    logos = resources.files("bitfusion_jupyter") / "resources"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        source.mkdir()
        text = json.dumps(spec, indent=1, ensure_ascii=False) + "\n"
        (source / "kernel.json").write_text(text, encoding="utf-8")
        for logo in LOGOS:
            (source / logo).write_bytes((logos / logo).read_bytes())
        try:
            return Path(manager.install_kernel_spec(str(source), name, user=user, prefix=prefix))
        except PermissionError as exc:
            raise UsageError(
                f"No permission to write {exc.filename or 'the kernelspec'}; add --user "
                "(or --sys-prefix for this Python environment), or run as root."
            ) from None


def installed() -> list[dict[str, Any]]:
    """Every installed bitfusion kernelspec, by name."""
    out = []
    for name, entry in sorted(spec_manager().get_all_specs().items()):
        meta = _spec_of(entry)
        if meta is not None:
            # Its command line says what its kernels do with their folder, whatever an
            # older install wrote beside it.
            meta = {**meta, "files": "--no-files" not in entry["spec"].get("argv", [])}
            out.append(
                {
                    "name": name,
                    "display_name": entry["spec"].get("display_name", ""),
                    "share": share_text(meta),
                    "location": entry["resource_dir"],
                    METADATA_KEY: meta,
                    "provisioner": _provisioner_of(entry),
                }
            )
    return out


def provisioner_installed() -> bool:
    """Whether jupyter_client finds the bitfusion-provisioner here: its entry point exists
    only where the package is installed, not where it is only on PYTHONPATH."""
    from importlib.metadata import entry_points

    return bool(entry_points(group="jupyter_client.kernel_provisioners", name=PROVISIONER))


def _provisioner_of(entry: dict[str, Any]) -> str | None:
    """The provisioner a kernelspec names, if any (None: the shim takes the share)."""
    meta = entry["spec"].get("metadata") or {}
    named = meta.get("kernel_provisioner") if isinstance(meta, dict) else None
    return named.get("provisioner_name") if isinstance(named, dict) else None


def share_text(meta: dict[str, Any]) -> str:
    """SHARE column: the size, then filters, queueing and servers when there are any."""
    try:
        request = ShareRequest(
            int(meta.get("gpus") or 1),
            meta.get("mib"),
            meta.get("fraction"),
            list(meta.get("filters") or []),
            float(meta.get("wait_s") or 0),
        )
        parts = [share_summary(request)]
        if request.filters:
            parts.append(share_filters.describe(request.filters))
        if request.wait_s > 0:
            parts.append(f"wait {request.wait_s:g} s")
    except (TypeError, ValueError):
        return "?"  # hand-edited metadata: still list it, so that it can be removed
    if meta.get("servers"):
        parts.append(f"on {meta['servers']}")
    return ", ".join(parts)


def remove(names: list[str]) -> list[Path]:
    """Remove bitfusion kernelspecs; checks every name before removing any."""
    wanted = list(dict.fromkeys(n.lower() for n in names))
    manager = spec_manager()
    specs = manager.get_all_specs()
    for name in wanted:
        if name not in specs:
            raise UsageError(
                f"No kernelspec is named {name!r}; 'bitfusion kernelspec list' shows ours."
            )
        if _spec_of(specs[name]) is None:
            raise UsageError(
                f"{name!r} is not a bitfusion kernelspec; remove it with "
                f"'jupyter kernelspec remove {name}' if you mean to."
            )
    try:
        return [Path(manager.remove_kernel_spec(name)) for name in wanted]
    except PermissionError as exc:
        raise UsageError(
            f"No permission to remove {exc.filename}; run as its owner or root."
        ) from None


@dataclass
class PoolAnswers:
    """What the configured servers said to `list_gpus`, asked once for every check."""

    answered: dict[str, dict[str, Any]] = field(default_factory=dict)
    silent: list[str] = field(default_factory=list)  # unreachable, or refused our token


def ask_pool(server_list: str | None) -> PoolAnswers:
    """Ask every configured server at once (nothing where none is configured)."""
    from bitfusion_jupyter.pool import Pool  # imports pyzmq: only when installing

    try:
        pool = Pool.from_config(server_list, timeout=ASK_TIMEOUT_S)
    except config.ConfigError:
        return PoolAnswers()
    try:
        answers = pool.ask_all("list_gpus")
    except config.ConfigError:  # servers, but no token yet: an admin installing for users
        return PoolAnswers()
    finally:
        pool.close()
    found = PoolAnswers()
    for server, data in answers:
        if isinstance(data, dict):
            found.answered[server] = data
        else:
            found.silent.append(server)
    return found


def never_held(request: ShareRequest, pool: PoolAnswers, say_unchecked: bool = False) -> str | None:
    """Why no server could ever hold ``request``, by each server's own rule (the gateway's
    never_fits over the GPUs it listed); None if one could, if none answered, or if one that
    did not answer might (``say_unchecked``: then say so on stderr)."""
    whys = shares.never_held(request, pool.answered)
    if whys and pool.silent:
        if say_unchecked:
            print(
                f"Note: no server that answered could ever hold {request.describe()}, and "
                f"{', '.join(pool.silent)} did not answer; installed anyway.",
                file=sys.stderr,
            )
        return None
    return "; ".join(f"on {server}, {why}" for server, why in whys.items()) or None
