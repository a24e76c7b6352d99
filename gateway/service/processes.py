"""Processes in a share: each started under a nanny inside the share's sandbox, streamed to
its client through a relay; stdin, signals and acks from that client.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

from gateway import sandbox, simulated_claims, usage_files
from gateway.gpus import GpuInfo
from gateway.idle import IdleTracker
from gateway.ledger import Ledger, Process, Share
from gateway.mps import mps_pipe_dir
from gateway.nanny import launcher
from gateway.nanny.relay import Relay
from gateway.nanny.wire import FILES_FDS, NannyMsg
from gateway.service.access import Access
from gateway.service.config import GatewayConfig
from gateway.service.grants import Grants
from gateway.service.outbox import Outbox
from gateway.service.state import Background, RequestError, Transitions
from remoting import protocol, tokens
from remoting import share_env as share_names
from remoting.protocol import Message
from remoting.util.procs import session_of

log = logging.getLogger("bitfusion.gateway")


_FORWARDED_SIGNALS = {
    int(s)
    for s in (
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGKILL,
        signal.SIGWINCH,
    )
}


def _by_signal(code: int | None) -> TypeGuard[int]:
    try:
        return code is not None and code > 128 and bool(signal.Signals(code - 128))
    except ValueError:
        return False


@dataclasses.dataclass(eq=False)
class Processes:
    cfg: GatewayConfig
    ledger: Ledger
    gpus: list[GpuInfo]
    access: Access
    grants: Grants
    transitions: Transitions
    relays: dict[str, Relay]  # process id -> its link to the process's nanny
    idle: IdleTracker
    out: Outbox
    background: Background
    layout: sandbox.Layout
    verdict: sandbox.Verdict
    simulated: bool
    mps: bool
    run_dir: Path
    # Called with a process's id once it has ended (kernel sessions close its channels).
    ended: list[Callable[[str], None]] = dataclasses.field(default_factory=list)

    async def on_spawn(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict[str, Any]:
        share = self.access.share(msg["share_id"], tok)
        argv = msg["argv"]
        if not argv or not all(isinstance(a, str) for a in argv):
            raise RequestError(protocol.E_BAD_REQUEST, "Give a command to run after '--'.")
        env_extra = msg.get("env") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env_extra.items()):
            raise RequestError(protocol.E_BAD_REQUEST, "Environment entries must be strings.")
        env = self.grants.share_env(share, {**self.passed_env(), **env_extra})
        files = self.files_path(share, msg.get("files"))
        proc = await self.launch(tok, share, list(argv), env, msg.get("cwd"), ident, files=files)
        self.ledger.event("spawn", tok.user, share.id, " ".join(argv)[:200])
        return {"proc_id": proc.id}

    async def launch(
        self,
        tok: tokens.Token,
        share: Share,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        subscriber: bytes,
        kernel: dict[str, Any] | None = None,
        files: str | None = None,
        opened: Callable[[Process, bytes], None] | None = None,
    ) -> Process:
        """Start ``argv`` in ``share`` under a nanny, record it, and stream it to ``subscriber``.
        ``opened`` is called once it runs, still inside the start (a kernel's channels)."""
        self.access.refuse_unsandboxed(tok)
        held = share.id in self.ledger.shares
        async with self.transitions.starting_in(share.id, held):
            proc_id = self.ledger.new_id("p-", "processes")
            full, env, cwd, flags = self._sandboxed(share, argv, env, cwd, kernel, files)
            try:
                launched = await launcher.launch_async(
                    full,
                    env,
                    cwd,
                    self.run_dir,
                    proc_id,
                    max(60.0, self.cfg.lease_grace_s * 2),
                    flags,
                )
            except launcher.LaunchError as exc:
                self.ledger.event("spawn_failed", tok.user, share.id, str(exc))
                raise RequestError(protocol.E_SPAWN, str(exc)) from None
            proc = Process(
                proc_id,
                share.id,
                argv,
                str(launched.socket_path),
                str(launched.status_path),
                launched.nanny_pid,
                None,
                kernel=kernel,
            )
            self.ledger.add_process(proc)
            await self.start_relay(proc, out_from=1, subscriber=subscriber)
            if opened is not None:
                opened(proc, subscriber)  # inside the start, which end_share awaits
            return proc

    def files_path(self, share: Share, path: str | None) -> str | None:
        """The client's folder, where the share can show it: at its own path, if that path
        is not one of the sandbox's own (the system, the user's home itself, /run)."""
        if path is None:
            return None
        if not self.verdict.sandboxed:
            raise RequestError(
                protocol.E_NO_FILES,
                f"{self.cfg.hostname} runs shares unconfined, where your folder cannot be "
                "mounted; run with --no-files.",
            )
        missing = sandbox.files_unavailable()
        if missing:
            raise RequestError(
                protocol.E_NO_FILES,
                f"{self.cfg.hostname} cannot mount your folder: {missing}; ask its admin, "
                "or run with --no-files.",
            )
        why = self.layout.files_refusal(path, share.owner)
        if why:
            raise RequestError(
                protocol.E_NO_FILES,
                f"Your folder {path} cannot appear at the same path on {self.cfg.hostname}: "
                f"{why}; run from another folder, or with --no-files.",
            )
        return path

    def passed_env(self) -> dict[str, str]:
        """What of the gateway's own environment reaches a share: locale and search paths,
        never its other variables (they are not the users' to read)."""
        return sandbox.passed(os.environ, self.verdict.sandboxed)

    def _sandboxed(
        self,
        share: Share,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        kernel: dict[str, Any] | None,
        files: str | None = None,
    ) -> tuple[list[str], dict[str, str], str | None, list[str]]:
        """``argv`` as it runs in ``share``'s sandbox: the bwrap command line, its environment,
        the nanny's working directory and flags. Unchanged (but for the environment) when the
        admin chose --unconfined."""
        usage_dir = usage_files.path_for(self.cfg.state_dir, share.id).parent
        claims = simulated_claims.dir_for(self.cfg.state_dir, share.id) if self.simulated else None
        for folder in (usage_dir, claims):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.verdict.sandboxed:  # --unconfined, said everywhere: the host's own paths
            return argv, env, None, []
        # The gateway's files that the share needs appear at fixed places under /run/bitfusion,
        # so no path of the state directory ever reaches it.
        run_in = sandbox.RUN_IN
        env = {**env, "BITFUSION_USAGE_FILE": f"{run_in}/usage/{usage_files.FILE_NAME}"}
        if files:  # share_site keeps its modules' bytecode on this server
            env[share_names.FILES] = files
        binds = [sandbox.Bind(str(usage_dir), f"{run_in}/usage")]
        if claims is not None:
            binds.append(sandbox.Bind(str(claims), f"{run_in}/simulated-usage", True))
            env["BITFUSION_SIMULATED_USAGE_DIR"] = f"{run_in}/simulated-usage"
        if kernel is not None:
            # A folder of its own, in which ipykernel rewrites its connection file.
            conn_file = Path(kernel["connection_file"])
            binds.append(sandbox.Bind(str(conn_file.parent), f"{run_in}/kernel", True))
            argv = [a.replace(str(conn_file), f"{run_in}/kernel/{conn_file.name}") for a in argv]
        user = share.owner
        user_env = sandbox.user_env_dir(user)
        if argv and argv[0] == sys.executable:  # the offered Python: the user's layer over it
            argv = [f"{user_env}/bin/python", *argv[1:]]
        by_index = {g.index: g for g in self.gpus}
        minors = [by_index[i].minor for i in share.gpus]
        home_in = str(sandbox.HOMES_IN / user)
        # A client's path is only ever a place in the user's own home: it widens nothing.
        chdir = cwd if cwd and (cwd == home_in or cwd.startswith(home_in + "/")) else None
        full = self.layout.argv(
            argv,
            user=user,
            binds=binds,
            gpu_minors=None if None in minors else [m for m in minors if m is not None],
            # The daemon may be found running with its pipes elsewhere: none to show then.
            mps_dirs=[d for d in (mps_pipe_dir(), "/var/log/nvidia-mps") if d] if self.mps else [],
            chdir=chdir,
            files=sandbox.FilesMount(files, *FILES_FDS) if files else None,
        )
        flags = ["--shield", *(["--scope"] if self.verdict.landlock_abi else [])]
        flags += ["--files"] if files else []
        return full, sandbox.environment(env, user, user_env), None, flags

    async def start_relay(
        self, proc: Process, out_from: int, subscriber: bytes | None = None
    ) -> None:
        relay = Relay(
            proc.id,
            Path(proc.socket_path or ""),
            self.deliver,
            on_pid=lambda pid: self.ledger.set_pid(proc, pid) if proc.pid != pid else None,
            on_exit=lambda code: self._process_ended(proc.id, code),
            on_closed=lambda: self.relays.pop(proc.id, None),
        )
        relay.subscriber = subscriber
        share = self.ledger.shares.get(proc.share_id)
        relay.owner = share.owner if share is not None else None
        await relay.start(out_from)
        self.relays[proc.id] = relay

    async def deliver(self, ident: bytes, kind: str, fields: dict, payload: bytes | None) -> None:
        """A process's output, exit or notice, to the client that watches it."""
        self.touch(fields.get("proc_id"))
        await self.out.send(
            ident, protocol.encode(kind, [payload] if payload is not None else [], **fields)
        )

    def touch(self, proc_id: str | None) -> None:
        """The process's share is in use (its output or input passed)."""
        proc = self.ledger.processes.get(proc_id or "")
        if proc is not None:
            self.idle.touch(proc.share_id)

    def _process_ended(self, proc_id: str, code: int | None) -> None:
        for hook in self.ended:
            hook(proc_id)
        proc = self.ledger.finish_process(proc_id, code)
        if proc is not None:
            # A sandboxed command killed by signal N exits 128+N (bwrap says it as shells do).
            how = f"{code} (128+{signal.Signals(code - 128).name})" if _by_signal(code) else code
            log.info("process %s of share %s exited with %s", proc_id, proc.share_id, how)
        relay = self.relays.get(proc_id)
        if relay is not None and code is None:
            # The nanny vanished without a word: tell the watcher the process is gone.
            self.relays.pop(proc_id, None)
            if relay.subscriber is not None:
                self.background.spawn(
                    self.deliver(
                        relay.subscriber, "exit", {"proc_id": proc_id, "seq": 0, "code": 255}, None
                    )
                )

    async def on_register_pid(self, ident: bytes, msg: Message, tok: tokens.Token) -> dict:
        share = self.access.share(msg["share_id"], tok)
        pid = msg["pid"]
        # The gateway signals a registered process when the share ends, so a user may only
        # register a process of their own making: not one of another share, not a nanny,
        # not the gateway or a process it depends on.
        sid = session_of(pid) if pid > 1 else None
        taken = {
            session_of(p.pid)
            for p in self.ledger.processes.values()
            if p.pid and p.share_id != share.id
        }
        if (
            sid is None
            or sid in taken
            or sid in (os.getsid(0), os.getpid())
            or pid in (os.getpid(), os.getppid())
            or launcher.is_nanny(pid)
        ):
            self.ledger.event("denied", tok.user, share.id, f"register_pid {pid} refused")
            raise RequestError(
                protocol.E_DENIED,
                f"Process {pid} cannot join share {share.id}: only a process you started "
                "yourself, in a session of its own, can.",
            )
        proc = Process(
            self.ledger.new_id("p-", "processes"),
            share.id,
            ["(local)"],
            None,
            None,
            None,
            msg["pid"],
        )
        self.ledger.add_process(proc)
        return {"proc_id": proc.id}

    async def on_attach(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self.access.relay(msg["proc_id"], tok)
        if relay is not None:
            await relay.attach(ident, msg["out_from"])

    async def on_stdin(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self.access.relay(msg["proc_id"], tok)
        if relay is not None:
            self.touch(msg["proc_id"])
            await relay.send(
                {"type": NannyMsg.STDIN, "seq": msg["seq"], "stream": msg.get("stream") or 0},
                protocol.as_bytes(msg.payloads[0]),
            )

    async def on_stdin_close(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self.access.relay(msg["proc_id"], tok)
        if relay is not None:
            await relay.send(
                {"type": NannyMsg.STDIN_CLOSE, "seq": msg["seq"], "stream": msg.get("stream") or 0}
            )

    async def on_signal(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self.access.relay(msg["proc_id"], tok)
        if relay is not None and msg["signum"] in _FORWARDED_SIGNALS:
            await relay.send({"type": NannyMsg.SIGNAL, "signum": msg["signum"]})

    async def on_ack(self, ident: bytes, msg: Message, tok: tokens.Token) -> None:
        relay = self.access.relay(msg["proc_id"], tok)
        if relay is not None:
            await relay.ack(msg["seq"])
            if relay.link is None:
                self.relays.pop(msg["proc_id"], None)
