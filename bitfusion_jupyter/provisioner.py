"""`bitfusion-provisioner`: a jupyter_client kernel provisioner that holds the kernel's share.

A bitfusion kernelspec starts the kernel shim, which takes a share and forwards the kernel's
channels to it. With this provisioner (opt-in: `bitfusion kernelspec install --provisioner`)
the Jupyter server takes the share itself, before the shim starts (``pre_launch``), and hands
it to the shim as the %bitfusion magic does (``ADOPT_ENV``), so the shim only forwards. The
provisioner renews the share's lease while the shim lives, gives it back in ``cleanup`` (a
restart keeps it: the shim stops only its kernel, and the next one starts there again), and
tells the server which share its kernel holds from the moment it is granted
(``share``, ``get_provisioner_info``), not only once the shim has written its sidecar file.

A share that cannot be had (no room, no server configured, a token the gateway refuses)
stops the kernel start with one sentence (`ShareError`), where the shim would say it on its
stderr and die.

The kernelspec keeps the shim's argv, so frontends that ignore provisioners still start its
kernels (the shim then takes the share itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from tornado import web
from traitlets import Bool, Float, Int, List, Unicode, Union

from bitfusion_jupyter import config
from bitfusion_jupyter.kernel_backends import KERNEL_START_TIMEOUT_S
from bitfusion_jupyter.move import ADOPT_ENV
from bitfusion_jupyter.pool import Grant, Pool
from bitfusion_jupyter.share_request import ShareRequest, UsageError, from_args
from remoting import protocol, tokens
from remoting.client import GatewayError
from remoting.messages import ErrorCode

NAME = "bitfusion-provisioner"  # its entry point in jupyter_client.kernel_provisioners
SHIM_MODULE = "bitfusion_jupyter.shim"
RELEASE_TIMEOUT_S = 3.0  # as the shim's: an unreachable gateway frees it when the lease ends


class ShareError(web.HTTPError):
    """The kernel's share could not be had; ``str()`` is one sentence for the user.

    A tornado HTTPError because that is how a provisioner's refusal reaches a frontend as
    text: jupyter_server answers the start request with its message (any other exception
    becomes "Unhandled error"), as Jupyter Enterprise Gateway's remote launchers do.
    """

    def __init__(self, sentence: str, status: int = 503) -> None:
        super().__init__(status, sentence, reason="No GPU share")
        self.sentence = sentence

    def __str__(self) -> str:
        return self.sentence


class _Lease:
    """A granted share, renewed on a thread of its own until it is given back or gone.

    The gateway frees a share whose lease nobody renews (30 s by default), and the shim
    renews it only once it has started; this keeps it from the grant on. One lock orders
    the renewals and the release on the connection's socket, which is used from more than
    one thread (the grant's, this one, cleanup's).
    """

    def __init__(self, pool: Pool, grant: Grant) -> None:
        self.pool: Pool | None = pool  # None once released
        self.grant = grant
        self.since = time.time()
        self.gone = False  # released, or the gateway no longer knows it
        self.kernel_alive: Callable[[], bool] = lambda: True
        self.await_kernel()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew, name=f"bitfusion-lease-{grant.share_id}", daemon=True
        )
        self._thread.start()

    def await_kernel(self) -> None:
        """Until a shim is there to hand it to, the share waits this long for one (a start
        that failed between the grant and the launch never calls cleanup)."""
        since = time.monotonic()
        self.kernel_alive = lambda: time.monotonic() - since < KERNEL_START_TIMEOUT_S

    def handover(self) -> dict[str, Any]:
        """What ADOPT_ENV carries to the shim (the fields the magic's hand-over has)."""
        return {
            "server": self.grant.conn.address,
            "share": self.grant.share,
            "lease_s": self.grant.lease_s,
            "env": self.grant.env,
            "keep": True,  # the shim ends its kernel, not the share: this gives it back
        }

    def _renew(self) -> None:
        every = protocol.renew_every(self.grant.lease_s)
        while not self._stop.wait(every):
            if not self.kernel_alive():
                # The shim ended and no restart took the share over (cleanup was not called,
                # e.g. the server process died): give it back rather than hold it for nobody.
                self.release(RELEASE_TIMEOUT_S)
                return
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.grant.conn.request("renew", share_id=self.grant.share_id, timeout=every)
                except GatewayError as exc:
                    if exc.code != ErrorCode.UNREACHABLE:
                        # Given back by the shim (%bitfusion moved the kernel) or expired.
                        self.gone = True
                        return

    def release(self, timeout: float) -> None:
        """Give the share back and close the connection; once (later calls do nothing)."""
        self._stop.set()
        with self._lock:
            if self.pool is None:
                return
            if not self.gone:
                self.grant.release(timeout)  # "not found" after the shim released it: fine
            self.gone = True
            self.pool.close()
            self.pool = None


class BitfusionProvisioner(LocalProvisioner):
    """Starts the kernel shim as LocalProvisioner does, on a share this provisioner holds.

    Configured by the kernelspec's ``metadata.kernel_provisioner.config`` (see
    ``kernelspecs.provisioner_config``), with the shim's option names in words.
    """

    gpus = Int(1, config=True, help="GPUs of the share, all on one server (-n)")
    mib = Int(None, allow_none=True, config=True, help="MiB on each GPU (-m); None: whole")
    fraction = Float(None, allow_none=True, config=True, help="fraction of each GPU's memory (-p)")
    filters = List(
        Union([Unicode(), List()]),
        config=True,
        help="only GPUs that match, as --filter takes them ('device.name=A100') or as sent "
        "on the wire (['device.name', '=', 'A100'])",
    )
    wait_s = Float(0.0, config=True, help="queue up to this long when nothing fits (--wait)")
    servers = Unicode(
        None, allow_none=True, config=True, help="HOST[:PORT],... (-l); None: servers.conf"
    )
    kernel = Unicode("python3", config=True, help="the gateway's kernel environment (--kernel)")
    files = Union(
        [Bool(), Unicode()],
        default_value=True,
        config=True,
        help="the folder the kernel works in on the share: true for its notebook's (the "
        "default), false for none (--no-files), or a path (--files DIR)",
    )

    _lease: _Lease | None = None
    _shim_exit: int | None = None  # how the last shim ended (LocalProvisioner forgets it)

    # --- the share ------------------------------------------------------------------------
    def share_request(self) -> ShareRequest:
        """The share this config asks for, checked as the shim checks its options."""
        args = argparse.Namespace(
            num_gpus=self.gpus,
            memory=self.mib,
            partial=self.fraction,
            filter=[f if isinstance(f, str) else "".join(map(str, f)) for f in self.filters],
            wait=self.wait_s,
        )
        try:
            return from_args(args)
        except UsageError as exc:
            raise ShareError(f"The kernelspec's provisioner config: {exc}", 400) from None

    def _allocate(self, request: ShareRequest) -> _Lease:
        """Take the share, with the pool code the shim and the magic use (queueing too)."""
        pool: Pool | None = None
        try:
            pool = Pool.from_config(self.servers)
            grant = pool.allocate(request, release_on_exit=True, on_queue=self.log.info)
        except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
            if pool is not None:
                pool.close()
            status = 403 if getattr(exc, "code", None) == protocol.E_AUTH else 503
            raise ShareError(str(exc), status) from None
        return _Lease(pool, grant)

    @property
    def share(self) -> dict[str, Any] | None:
        """The share this kernel holds, in the fields of the shim's sidecar file, from its
        grant on; None before that, once given back, or once the kernel left it (the shim
        gave it back for another share or for a local kernel)."""
        lease = self._lease
        if lease is None or lease.gone:
            return None
        share = lease.grant.share
        return {
            "server": lease.grant.conn.address,
            "share_id": share["share_id"],
            "kernel": self.kernel,
            "since": lease.since,
            "lease_s": lease.grant.lease_s,
            "gpus": [
                {k: g[k] for k in ("index", "name", "uuid", "mib", "simulated")}
                for g in share["gpus"]
            ],
        }

    async def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await asyncio.to_thread(lease.release, RELEASE_TIMEOUT_S)

    # --- the provisioner's life cycle -----------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Take the share, then let LocalProvisioner prepare the shim's command (ports, keys,
        connection file), with the share in its environment and the options of this config.

        Called from `KernelManager.pre_start_kernel()`, on every start and restart.
        """
        if SHIM_MODULE not in self.kernel_spec.argv:
            # Nothing else would adopt the share: refuse before taking one.
            raise ShareError(
                f"The kernelspec's argv does not start the bitfusion kernel shim, which "
                f"{NAME} hands its share to; install it with 'bitfusion kernelspec install "
                "--provisioner'.",
                500,
            )
        request = self.share_request()
        if self._lease is not None and self._lease.gone:
            await self._release()
        if self._lease is None:  # else a restart: the kernel starts again on the same share
            self._lease = await asyncio.to_thread(self._allocate, request)
        handover = json.dumps(self._lease.handover())
        kwargs["env"] = {**(kwargs.get("env") or os.environ), ADOPT_ENV: handover}
        try:
            kwargs = await super().pre_launch(**kwargs)
        except BaseException:
            await self._release()
            raise
        kwargs["cmd"] = shim_command(kwargs["cmd"], self.kernel, self.files, self.servers)
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the shim; the share is renewed while that process lives."""
        info = await super().launch_kernel(cmd, **kwargs)
        self._shim_exit = None
        process, lease = self.process, self._lease
        if lease is not None and process is not None:
            lease.kernel_alive = lambda: process.poll() is None
        return info

    async def cleanup(self, restart: bool = False) -> None:
        """Give the share back, unless the kernel restarts: then it keeps its share.

        Called from `KernelManager.cleanup_resources()` after the shim ended. A shim that
        ended by itself has stopped its kernel on the share; one that was killed (a restart
        with ``now=True``, or a kernel that would not stop) may have left it running there,
        and only giving the share back ends it, so the restart then takes a fresh share.
        """
        ended_well = self._shim_exit == 0
        await super().cleanup(restart=restart)
        lease = self._lease
        if restart and ended_well and lease is not None and not lease.gone:
            lease.await_kernel()  # renewed while the next shim starts
            return
        await self._release()

    async def wait(self) -> int | None:
        """LocalProvisioner's, remembering the shim's exit status for cleanup."""
        had_process = self.process is not None
        code = await super().wait()
        if had_process:
            self._shim_exit = code
        return code

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        # A restart waits for a share (up to wait_s), then for the gateway to start the kernel.
        return recommended + self.wait_s + KERNEL_START_TIMEOUT_S

    async def get_provisioner_info(self) -> dict[str, Any]:
        """LocalProvisioner's, with the share (``share``: None when none is held)."""
        info = await super().get_provisioner_info()
        lease = self._lease
        info["share"] = (
            None
            if lease is None or lease.gone
            else {"share_id": lease.grant.share_id, "since": lease.since, **lease.handover()}
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Re-attach to the share of ``get_provisioner_info`` (another server process's):
        renew it from here, and give it back in cleanup."""
        await super().load_provisioner_info(provisioner_info)
        held = provisioner_info.get("share")
        if not held:
            return

        def attach() -> _Lease:
            pool = Pool.from_config(self.servers)
            try:
                grant = Grant(pool.connect(held["server"]), held["share"], held["lease_s"],
                              held.get("env") or {})  # fmt: skip
            except (config.ConfigError, tokens.TokenError, GatewayError) as exc:
                pool.close()
                raise ShareError(str(exc)) from None
            lease = _Lease(pool, grant)
            lease.since = held.get("since") or lease.since
            pid = self.pid
            if pid:  # the shim another server process started
                lease.kernel_alive = lambda: _pid_alive(pid)
            return lease

        await self._release()
        self._lease = await asyncio.to_thread(attach)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_VALUED = {"--kernel", "--files", "-l", "--server_list"}  # the shim's options set here


def shim_command(cmd: list[str], kernel: str, files: bool | str, servers: str | None) -> list[str]:
    """The shim's command line with what it forwards to set from the provisioner's config:
    the kernel, the folder, the servers (a shim that adopts a share still connects through
    them). The share options stay as the kernelspec wrote them; the shim adopts the share
    this provisioner took instead."""
    out: list[str] = []
    args = iter(cmd)
    for arg in args:
        name = arg.split("=", 1)[0]
        if name == "--no-files":
            continue
        if name in _VALUED:
            if "=" not in arg:
                next(args, None)  # its value
            continue
        out.append(arg)
    if files is False:
        out.append("--no-files")
    elif isinstance(files, str) and files:
        out += ["--files", files]
    if servers:
        out += ["-l", servers]
    return [*out, "--kernel", kernel]
