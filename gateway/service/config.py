"""The gateway's settings, as the service reads them (``cfg.<field>``).

A read-only view: `gateway.settings.GatewayApp.gateway_config` builds it from the app's
traits (defaults, config files, flags) and from what those settings name (the kernels file,
the peers file). No default is written here, so each setting has one default, the one
`bitfusion gateway --help` and the docs show; tests and the fuzzer also make it through the
app, overriding what they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.kernels import DEFAULT_KERNELS, KernelEnv
from gateway.police import PoliceMode


@dataclass(frozen=True)
class GatewayConfig:
    state_dir: Path
    bind: str
    port: int
    hostname: str
    lease_grace_s: float
    police_mode: PoliceMode
    police_grace_s: float
    police_interval_s: float
    terminate_grace_s: float
    homes_dir: Path | None  # users' homes; None: STATE_DIR/homes
    confine: bool  # False: --unconfined, said everywhere
    kernel_channels: str  # see gateway.kernels.CHANNEL_MODES
    web_port: int  # the dashboard's HTTP port; 0: none
    # What the kernels file and the peers file hold; with neither, python3 and no peers.
    kernels: dict[str, KernelEnv] = field(default_factory=lambda: dict(DEFAULT_KERNELS))
    peers: list[str] = field(default_factory=list)  # the cluster's other gateways, host:port
