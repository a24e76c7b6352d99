"""The gateway's settings, as the service reads them (``cfg.<field>``).

A read-only view: `gateway.app.GatewayApp` builds it from its traits (defaults, config files,
flags) and from what those settings name (the kernels file, the peers file). No default is
written here: a field left out when the view is made by hand (tests, the fuzzer) takes the
app's trait default, so each setting has one default, the one `bitfusion gateway --help` and
the docs show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from gateway.kernels import DEFAULT_KERNELS, KernelEnv
from gateway.police import PoliceMode


@cache
def _app_defaults() -> dict[str, Any]:
    # Imported here, not at the top: the app is the service's caller, and only a view made
    # by hand needs its defaults.
    from gateway.app import GatewayApp

    return GatewayApp().service_settings()


def _app_default(name: str) -> Any:
    """A field default taken from the app's trait of that setting."""
    return field(default_factory=lambda: _app_defaults()[name])


@dataclass(frozen=True)
class GatewayConfig:
    state_dir: Path
    bind: str = _app_default("bind")
    port: int = _app_default("port")
    hostname: str = _app_default("hostname")
    lease_grace_s: float = _app_default("lease_grace_s")
    police_mode: PoliceMode = _app_default("police_mode")
    police_grace_s: float = _app_default("police_grace_s")
    police_interval_s: float = _app_default("police_interval_s")
    terminate_grace_s: float = _app_default("terminate_grace_s")
    homes_dir: Path | None = _app_default("homes_dir")  # users' homes; None: STATE_DIR/homes
    confine: bool = _app_default("confine")  # False: --unconfined, said everywhere
    kernel_channels: str = _app_default("kernel_channels")  # see gateway.kernels.CHANNEL_MODES
    web_port: int = _app_default("web_port")  # the dashboard's HTTP port; 0: none
    # What the kernels file and the peers file hold; with neither, python3 and no peers.
    kernels: dict[str, KernelEnv] = field(default_factory=lambda: dict(DEFAULT_KERNELS))
    peers: list[str] = field(default_factory=list)  # the cluster's other gateways, host:port
