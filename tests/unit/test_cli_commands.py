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


def test_a_client_command_loads_nothing_of_the_gateway() -> None:
    """`bitfusion run` starts without importing the gateway's code (nor looking it up)."""
    code = (
        "import sys\n"
        "from bitfusion_jupyter import cli\n"
        "cli.build_parser('run').parse_args(['run', '-m', '1024', '--', 'true'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gateway'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_client_command_loads_no_event_loop_or_notebook_machinery() -> None:
    """What `bitfusion run` imports is what it uses: asyncio, the widget, IPython and the
    Jupyter server are for the server extension and kernels (each costs the CLI's start)."""
    code = (
        "import sys\n"
        "from bitfusion_jupyter import cli, file_server, runner, session_share\n"
        "cli.build_parser('run').parse_args(['run', '-m', '1024', '--', 'true'])\n"
        "heavy = ('asyncio', 'ipywidgets', 'IPython', 'jupyter_server', 'tornado')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
