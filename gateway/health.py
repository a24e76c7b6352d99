"""`bitfusion localhealth`: is this GPU server ready to serve? Checks NVML, driver, MPS, the
gateway's port, its state dir and disk, each with a verdict an admin can act on."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
from pathlib import Path
from typing import Any

from remoting import state_dir as layout
from remoting.protocol import DEFAULT_PORT
from remoting.util import tables
from remoting.util.cli import Command

OK, WARN, FAIL = "ok", "WARN", "FAIL"


def _nvml() -> tuple[str, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            driver = pynvml.nvmlSystemGetDriverVersion()
            names = [
                pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)
            ]
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return WARN, f"NVML unavailable ({exc}); only a simulated pool can be served here"
    if count == 0:
        return WARN, f"NVML works (driver {driver}) but finds no GPU"
    listed = ", ".join(str(n) for n in names)
    return OK, f"driver {driver}, {count} GPU{'s' if count != 1 else ''}: {listed}"


def _gateway_answers(state_dir: Path, port: int) -> tuple[tuple[str, str], dict[str, Any]]:
    """Ask the local gateway who it is, with the admin token from its state dir: the
    verdict, and its answer ({} when it gave none)."""
    token_file = state_dir / layout.ADMIN_TOKEN
    try:
        token_text = token_file.read_text().strip()
    except OSError:
        why = f"cannot read {token_file} to ask the gateway (run as the gateway's user)"
        return (WARN, why), {}
    from remoting import tokens
    from remoting.client import GatewayConnection, GatewayError

    conn = GatewayConnection(f"127.0.0.1:{port}", tokens.parse(token_text), timeout=3.0)
    try:
        info = conn.request("hello")
    except GatewayError as exc:
        return (FAIL, str(exc)), {}
    finally:
        conn.close()
    pool = "SIMULATED pool" if info["simulated"] else f"NVML, driver {info['driver']}"
    return (OK, f"{info['server']} answers, version {info['version']}, {pool}"), info


def _confinement(told: dict[str, Any] | None) -> tuple[str, str]:
    """The running gateway's own verdict; else whether a sandbox could be made here."""
    from gateway import sandbox

    if told:
        return (OK if told.get("sandboxed") else FAIL if told.get("refused") else WARN), told[
            "line"
        ]
    verdict = sandbox.check(True)
    status = OK if verdict.sandboxed else FAIL
    return status, f"{verdict.line} (judged from here: the gateway did not say)"


def _kernel_channels() -> tuple[str, str]:
    """How a python3 kernel's channels are kept from other shares, by the default mode, in
    the words of the gateway's banner."""
    from gateway import kernels, landlock

    python3, abi = kernels.DEFAULT_KERNELS["python3"], landlock.abi()
    plain = kernels.channel_kind(python3, "auto", abi) == "plain"
    return (WARN if plain else OK), kernels.kernels_line({"python3": python3}, "auto", abi)


def checks(state_dir: Path, port: int) -> list[dict[str, Any]]:
    from gateway.mps import mps_pipe_dir, mps_running

    out: list[dict[str, Any]] = []

    def add(name: str, verdict: tuple[str, str]) -> None:
        out.append({"check": name, "status": verdict[0], "detail": verdict[1]})

    add("NVML and driver", _nvml())
    add(
        "MPS daemon",
        (OK, f"running, pipes in {mps_pipe_dir()}")
        if mps_running()
        else (OK, "not running; shares are capped by the frameworks' limits and policing"),
    )
    add("kernel channels", _kernel_channels())
    with socket.socket() as s:
        s.settimeout(1.0)
        listening = s.connect_ex(("127.0.0.1", port)) == 0
    add(
        f"port {port}",
        (OK, "a gateway is listening")
        if listening
        else (FAIL, "nothing listens; start it with 'bitfusion gateway'"),
    )
    if not state_dir.is_dir():
        add("state dir", (FAIL, f"{state_dir} does not exist; the gateway makes it on start"))
    else:
        ledger = state_dir / layout.LEDGER
        add(
            "state dir",
            (OK, f"{state_dir}, ledger {'present' if ledger.exists() else 'not yet made'}"),
        )
        free = shutil.disk_usage(state_dir).free / 2**30
        add("disk", (OK if free >= 1 else WARN, f"{free:.1f} GiB free under {state_dir}"))
    told: dict[str, Any] = {}
    if listening and state_dir.is_dir():
        verdict, told = _gateway_answers(state_dir, port)
        add("gateway", verdict)
    add("share sandbox", _confinement(told.get("sandbox")))
    add("client folders", _client_folders())
    return out


def _client_folders() -> tuple[str, str]:
    """Whether a share can mount its client's folder here (what `run` and kernels carry)."""
    from gateway import sandbox

    why = sandbox.files_unavailable()
    if why:
        return WARN, f"shares cannot mount their client's folder (they work in a home here): {why}"
    return OK, "sshfs and /dev/fuse: shares can mount their client's folder"


def run(state_dir: Path, port: int, as_json: bool) -> int:
    results = checks(state_dir, port)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print(
            tables.render(
                ["CHECK", "STATUS", "DETAIL"],
                [[r["check"], r["status"], r["detail"]] for r in results],
            )
        )
    return 1 if any(r["status"] == FAIL for r in results) else 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run(args: argparse.Namespace) -> int:
    from gateway.app import default_state_dir

    return run(args.state_dir or default_state_dir(), args.port, args.json)


COMMAND = Command("on a GPU server: NVML, driver, MPS, port, state dir", _add_arguments, _run)
