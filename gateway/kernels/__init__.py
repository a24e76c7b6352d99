"""Jupyter kernels inside shares: which kernels the gateway offers, and one kernel's channels.

The gateway starts a kernel like any process in a share (under a nanny), with a connection
file of its own on the server's loopback but the *client's* HMAC key, so Jupyter frames are
forwarded between the client's shim and the kernel without being re-signed or re-serialised.
`KernelChannels` holds the gateway's sockets to one kernel: a DEALER per frontend identity on
shell, control and stdin (with the frontend's own identity, so the kernel routes replies and
input requests exactly as it would locally), and a SUB on iopub.

Code in every share runs as the same user on the same machine, so a kernel's channels are
kept from the other shares (`channel_kind`): unix sockets in the abstract namespace, which
Landlock lets only the kernel's own share and the gateway connect to; else loopback TCP with
a fresh CurveZMQ key pair in the connection file, which only the gateway and the kernel's
confined share can read; else, by the admin's choice or for lack of both, plain TCP.
"""

from gateway.kernels.catalogue import (
    CHANNEL_MODES,
    DEFAULT_KERNELS,
    SCOPED_UNIX_ABI,
    KernelConfigError,
    KernelEnv,
    channel_kind,
    kernels_line,
    load_kernels,
)
from gateway.kernels.channels import (
    CHANNELS,
    IOPUB_GRACE_S,
    MAX_FRONTENDS,
    KernelChannels,
    channel_info,
    write_connection_file,
)

__all__ = [
    "CHANNELS",
    "CHANNEL_MODES",
    "DEFAULT_KERNELS",
    "IOPUB_GRACE_S",
    "MAX_FRONTENDS",
    "SCOPED_UNIX_ABI",
    "KernelChannels",
    "KernelConfigError",
    "KernelEnv",
    "channel_info",
    "channel_kind",
    "kernels_line",
    "load_kernels",
    "write_connection_file",
]
