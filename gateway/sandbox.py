"""A share's sandbox: the view of the server that a share's processes get, made by bubblewrap.

Every command and kernel runs as the gateway's Unix user, so the view is what walls shares off
from each other and from the pool's secrets. It is built for the share, not carved out of
everything: the system read-only (``/usr``, ``/etc``, ``/opt``, the interpreters the gateway
offers), the user's own home on this server read-write (``$HOME``, kept across shares), a
private ``/tmp`` and ``/dev/shm``, a minimal ``/dev`` with the share's GPU nodes, a private PID
namespace, and the few files of the gateway's that the share needs (its kernel's connection
file, its usage figures). The state directory and other users' homes are simply not there.

bubblewrap (Debian's ``bubblewrap``, Flatpak's sandbox) does the namespaces and mounts,
unprivileged through user namespaces. Landlock (``gateway.landlock``) adds what a mount view
cannot: scoped signals and abstract unix sockets.

The nanny starts ``bwrap`` as its child. bwrap's outer process stays on the host to report
the exit status (128+N for a command killed by signal N, as shells do); the nanny starts it
with INT, TERM, HUP and QUIT ignored, so a signal to the group (an interrupt, a terminate)
reaches the command and not that monitor, and ``env --default-signal`` gives the command the
default dispositions back. Processes in the sandbox keep bwrap's session, so policing still
finds a share's GPU processes by session, in host PIDs.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PRELUDE = Path(__file__).resolve().parent / "share_prelude.sh"
FILES_PRELUDE = Path(__file__).resolve().parent / "files_prelude.sh"
HOMES_IN = Path("/home")  # where a user's home appears in their shares
RUN_IN = Path("/run/bitfusion")  # where the gateway's files for the share appear
_SYSTEM = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt")
_SYS = ("/sys/block", "/sys/bus", "/sys/class", "/sys/dev", "/sys/devices")
# Host secrets that sit in the read-only system tree: covered, since a gateway run by root
# would otherwise read them (the documented service user cannot anyway).
_MASKED = ("/etc/shadow", "/etc/gshadow", "/etc/bitfusion", "/etc/ssh/ssh_host_*_key")
_GPU_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")
# What reaches a share of the gateway's own environment: the locale and where programs and
# libraries are. Nothing else: the gateway's variables are not the users' to read.
_PASSED = ("PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "PYTHONPATH")
_PASSED_PREFIXES = ("LC_", "NVIDIA_")


class SandboxUnavailable(Exception):
    """bubblewrap cannot make a sandbox here; the message says why and what to do."""


@dataclass(frozen=True)
class Verdict:
    """Whether shares are sandboxed, and the one line every view shows about it."""

    sandboxed: bool  # False: shares are refused, or run UNCONFINED by the admin's choice
    refuse: bool  # True: no sandbox and no --unconfined, so shares are refused
    line: str
    landlock_abi: int = 0


@dataclass(frozen=True)
class Bind:
    """A host path shown in the sandbox at ``inside`` (the same path when None)."""

    host: str
    inside: str | None = None
    writable: bool = False


@dataclass(frozen=True)
class FilesMount:
    """The client's folder, mounted by sshfs at the same path in the sandbox before the
    command starts. The SFTP stream comes in on fd ``sftp_in`` and goes out on ``sftp_out``
    of the bwrap process (inherited: the caller puts them there, below 10, as sh needs)."""

    path: str
    sftp_in: int
    sftp_out: int


@dataclass
class Layout:
    """What every share of this gateway sees; one per gateway, computed once at start."""

    state_dir: Path
    homes_dir: Path
    offered: list[str] = field(default_factory=list)  # read-only trees with the interpreters
    hidden: list[str] = field(default_factory=list)  # trees under those that must not be seen

    @classmethod
    def for_gateway(
        cls, state_dir: Path, homes_dir: Path, interpreters: Iterable[str] = ()
    ) -> Layout:
        hidden = _outermost([_real(state_dir), _real(homes_dir)])
        trees = [sys.prefix, sys.base_prefix, sys.exec_prefix, str(PACKAGE_ROOT)]
        trees += [p for p in sys.path[1:] if p and os.path.isdir(p)]
        for program in interpreters:
            if os.path.isabs(program):  # an environment's bin/python: its whole environment
                trees.append(str(Path(_real(program)).parent.parent))
                trees.append(str(Path(program).parent.parent))
        offered = _outermost(t for t in map(_real, trees) if not _under_system(t))
        return cls(_real_path(state_dir), _real_path(homes_dir), offered, hidden)

    def files_refusal(self, path: str, user: str) -> str | None:
        """Why the client's folder ``path`` cannot be mounted at that path in ``user``'s
        sandbox (a few words), or None when it can. Sent by the client: nothing is trusted."""
        if not path.startswith("/") or "\0" in path or os.path.normpath(path) != path:
            return "that is not a plain absolute path"
        if path == "/" or os.path.dirname(path) == "/":
            return "a folder at the top of the file system is the server's own"
        # Not inside the system or the gateway's trees; not over a place the sandbox makes
        # (which the mount would hide): /tmp, the user's server home, /run/bitfusion.
        closed = [f"/{top}" for top in _SYSTEM] + ["/proc", "/sys", "/dev", "/run"]
        closed += [*self.offered, *self.hidden]
        for tree in closed:
            if _within(path, tree):
                return f"that is inside the server's {tree}"
        for place in [*closed, "/tmp", "/var/tmp", str(HOMES_IN / user), str(RUN_IN)]:
            if _within(place, path):
                return f"it would cover the share's {place}"
        home_in = str(HOMES_IN / user)
        if _within(path, home_in):
            # The mount point is made in the user's server home: not through a link of theirs,
            # which could lead it into another of the share's writable places.
            where = self.homes_dir / user
            for part in Path(path).relative_to(home_in).parts:
                where = where / part
                if where.is_symlink():
                    return f"{home_in}/{where.relative_to(self.homes_dir / user)} is a link there"
        return None

    def home_of(self, user: str) -> Path:
        """``user``'s home on this server (made on first use, 0700): their shares' $HOME."""
        home = self.homes_dir / user
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return home

    def argv(
        self,
        command: Sequence[str],
        *,
        user: str,
        binds: Sequence[Bind] = (),
        gpu_minors: Sequence[int] | None = (),
        mps_dirs: Sequence[str] = (),
        chdir: str | None = None,
        files: FilesMount | None = None,
    ) -> list[str]:
        """The bwrap command line that runs ``command`` in a sandbox of ``user``'s.

        ``gpu_minors``: the /dev/nvidiaN of the share's GPUs (None: every one there is).
        ``files``: the client's folder to mount first (then it is the working directory)."""
        home_in = str(HOMES_IN / user)
        out = [
            "bwrap",
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",  # bwrap's init: nothing outlives the share's process
            "--cap-drop",
            "ALL",
        ]
        if files is not None:
            # A FUSE mount needs CAP_SYS_ADMIN in the sandbox's user namespace, as its root:
            # files_prelude.sh mounts, then runs the command as the user, with no capability,
            # in a user namespace nested in this one (see there), whose map of root takes
            # CAP_SETFCAP (user_namespaces(7)).
            out += ["--uid", "0", "--gid", "0"]
            out += ["--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETFCAP"]
        for top in _SYSTEM:
            host = f"/{top}"
            if os.path.islink(host):
                out += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                out += ["--ro-bind", host, host]
        for path in (p for pattern in _MASKED for p in glob.glob(pattern)):
            if os.path.isdir(path):
                out += ["--tmpfs", path]
            elif os.path.exists(path):
                out += ["--ro-bind", "/dev/null", path]
        for path in _SYS:
            out += ["--ro-bind-try", path, path]
        out += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp"]
        for node in _gpu_nodes(gpu_minors):
            out += ["--dev-bind-try", node, node]
        if files is not None:
            out += ["--dev-bind", "/dev/fuse", "/dev/fuse"]
        # A hidden tree is covered wherever a bound tree would show it (a state dir in /opt,
        # or in the checkout the gateway runs from); an offered tree inside a hidden one (a
        # venv in the service user's home, which is the state dir) is bound after the cover.
        inside = [t for t in self.offered if any(_within(t, h) for h in self.hidden)]
        for tree in self.offered:
            if tree not in inside:
                out += ["--ro-bind", tree, tree]
        shown = [f"/{top}" for top in _SYSTEM] + [t for t in self.offered if t not in inside]
        for path in self.hidden:
            if any(_within(path, tree) for tree in shown):
                out += ["--tmpfs", path]
        for tree in inside:
            out += ["--ro-bind", tree, tree]
        for path in mps_dirs:
            out += ["--bind-try", path, path]
        out += ["--dir", str(RUN_IN), "--bind", str(self.home_of(user)), home_in]
        for bind in binds:
            out += ["--bind" if bind.writable else "--ro-bind", bind.host, bind.inside or bind.host]
        if files is not None:
            out += ["--dir", files.path]  # the mount point, at the client's own path
            chdir = files.path
        # The root itself (bwrap's tmpfs) read-only: nothing to write but home, /tmp, /dev/shm.
        out += ["--remount-ro", "/", "--chdir", chdir or home_in, "--", "env", "--default-signal"]
        if files is not None:
            ids = (str(os.getuid()), str(os.getgid()))
            mount = [str(files.path), str(files.sftp_in), str(files.sftp_out), *ids, sys.executable]
            out += ["/bin/sh", str(FILES_PRELUDE), *mount, "--"]
        return [*out, "/bin/sh", str(PRELUDE), *command]


