"""The GPU server's `bitfusion` commands come from the gateway's package, by entry point."""

from __future__ import annotations

import subprocess
import sys

from tests.support.env import CLI


def test_help_lists_the_client_commands_then_the_servers_from_the_gateway() -> None:
    r = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    listed = [ln.split()[0] for ln in lines if ln.startswith("    ") and ln[4] != " "]
    assert listed[-3:] == ["localhealth", "gateway", "up"], r.stdout
    assert {"run", "list_gpus", "kernelspec", "init"} <= set(listed)


def test_a_server_command_runs_through_its_entry_point() -> None:
    r = subprocess.run([*CLI, "gateway", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--simulate-gpus" in r.stdout, r.stderr
    r = subprocess.run([*CLI, "up", "--lab-port", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bitfusion up" in r.stderr and "--lab-port" in r.stderr, r.stderr


def _loaded_by_run() -> set[str]:
    """The top-level modules a `bitfusion run` has loaded once its options are read (the CLI
    and what run uses: its folder, its stream, a session's held share), in a fresh interpreter."""
    code = (
        "import sys\n"
        "from bitfusion_jupyter import cli, file_server, runner, session_share\n"
        "cli.build_parser('run').parse_args(['run', '-m', '1024', '--', 'true'])\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def test_a_client_command_loads_nothing_of_the_gateway() -> None:
    """`bitfusion run` starts without importing the gateway's code (nor looking it up)."""
    assert "gateway" not in _loaded_by_run()


def test_a_client_command_loads_no_event_loop_or_notebook_machinery() -> None:
    """What `bitfusion run` imports is what it uses: asyncio, the widget, IPython and the
    Jupyter server are for the server extension and kernels (each costs the CLI's start)."""
    heavy = {"asyncio", "ipywidgets", "IPython", "jupyter_server", "tornado"}
    assert _loaded_by_run() & heavy == set()
