"""binder/start, as repo2docker runs it at container start: a gateway on a simulated pool in
the background, a token recorded for the user, then the command it was given (Jupyter on
Binder; here the CLI and the tour notebook)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from gateway.spawned import free_port, stop_leftovers
from tests.support.env import REPO, base_env


def test_binder_start_runs_a_simulated_pool_for_the_command_it_wraps(tmp_path):
    state = tmp_path / "state"
    env = {
        **base_env(tmp_path),
        "HOME": str(tmp_path),
        "BITFUSION_CONFIG_DIR": str(tmp_path / "cfg"),
        "BITFUSION_STATE_DIR": str(state),
        "BITFUSION_PORT": str(free_port()),
        "BITFUSION_WEB_PORT": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    env.pop("BITFUSION_SERVERS", None)
    code = (
        "import subprocess, sys\n"
        "import nbformat\n"
        "from nbclient import NotebookClient\n"
        "run = [sys.executable, '-m', 'bitfusion_jupyter']\n"
        "subprocess.run(run + ['list_gpus'], check=True)\n"
        "nb = nbformat.read('examples/tour.ipynb', as_version=4)\n"
        "NotebookClient(nb, timeout=120, kernel_name='python3').execute()\n"
        "print('TOUR OK')\n"
    )
    try:
        r = subprocess.run(
            [str(REPO / "binder" / "start"), sys.executable, "-c", code],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "a SIMULATED pool (2 x 16 GiB, no real GPU) is running" in r.stdout
        assert "SIMULATED" in r.stdout.split("is running")[1]  # list_gpus through the token
        assert "TOUR OK" in r.stdout
        assert (tmp_path / "cfg" / "client.json").exists()
    finally:
        pid_file = state / "gateway.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop_leftovers(state)
