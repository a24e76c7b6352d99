"""A gateway laid out exactly as systemd/bitfusion-gateway.service lays it out, for security tests.

The test suite runs as root; the gateway here does not. It runs as a system user
(``bitfusion-test``), from a venv of Debian's /usr/bin/python3 that this user can read (the
suite's own Python lives under /root, mode 0700), with the unit file's User, Group, ExecStart,
WorkingDirectory, Environment, UMask, LimitNOFILE, NoNewPrivileges and CapabilityBoundingSet,
read from the unit itself so that the tests follow the unit as it changes. The checkout is not
made readable to that user: its packages are copied into the venv.

What setpriv cannot express of the unit (ProtectSystem, ProtectHome, the Protect* kernel
options, RestrictSUIDSGID, LockPersonality, RestrictRealtime, SystemCallArchitectures,
RestrictNamespaces) is NOT applied here: a test must not rely on it.

Everything here skips (pytest.skip) where it cannot work: not root, no useradd, no setpriv, no
/usr/bin/python3 with venv.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import pwd
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.spawned import free_port, stop_leftovers
from tests.support.env import REPO
from tests.support.gateways import GatewayProcess

UNIT_FILE = REPO / "systemd" / "bitfusion-gateway.service"
SERVICE_USER = "bitfusion-test"
SYSTEM_PYTHON = Path("/usr/bin/python3")
VENV_CACHE = Path("/var/tmp/bitfusion-test-venvs")
# Installed into the venv at the versions this interpreter has; pip resolves the rest.
PINNED = (
    "pyzmq",
    "nvidia-ml-py",
    "prometheus_client",
    "tornado",
    "jupyter_client",
    "jupyter_core",
    "traitlets",
    "ipykernel",
)
PACKAGES = ("gateway", "remoting", "bitfusion_jupyter")
# Not copied: the built panel and build trees (megabytes the gateway never reads), caches.
SKIP_DIRS = {"labextension", "node_modules", "__pycache__"}
SKIP_SUFFIXES = {".pyc", ".pyo"}
# What systemd gives a system service besides the unit's Environment= (systemd.exec(5)).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT_PROGRAM = "/usr/local/bin/bitfusion"
UNIT_STATE_ROOT = Path("/var/lib")
# Bump when the venv recipe below changes, so that old cached venvs are not reused.
RECIPE = "3"
STALE_BUILD_S = 3600

BITFUSION_SCRIPT = """#!{python}
# The `bitfusion` console script, as pip writes it for pyproject's [project.scripts].
import sys

from bitfusion_jupyter.cli import main

if __name__ == "__main__":
    sys.exit(main())
"""


def say(text: str) -> None:
    print(f"unit_layout: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def live_output(config: pytest.Config) -> Iterator[None]:
    """Show ``say`` lines as they come, not only in a failed test's captured output."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        yield


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the unit-layout gateway runs as a system user made with useradd")


def service_user() -> tuple[int, int, str]:
    """The uid, gid and name of the system user ``bitfusion-test``, made if absent."""
    _need_root()
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} to run the gateway as a service user")
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        made = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            capture_output=True,
            text=True,
        )
        try:  # a run beside this one may have made it first (useradd then says so)
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise RuntimeError(f"useradd {SERVICE_USER} failed: {made.stderr.strip()}") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def as_user(
    uid: int, gid: int, *, no_new_privs: bool = True, caps: str | None = "-all"
) -> list[str]:
    """A setpriv prefix that runs a command as ``uid``:``gid`` with that user's groups."""
    argv = ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--init-groups"]
    if no_new_privs:
        argv.append("--no-new-privs")
    if caps is not None:
        argv += ["--bounding-set", caps, "--inh-caps", "-all"]
    return argv


# --- the venv ------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    found = {}
    for name in PINNED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here, so the service venv cannot pin its version")
    return found