def files_unavailable() -> str | None:
    """Why this server cannot mount a client's folder in its shares (a few words that say
    what to do), or None when it can: sshfs, and FUSE's /dev/fuse."""
    if shutil.which("sshfs") is None:
        return "sshfs is not installed (Debian: apt-get install sshfs)"
    if not os.path.exists("/dev/fuse"):
        return "there is no /dev/fuse (load the fuse module: modprobe fuse)"
    return None


def passed(gateway_env: Mapping[str, str], sandboxed: bool) -> dict[str, str]:
    """What of the gateway's own environment a share's process gets (see ``_PASSED``); an
    unconfined one also keeps the gateway's HOME and user, as it runs in them."""
    names = _PASSED if sandboxed else (*_PASSED, "HOME", "USER", "LOGNAME")
    return {k: v for k, v in gateway_env.items() if k in names or k.startswith(_PASSED_PREFIXES)}


def environment(share_env: dict[str, str], user: str, user_env: str | None) -> dict[str, str]:
    """A sandboxed process's environment: the share's (``passed`` and the share's variables),
    with the user's home and their Python layer."""
    env = dict(share_env)
    home = str(HOMES_IN / user)
    env.update({"HOME": home, "USER": user, "LOGNAME": user, "SHELL": "/bin/sh"})
    env.pop("TMPDIR", None)
    if user_env:
        env["BITFUSION_USER_ENV"] = user_env
        env["BITFUSION_OFFERED_PYTHON"] = sys.executable
        env["VIRTUAL_ENV"] = user_env
        env["PATH"] = os.pathsep.join([f"{user_env}/bin", env.get("PATH") or os.defpath])
    return env


