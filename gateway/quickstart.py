"""`bitfusion up`: the quick start on one machine.

Starts a gateway (on the real GPUs when NVML finds any, else on a simulated pool, and says
which), gives the current user a token, records it for the client, then shows the pool with
`list_gpus` and runs a first command on a share, so a newcomer sees the whole path work.
Then it installs the kernelspec presets (user-level) and starts JupyterLab wired to the
gateway, with the "GPU pool" panel; the gateway and JupyterLab keep running in the
foreground until Ctrl-C, which stops both (JupyterLab first, so its kernels give their shares
back). `--no-lab` keeps only the gateway running; `--exit` stops after the first run.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from gateway import state_lock
from gateway.app import UsageError
from gateway.spawned import SpawnedGateway, SpawnError, free_port
from remoting.protocol import DASHBOARD_PORT, DEFAULT_PORT
from remoting.util.cli import Command

DEMO_SIMULATION = "2x16GiB"
LAB_PORT = 8888  # JupyterLab's usual port; a free one when something else has it
LAB_START_S = 120.0  # a first JupyterLab start on a slow machine takes a while


def nvml_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _bitfusion(*args: str, env: dict[str, str]) -> int:
    print(f"$ bitfusion {shlex.join(args)}", flush=True)
    return subprocess.call([sys.executable, "-m", "bitfusion_jupyter", *args], env=env)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As servers bind: connections of an earlier run left in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class JupyterLab:
    """`python -m jupyterlab` on loopback with a fresh token, logging to a file.

    It runs in its own session, so the terminal's Ctrl-C reaches only us: we then stop it
    with SIGTERM, which JupyterLab takes as "shut down the kernels and exit" (SIGINT would
    make it ask for confirmation)."""

    def __init__(
        self, port: int, env: dict[str, str], log_path: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.port = port
        self.token = secrets.token_hex(24)
        self.log_path = log_path
        with log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jupyterlab",
                    "--no-browser",
                    "--ServerApp.ip=127.0.0.1",
                    f"--ServerApp.port={port}",
                    "--ServerApp.port_retries=0",
                    f"--IdentityProvider.token={self.token}",
                    # Containers (Docker, Binder) often run the quick start as root.
                    *(["--allow-root"] if os.geteuid() == 0 else []),
                    *_encrypted_kernel_channels(),
                    *extra_args,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/lab?token={self.token}"

    def wait_ready(self, timeout: float = LAB_START_S) -> bool:
        """True once the server answers; False if it ended or took longer than ``timeout``."""
        status = f"http://127.0.0.1:{self.port}/api/status?token={self.token}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urlopen(status, timeout=2):
                    return True
            except (URLError, OSError):
                time.sleep(0.3)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _encrypted_kernel_channels() -> list[str]:
    """CurveZMQ keys for every kernel whose kernelspec takes them (ours, ipykernel 7.3+),
    where this jupyter_server can provision them (2.20+)."""
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager

    if "transport_encryption" not in MappingKernelManager.class_trait_names():
        return []
    return ["--MappingKernelManager.transport_encryption=auto"]


def _serve_lab(gateway: SpawnedGateway, env: dict[str, str], lab_port: int | None) -> int:
    """Presets, then JupyterLab until Ctrl-C (or until it or the gateway ends)."""
    _say("Installing the kernelspec presets for you (user-level).")
    _bitfusion("kernelspec", "install", "--presets", "--user", env=env)
    port = lab_port or (LAB_PORT if _port_free(LAB_PORT) else free_port())
    log_path = gateway.state_dir / "jupyterlab.log"
    _say(f"Starting JupyterLab on 127.0.0.1:{port} (it logs to {log_path}).")
    lab = JupyterLab(port, env, log_path)
    try:
        if not lab.wait_ready():
            print(lab.log_tail(), file=sys.stderr)
            raise UsageError(f"JupyterLab did not start; its log is {log_path} (last lines above).")
        _say(
            "JupyterLab is ready. Open this URL, then the GPU pool panel (the GPU icon on the "
            "left) or a 'Python 3 · … GPU' kernel in the launcher:"
        )
        print(f"\n    {lab.url}\n", flush=True)
        _say("Ctrl-C stops JupyterLab and the gateway.")
        assert gateway.proc is not None
        while True:
            if lab.proc.poll() is not None:
                _say(f"JupyterLab ended (exit code {lab.proc.returncode}); stopping the gateway.")
                return lab.proc.returncode or 0
            if gateway.proc.poll() is not None:
                _say(f"The gateway ended (exit code {gateway.proc.returncode}); see its log.")
                return gateway.proc.returncode or 1
            time.sleep(0.5)
    finally:
        # Before the gateway stops: the kernels' shims give their shares back on the way out.
        _say("Stopping JupyterLab: its kernels end and give their shares back.")
        lab.stop()


def _check_room(state_dir: Path, port: int) -> None:
    """Say what is in the way before starting, in `up`'s terms: the gateway's own message
    names options (`--bind`) that `up` does not have."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # the gateway's own: see app.py
    try:
        state_lock.hold(state_dir).close()
    except state_lock.StateInUse as exc:
        raise UsageError(str(exc)) from None
    if not _port_free(port):
        raise UsageError(
            f"Port {port} on 127.0.0.1 is taken by another program (a gateway of another "
            "--state-dir, perhaps); stop it, or pick another --port."
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(
    state_dir: Path,
    port: int,
    simulate: str | None,
    stay: bool,
    lab: bool = True,
    lab_port: int | None = None,
    web_port: int | None = None,
) -> int:
    # A closed terminal (SIGHUP) or `kill` (SIGTERM) cleans up as Ctrl-C does: JupyterLab runs
    # in its own session and would otherwise outlive us.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    _check_room(state_dir, port)
    gpus = nvml_gpu_count()
    if simulate is None and gpus == 0:
        simulate = DEMO_SIMULATION
        _say(
            f"No NVIDIA GPU found through NVML: starting a SIMULATED pool of {simulate} "
            "(a stand-in for trying things out; no real GPU is used)."
        )
    elif simulate is None:
        _say(f"NVML finds {gpus} GPU{'s' if gpus != 1 else ''}: the gateway serves the real ones.")
    args = ["--simulate-gpus", simulate] if simulate else []
    if web_port is None:
        web_port = DASHBOARD_PORT if _port_free(DASHBOARD_PORT) else free_port()
    args += ["--web-port", str(web_port)]
    _say(f"Starting the gateway on 127.0.0.1:{port} (state in {state_dir}).")
    # The gateway logs to a file, so its lines do not interleave with the walk-through.
    gateway = SpawnedGateway(
        state_dir, port, args, log_path=state_dir / "gateway.log", new_session=True
    )
    try:
        try:
            gateway.start()
        except SpawnError as exc:
            raise UsageError(str(exc)) from None
        time.sleep(0.2)  # let the banner reach the log
        banner = gateway.start_log().rstrip()
        print(banner, flush=True)  # this run's banner, not the history
        refused = [ln for ln in banner.splitlines() if "shares: REFUSED: " in ln]
        if refused:  # a quick start that could only fail at its first share: say why now
            why = refused[0].split("shares: REFUSED: ", 1)[1]
            raise UsageError(f"this machine cannot sandbox shares: {why}.")
        _say(f"The gateway logs to {gateway.log_path}.")
        _say(
            f"The cluster dashboard is at http://127.0.0.1:{web_port}/ (log in with the admin "
            f"token in {state_dir / 'admin.token'}, or any user's token)."
        )
        user = getpass.getuser()
        token = gateway.token(user)
        env = {**os.environ, "BITFUSION_SERVERS": gateway.address}
        env.pop("BITFUSION_TOKEN", None)
        _say(f"Recording a token for {user}.")  # `bitfusion init` says where
        _bitfusion("init", "--token", token, "--server", gateway.address, env=env)
        _bitfusion("list_gpus", env=env)
        # --no-files: it needs no folder, and this one is often the checkout the gateway
        # itself runs from, which a share cannot show at its own path.
        _bitfusion(
            "run", "-n", "1", "-m", "1024", "--no-files", "--", sys.executable, "-c",
            'import os; e = os.environ; print("inside share", e["BITFUSION_SHARE_ID"], "on",'
            ' e["CUDA_VISIBLE_DEVICES"], "capped at", e["BITFUSION_MEMORY_MIB"], "MiB")',
            env=env,
        )  # fmt: skip
        if not stay:
            return 0
        if lab:
            return _serve_lab(gateway, env, lab_port)
        _say(
            "The gateway is running; try 'bitfusion run -n 1 -m 2048 -- nvidia-smi' or "
            "'bitfusion smi' in another shell. Ctrl-C stops it."
        )
        assert gateway.proc is not None
        return gateway.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if gateway.proc is not None and gateway.proc.poll() is None:
            _say("Stopping the gateway.")
        gateway.stop()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--simulate-gpus",
        metavar="SPEC",
        default=None,
        help="use a simulated pool even if NVML finds GPUs",
    )
    p.add_argument("--exit", action="store_true", help="stop after the first run (for tests)")
    p.add_argument(
        "--no-lab",
        dest="lab",
        action="store_false",
        help="keep only the gateway running: no kernelspec presets, no JupyterLab",
    )
    p.add_argument(
        "--lab-port",
        type=int,
        default=None,
        metavar="PORT",
        help="JupyterLab's port (default 8888, or a free one when 8888 is taken)",
    )
    p.add_argument(
        "--web-port",
        type=int,
        default=None,
        metavar="PORT",
        help="the gateway's dashboard (default 54000, or a free one when 54000 is taken)",
    )


def _run(args: argparse.Namespace) -> int:
    from gateway.app import default_state_dir

    return run(
        args.state_dir or default_state_dir(),
        args.port,
        args.simulate_gpus,
        stay=not args.exit,
        lab=args.lab,
        lab_port=args.lab_port,
        web_port=args.web_port,
    )


COMMAND = Command(
    "quick start: a gateway on this machine, a token, a first run, JupyterLab",
    _add_arguments,
    _run,
    (UsageError,),
)