def _sources() -> list[Path]:
    """The files of this checkout's packages that the venv gets, relative to REPO."""
    files = []
    for package in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(REPO / package):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
            )
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if not name.startswith(".") and path.suffix not in SKIP_SUFFIXES and path.is_file():
                    files.append(path.relative_to(REPO))
    return files


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _system_python_version() -> str:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON} (Debian's python3) for a venv the service user can run")
    out = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _clear_stale_builds() -> None:
    """Temp folders of builds that died halfway (a killed run): nothing renames them now."""
    for old in VENV_CACHE.glob(".build-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(old, ignore_errors=True)


def _publish(build: Path, final: Path) -> None:
    """Rename a finished build into place; a run beside us that got there first wins."""
    build.chmod(0o755)
    try:
        build.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(build, ignore_errors=True)


def _repoint(venv: Path, old: Path, new: Path) -> None:
    """Make the scripts in ``venv``/bin (shebangs, activate) and pyvenv.cfg name ``new``, not
    ``old``: where the venv is published, not where it was built or copied from.

    Only those files tie a venv to its folder (its python is a symlink to /usr/bin). Each is
    replaced, never written in place: it may be a hard link into another cached venv.
    """
    before, after = str(old).encode(), str(new).encode()
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if before in data:
            tmp = path.with_name(f".{path.name}.new")
            tmp.write_bytes(data.replace(before, after))
            tmp.chmod(path.stat().st_mode & 0o7777)
            tmp.replace(path)


def _deps_venv(versions: dict[str, str], python_version: str) -> Path:
    """A venv of the pinned packages alone (the slow part), cached by their versions."""
    key = _digest(RECIPE.encode(), python_version.encode(), repr(sorted(versions.items())).encode())
    final = VENV_CACHE / f"deps-{key}"
    if (final / "bin" / "python3").exists():
        return final
    build = Path(tempfile.mkdtemp(prefix=f".build-deps-{key}-", dir=VENV_CACHE))
    started = time.monotonic()
    say(f"building the service venv's packages in {final} (once; 10-60 s)")
    made = subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "venv", str(build)],
        capture_output=True,
        text=True,
        umask=0o022,
    )
    if made.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        pytest.skip(
            f"{SYSTEM_PYTHON} -m venv failed (install Debian's python3-venv): "
            f"{made.stderr.strip().splitlines()[-1] if made.stderr.strip() else made.returncode}"
        )
    pins = [f"{name}=={version}" for name, version in sorted(versions.items())]
    say("pip install " + " ".join(pins))
    pip = subprocess.run(
        [
            str(build / "bin" / "python3"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *pins,
        ],
        capture_output=True,
        text=True,
        umask=0o022,  # world-readable whatever ours is
    )
    if pip.returncode != 0:
        shutil.rmtree(build, ignore_errors=True)
        raise RuntimeError(f"pip install into the service venv failed:\n{pip.stderr[-4000:]}")
    _repoint(build, build, final)
    _publish(build, final)
    say(f"packages installed in {time.monotonic() - started:.0f} s")
    return final


def _write_dist_info(site: Path) -> None:
    """The package's metadata, as pip writes it: the CLI finds the GPU server's commands
    (`bitfusion gateway`) through its entry points."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    info = site / f"bitfusion_jupyter-{project['version']}.dist-info"
    info.mkdir(mode=0o755)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: bitfusion-jupyter\nVersion: {project['version']}\n"
    )
    groups = project.get("entry-points", {})
    text = "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items())
        for group, names in groups.items()
    )
    (info / "entry_points.txt").write_text(text)
    for path in info.iterdir():
        path.chmod(0o644)


def service_python() -> Path:
    """The python of a venv the service user can run, holding the gateway, its kernels'
    packages and this checkout's packages (copied, so the checkout need not be readable).

    Built once per set of versions and sources under VENV_CACHE; a change of sources only
    re-copies them (hard links to the packages' venv make that about a second).
    """
    uid, gid, _ = service_user()
    python_version = _system_python_version()
    versions = _versions()
    sources = _sources()
    key = _digest(
        RECIPE.encode(),
        python_version.encode(),
        repr(sorted(versions.items())).encode(),
        (REPO / "pyproject.toml").read_bytes(),  # its entry points
        *(part for rel in sources for part in (str(rel).encode(), (REPO / rel).read_bytes())),
    )
    final = VENV_CACHE / key
    python = final / "bin" / "python3"
    if python.exists():
        return python
    VENV_CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    VENV_CACHE.chmod(0o755)  # mkdir's mode is cut by our umask
    _clear_stale_builds()
    deps = _deps_venv(versions, python_version)
    started = time.monotonic()
    say(f"copying this checkout's packages into {final}")
    build = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=VENV_CACHE))
    try:
        shutil.copytree(deps, build, symlinks=True, copy_function=os.link, dirs_exist_ok=True)
        _repoint(build, deps, final)
        site = next((build / "lib").glob("python3*/site-packages"))
        for rel in sources:
            target = site / rel
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            shutil.copyfile(REPO / rel, target)
            target.chmod(0o644)
        _write_dist_info(site)
        bitfusion = build / "bin" / "bitfusion"
        bitfusion.write_text(BITFUSION_SCRIPT.format(python=final / "bin" / "python3"))
        bitfusion.chmod(0o755)
        # Compiled now: the service user cannot write __pycache__ there, so would recompile
        # on every start.
        subprocess.run(
            [
                str(build / "bin" / "python3"),
                "-m",
                "compileall",
                "-q",
                *(str(site / p) for p in PACKAGES),
            ],
            check=True,
            capture_output=True,
            umask=0o022,
        )
        for dirpath, dirnames, _ in os.walk(build):
            for d in dirnames:
                Path(dirpath, d).chmod(0o755)
        _check_runs(build / "bin" / "python3", uid, gid)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _publish(build, final)
    say(f"service venv ready in {time.monotonic() - started:.1f} s: {final}")
    return python


def _check_runs(python: Path, uid: int, gid: int) -> None:
    """The service user can start the gateway from this venv (reads all it imports)."""
    ran = subprocess.run(
        [*as_user(uid, gid), str(python), "-m", "gateway", "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "HOME": "/"},
    )
    if ran.returncode != 0:
        raise RuntimeError(
            f"`python -m gateway --help` fails as {SERVICE_USER} in the service venv:\n"
            f"{ran.stderr[-4000:]}"
        )


# --- the unit ------------------------------------------------------------------------------


@dataclass
class Unit:
    """The [Service] settings of a unit file that a gateway laid out by it depends on."""

    user: str = "root"
    group: str | None = None
    exec_start: list[str] = field(default_factory=list)
    working_directory: str = "/"  # systemd's default for system services
    environment: dict[str, str] = field(default_factory=dict)
    state_directory: str | None = None
    no_new_privileges: bool = False
    capability_bounding_set: str | None = None  # None: not set, all capabilities
    umask: int = 0o022
    limit_nofile: str | None = None
    settings: dict[str, str] = field(default_factory=dict)  # every key, last value wins


def _yes(value: str) -> bool:
    return value.strip().lower() in {"1", "yes", "true", "on"}


def read_unit(path: Path = UNIT_FILE) -> Unit:
    """The [Service] section of a systemd unit file, with systemd's quoting and defaults."""
    unit = Unit()
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service" or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        unit.settings[key] = value
        if key == "User":
            unit.user = value
        elif key == "Group":
            unit.group = value
        elif key == "ExecStart":
            # Prefixes: "-" ignores the exit status; "@+!:" change what runs, which a test
            # cannot follow faithfully.
            if value[:1] in "@+!:":
                raise ValueError(f"{path}: ExecStart prefix {value[0]!r} is not supported here")
            unit.exec_start = shlex.split(value.lstrip("-"))
        elif key == "WorkingDirectory":
            unit.working_directory = value.lstrip("-")
        elif key == "Environment":
            if not value:
                unit.environment.clear()  # an empty assignment resets the list
            for item in shlex.split(value):
                name, _, val = item.partition("=")
                unit.environment[name] = val
        elif key == "EnvironmentFile":
            raise ValueError(f"{path}: EnvironmentFile is not supported here")
        elif key == "StateDirectory":
            unit.state_directory = value.split()[0] if value else None
        elif key == "NoNewPrivileges":
            unit.no_new_privileges = _yes(value)
        elif key == "CapabilityBoundingSet":
            unit.capability_bounding_set = value
        elif key == "UMask":
            unit.umask = int(value, 8)
        elif key == "LimitNOFILE":
            unit.limit_nofile = value
    if not unit.exec_start:
        raise ValueError(f"{path}: no ExecStart in [Service]")
    return unit


def _bounding_set(value: str | None) -> str | None:
    """setpriv's --bounding-set for CapabilityBoundingSet=: empty drops all, ~ lists drops."""
    if value is None:
        return None
    names = [c.lower().removeprefix("cap_") for c in value.lstrip("~").split()]
    if value.startswith("~"):
        return ",".join(f"-{n}" for n in names) or None
    if not names:
        return "-all"
    return ",".join(["-all", *(f"+{n}" for n in names)])


def _nofile(value: str | None) -> str | None:
    """prlimit's --nofile for LimitNOFILE=, no higher than our own hard limit: systemd may
    raise it, but a test suite without CAP_SYS_RESOURCE (a container) cannot."""
    if not value:
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def clamp(v: str) -> str:
        n = hard if v == "infinity" else int(v)
        if hard != resource.RLIM_INFINITY:
            n = min(n, hard)
        return "unlimited" if n == resource.RLIM_INFINITY else str(n)

    soft, _, high = value.partition(":")
    return f"{clamp(soft)}:{clamp(high or soft)}"


# --- the gateway ---------------------------------------------------------------------------


class UnitGateway(GatewayProcess):
    """A gateway started as ``unit_file`` starts it, as the service user, from the venv.

    Use as a context manager: ``with UnitGateway("--lease-grace", "2") as gw: ...``.
    ``start()`` and ``stop(sig)`` start and signal the gateway alone (so a test may restart
    it on the same state); ``close()`` also kills leftover share processes and removes the
    temp folder. ``env``, ``token``, ``bf``, ``shares``... are those of tests/support/gateways.py's
    GatewayProcess: the client runs as root with this interpreter.
    """

    def __init__(self, *args: str, unit_file: Path = UNIT_FILE) -> None:
        self.uid, self.gid, self.user_name = service_user()
        self.python = service_python()
        self.unit = read_unit(unit_file)
        self.root = Path(tempfile.mkdtemp(prefix="bitfusion-unit-", dir="/var/tmp"))
        self.root.chmod(0o755)
        state = self.root / "state"
        state.mkdir(mode=0o700)
        os.chown(state, self.uid, self.gid)
        # The folder `bf` runs the client in: one the service user may enter, unlike the
        # suite's temp folders (the gateway looks at the client's working directory).
        self.workdir = self.root / "work"
        self.workdir.mkdir()
        self.workdir.chmod(0o755)
        os.chown(self.workdir, self.uid, self.gid)
        # The CLI runs here: a folder the service user can enter, unlike the suite's temp
        # folders (a share may be asked to start in its client's folder).
        self.client_cwd = self.workdir
        client = self.root / "client"  # client configs, as root
        client.mkdir(mode=0o700)
        self.web_port = free_port()
        super().__init__(
            state_dir=state,
            port=free_port(),
            args=["--simulate-gpus", "2x16GiB", *args],
            log_path=self.root / "gateway.log",
            home=client,
        )

    def __enter__(self) -> UnitGateway:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # What the unit says, made concrete for this test.

    def program(self) -> list[str]:
        """The unit's program: this venv's `bitfusion` in place of /usr/local/bin's."""
        bitfusion = self.python.parent / "bitfusion"
        if bitfusion.exists():
            return [str(bitfusion)]
        return [str(self.python), "-m", "bitfusion_jupyter"]  # .cli has no __main__ guard

    def _unit_state_dir(self) -> str:
        name = self.unit.state_directory or "bitfusion"
        return str(UNIT_STATE_ROOT / name)

    def argv(self) -> list[str]:
        """ExecStart with our program, state dir and free ports, then this test's options."""
        prog, *rest = self.unit.exec_start
        if prog != UNIT_PROGRAM:
            raise ValueError(f"ExecStart runs {prog}, not {UNIT_PROGRAM}: update unit_layout.py")
        unit_state = self._unit_state_dir()
        out: list[str] = []
        ports = {"--port": str(self.port), "--web-port": str(self.web_port)}
        it = iter(rest)
        for arg in it:
            if arg in ports:
                out += [arg, ports[arg]]
                next(it, None)
            elif arg.split("=", 1)[0] in ports:
                out.append(f"{arg.split('=', 1)[0]}={ports[arg.split('=', 1)[0]]}")
            else:
                out.append(arg.replace(unit_state, str(self.state_dir)))
        return [*self.program(), *out, *self.args]

    def service_env(self) -> dict[str, str]:
        """The environment systemd gives the service: its own few variables, then the unit's."""
        entry = pwd.getpwnam(self.user_name)
        env = {
            "PATH": SYSTEMD_PATH,
            "LANG": "C.UTF-8",
            # The service user's home is its state dir (useradd --home /var/lib/bitfusion).
            "HOME": str(self.state_dir),
            "USER": self.user_name,
            "LOGNAME": self.user_name,
            "SHELL": entry.pw_shell,
        }
        env.update(self.unit.environment)
        return env

    def workdir_of_service(self) -> str:
        wd = self.unit.working_directory
        return str(self.state_dir) if wd == "~" else wd

    def as_service(self) -> list[str]:
        """The prefix that runs a command with the unit's user, groups and hardening."""
        if self.unit.user != "bitfusion" or self.unit.group not in (None, "bitfusion"):
            raise ValueError("the unit no longer runs as bitfusion: update unit_layout.py")
        argv = as_user(
            self.uid,
            self.gid,
            no_new_privs=self.unit.no_new_privileges,
            caps=_bounding_set(self.unit.capability_bounding_set),
        )
        nofile = _nofile(self.unit.limit_nofile)
        if nofile and shutil.which("prlimit"):
            argv = ["prlimit", f"--nofile={nofile}", "--", *argv]
        return argv

    def start(self, timeout: float = 30.0) -> None:
        out = self.log_path.open("a")
        self._log_from = out.tell()
        self.proc = subprocess.Popen(
            [*self.as_service(), *self.argv()],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.service_env(),
            cwd=self.workdir_of_service(),
            umask=self.unit.umask,
            start_new_session=True,  # systemd gives each service its own session
        )
        out.close()
        self.wait_listening(timeout, "unit gateway")

    def token(self, user: str, admin: bool = False) -> str:
        """A token for ``user``, made by `bitfusion gateway token create` as the service user."""
        key = f"{user}{'!' if admin else ''}"
        if key not in self._tokens:
            made = subprocess.run(
                [
                    *self.as_service(),
                    *self.program(),
                    "gateway",
                    "token",
                    "create",
                    "--state-dir",
                    str(self.state_dir),
                    "--user",
                    user,
                    *(["--admin"] if admin else []),
                ],
                capture_output=True,
                text=True,
                env=self.service_env(),
                cwd=self.workdir_of_service(),
                umask=self.unit.umask,
            )
            if made.returncode != 0:
                raise RuntimeError(f"token create failed: {made.stderr.strip()}")
            self._tokens[key] = made.stdout.strip()
        return self._tokens[key]

    def close(self) -> None:
        """Stop the gateway, kill what its shares left running, remove the temp folder."""
        try:
            self.stop(signal.SIGTERM)
            stop_leftovers(self.state_dir)  # as root, who can read the 0700 state dir
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (``Uid``, ``Gid``, ``NoNewPrivs``, ``CapBnd``, ``Umask``...)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item
    )


def describe(gw: Any) -> str:
    """For assertion messages: the gateway's argv and the end of its log."""
    return f"argv: {shlex.join(gw.argv())}\nlog:\n{gw.log()[-3000:]}"