def user_env_dir(user: str) -> str:
    """Where ``user``'s own Python layer over the offered environment lives, in the sandbox:
    a venv in their home, one per offered interpreter (see share_prelude.sh)."""
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    tag += "-" + hashlib.sha256(os.fsencode(sys.prefix)).hexdigest()[:8]
    return str(HOMES_IN / user / ".local" / "share" / "bitfusion" / "envs" / tag)


def installed_packages(layout: Layout, user: str) -> list[dict[str, str]]:
    """The packages ``user`` installed on this server (name and version), for list_shares.

    Read on the host from a folder the user controls: a link anywhere on the way is not
    followed, so the answer can only ever name what is really in their environment."""
    home = layout.homes_dir / user
    env = home / Path(user_env_dir(user)).relative_to(HOMES_IN / user)
    site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = site / "site-packages"
    path = home
    for part in site.relative_to(home).parts:
        path = path / part
        if not path.is_dir() or path.is_symlink():
            return []
    out = []
    for entry in sorted(os.listdir(site)):
        name, _, rest = entry.partition("-")
        if entry.endswith(".dist-info") and rest:
            out.append({"name": name, "version": rest.removesuffix(".dist-info")})
    return out


def check(wanted: bool) -> Verdict:
    """Can shares be sandboxed here? Tried for real, once, at the gateway's start."""
    from gateway import landlock

    version = landlock.abi()
    scoped = version >= landlock.SCOPED_ABI
    if not wanted:
        return Verdict(
            False,
            False,
            "UNCONFINED (--unconfined): code in a share can read the state directory, other "
            "users' homes and their processes",
        )
    try:
        probe()
    except SandboxUnavailable as exc:
        return Verdict(False, True, f"REFUSED: {exc}")
    extra = (
        f"; Landlock ABI {version} scopes signals and abstract sockets"
        if scoped
        else "; no Landlock scopes (Linux 6.12+): kernels use CurveZMQ channels"
    )
    return Verdict(
        True,
        False,
        "sandboxed by bubblewrap: a private view per share (its user's home, a private /tmp, "
        f"its own processes), no state directory, no other users{extra}",
        version if scoped else 0,
    )


def probe() -> None:
    """Start one empty sandbox; raise SandboxUnavailable with the fix when it fails."""
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed, so shares cannot be sandboxed; install it "
            "(apt-get install bubblewrap) or start the gateway with --unconfined on purpose"
        )
    # The namespaces and mounts of a real share: a host that masks /proc (some container
    # runtimes, systemd's ProtectKernelTunables=) fails here, not at every share.
    argv = [
        "bwrap",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--",
        "true",
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap does not start ({exc})") from None
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SandboxUnavailable(
            f"bubblewrap cannot make a sandbox here ({said}): user namespaces are blocked; "
            "allow them (sysctl kernel.unprivileged_userns_clone=1, or an AppArmor profile "
            "for bwrap) or start the gateway with --unconfined on purpose"
        )


def _gpu_nodes(minors: Sequence[int] | None) -> list[str]:
    nodes = [f"/dev/{name}" for name in _GPU_NODES]
    if minors is None:
        try:
            names = os.listdir("/dev")
        except OSError:
            names = []
        nodes += sorted(f"/dev/{n}" for n in names if n.startswith("nvidia") and n[6:].isdigit())
    else:
        nodes += [f"/dev/nvidia{m}" for m in minors]
    return nodes


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def _real_path(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _under_system(path: str) -> bool:
    return any(_within(path, f"/{top}") for top in _SYSTEM) or path == "/"


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths that are not inside another of them, in order, once each."""
    unique = sorted(set(paths), key=len)
    kept: list[str] = []
    for path in unique:
        if not any(_within(path, k) for k in kept):
            kept.append(path)
    return kept
