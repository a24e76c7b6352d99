"""`bitfusion up`: the quick start on one machine.

Starts a gateway (on the real GPUs when NVML finds any, else on a simulated pool, and says
which), gives the current user a token, records it for the client, then shows the pool with
`list_gpus` and runs a first command on a share, so a newcomer sees the whole path work.
The gateway then keeps running in the foreground until Ctrl-C.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bitfusion_jupyter import config
from bitfusion_jupyter.share_request import UsageError
from gateway.spawned import SpawnedGateway, SpawnError

DEMO_SIMULATION = "2x16GiB"


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


def run(state_dir: Path, port: int, simulate: str | None, stay: bool) -> int:
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
    _say(f"Starting the gateway on 127.0.0.1:{port} (state in {state_dir}).")
    # The gateway logs to a file, so its lines do not interleave with the walk-through.
    state_dir.mkdir(parents=True, exist_ok=True)
    gateway = SpawnedGateway(state_dir, port, args, log_path=state_dir / "gateway.log")
    try:
        try:
            gateway.start()
        except SpawnError as exc:
            raise UsageError(str(exc)) from None
        time.sleep(0.2)  # let the banner reach the log
        print(gateway.log().rstrip(), flush=True)
        _say(f"The gateway logs to {gateway.log_path}.")
        user = getpass.getuser()
        token = gateway.token(user)
        env = {**os.environ, "BITFUSION_SERVERS": gateway.address}
        env.pop("BITFUSION_TOKEN", None)
        _say(f"Recording a token for {user} in {config.config_dir()}.")
        _bitfusion("init", "--token", token, "--server", gateway.address, env=env)
        _bitfusion("list_gpus", env=env)
        _bitfusion(
            "run", "-n", "1", "-m", "1024", "--", sys.executable, "-c",
            'import os; e = os.environ; print("inside share", e["BITFUSION_SHARE_ID"], "on",'
            ' e["CUDA_VISIBLE_DEVICES"], "capped at", e["BITFUSION_MEMORY_MIB"], "MiB")',
            env=env,
        )  # fmt: skip
        if not stay:
            return 0
        _say(
            "The gateway is running; try 'bitfusion run -n 1 -m 2048 -- nvidia-smi' or "
            "'bitfusion smi' in another shell. Ctrl-C stops it."
        )
        assert gateway.proc is not None
        return gateway.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        gateway.stop()
