"""The gateway's settings, as the service reads them."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from gateway.kernels import DEFAULT_KERNELS, KernelEnv
from remoting import protocol


@dataclass
class GatewayConfig:
    state_dir: Path
    bind: str = "0.0.0.0"
    port: int = protocol.DEFAULT_PORT
    hostname: str = field(default_factory=socket.gethostname)
    lease_grace_s: float = 30.0
    police_mode: str = "stop"  # or "warn"
    police_grace_s: float = 5.0
    police_interval_s: float = 1.0
    terminate_grace_s: float = 5.0
    homes_dir: Path | None = None  # users' homes on this server; None: STATE_DIR/homes
    confine: bool = True  # a bubblewrap sandbox per share; False: --unconfined, said everywhere
    kernels: dict[str, KernelEnv] = field(default_factory=lambda: dict(DEFAULT_KERNELS))
    kernel_channels: str = "auto"  # see gateway.kernels.CHANNEL_MODES
    web_port: int = 0  # the dashboard's HTTP port; 0: none
    peers: list[str] = field(default_factory=list)  # the cluster's other gateways, host:port
