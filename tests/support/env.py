"""Where the tests run from: this checkout, the real `bitfusion` CLI, a clean environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "bitfusion_jupyter"]


def base_env(home: Path) -> dict[str, str]:
    """This process's environment without any BITFUSION_ setting, running this checkout,
    with no system-wide servers.conf (one that cannot exist under ``home``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_")}
    env["PYTHONPATH"] = str(REPO)
    env["BITFUSION_SYSTEM_SERVERS_CONF"] = str(home / "no-system-servers.conf")
    return env
