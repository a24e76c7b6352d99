"""A real JupyterHub for the tests: DummyAuthenticator (any password), SimpleLocalProcessSpawner
(one home per user) and configurable-http-proxy, set up with bitfusion_jupyter.hub.configure
against the given gateways. ``running_hub`` starts it and stops it, with every process it
left (its proxy, the single-user servers, their kernels), whatever failed; ``Hub`` is its
REST API for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from gateway.spawned import free_port
from tests.support.env import REPO, base_env
from tests.support.gateways import GatewayProcess
from tests.support.waiting import wait_for

__all__ = ["CHP", "START_S", "TTL_S", "Hub", "alive", "environ", "running_hub", "write_minter"]

CHP = shutil.which("configurable-http-proxy")
START_S = 60.0  # a Hub, its proxy and a Jupyter server each, on 2 cores shared with others
TTL_S = 3600


def write_minter(gw: GatewayProcess, path: Path) -> str:
    """A minter token of ``gw``'s pool, written to ``path`` (mode 0600) as an admin would."""
    text = gw.token("jupyterhub", minter=True)
    path.write_text(text + "\n")
    path.chmod(0o600)
    return text


def _json(text: str) -> Any:
    """A reply's JSON; the text itself where it is not (the proxy's own 404 while the Hub
    has not yet routed itself)."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


@dataclass
class Hub:
    base: str  # the proxy's public URL
    api_token: str
    proc: subprocess.Popen
    log_path: Path
    homes: Path  # each user's home is homes/NAME
    pids: set[int] = field(default_factory=set)  # single-user servers seen, to clean up
    launch: Callable[[], subprocess.Popen] | None = None  # starts the Hub process again

    def wait_up(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(OSError):
                return self.api("GET", "/")[0] == 200
            return False

        assert wait_for(up, START_S, step=0.3), self.log()

    def restart(self) -> None:
        """Stop the Hub process alone, as an upgrade does, and start it again on the same
        database (its single-user servers run on where ``cleanup_servers`` is False)."""
        assert self.launch is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.proc = self.launch()
        self.wait_up()

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        req = Request(
            f"{self.base}/hub/api{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.api_token}"},
        )
        try:
            with urlopen(req, timeout=30) as r:
                return r.status, _json(r.read().decode())
        except HTTPError as exc:
            return exc.code, _json(exc.read().decode())

    def user(self, name: str) -> dict:
        status, model = self.api("GET", f"/users/{name}")
        assert status == 200, model
        return model

    def start(self, name: str) -> tuple[int, Any]:
        status, model = self.api("POST", f"/users/{name}")
        assert status in (201, 409), model  # 409: the user exists already
        return self.api("POST", f"/users/{name}/server")

    def wait_ready(self, name: str) -> int:
        """The pid of ``name``'s single-user server, once the Hub says it is ready."""
        server: dict = {}

        def ready() -> bool:
            nonlocal server
            server = self.user(name)["servers"].get("", {})
            return bool(server.get("ready"))

        assert wait_for(ready, START_S, step=0.3), f"{name}: {server}\n{self.log()}"
        pid = int(server["state"]["pid"])
        self.pids.add(pid)
        return pid

    def stop(self, name: str) -> None:
        status, model = self.api("DELETE", f"/users/{name}/server")
        assert status in (202, 204), model
        assert wait_for(lambda: not self.user(name)["servers"], START_S, step=0.3), self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie does not count: the Hub may not have reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _config(
    root: Path,
    servers: list[str],
    minter_file: Path,
    api_token: str,
    port: int,
    singleuser_env: Mapping[str, str],
    user_env: Mapping[str, Mapping[str, str]],
    extra: str,
    ttl_s: float,
) -> Path:
    singleuser = Path(sys.executable).parent / "jupyterhub-singleuser"
    cmd = (
        [str(singleuser)]
        if singleuser.exists()
        else [sys.executable, "-m", "jupyterhub.singleuser"]
    )
    settings = {
        "port": port,
        "hub_port": free_port(),
        "proxy_api": f"http://127.0.0.1:{free_port()}",
        "db": f"sqlite:///{root / 'jupyterhub.sqlite'}",
        "cookie_secret": str(root / "cookie_secret"),
        "proxy_pid": str(root / "proxy.pid"),
        "homes": str(root / "homes" / "{username}"),
        "cmd": cmd,
        # A test machine or container may run as root, where a Jupyter server wants a word.
        "args": ["--allow-root"] if os.geteuid() == 0 else [],
        "env": dict(singleuser_env),
        "user_env": {name: dict(env) for name, env in user_env.items()},
        "token": api_token,
        "servers": servers,
        "minter": str(minter_file),
        "ttl": ttl_s,
    }
    config = root / "jupyterhub_config.py"
    config.write_text(
        f"s = {settings!r}\n"
        + """
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = s["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = s["hub_port"]
c.ConfigurableHTTPProxy.api_url = s["proxy_api"]
c.ConfigurableHTTPProxy.pid_file = s["proxy_pid"]
c.JupyterHub.db_url = s["db"]
c.JupyterHub.cookie_secret_file = s["cookie_secret"]
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = s["homes"]
c.Spawner.cmd = s["cmd"]
c.Spawner.args = s["args"]
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
# A Hub passes nothing of its own environment on by default (env_keep): the single-user
# servers run this checkout (PYTHONPATH) with this Python's tools (PATH).
c.Spawner.environment = s["env"]
c.JupyterHub.services = [{"name": "bitfusion-test", "api_token": s["token"]}]
c.JupyterHub.load_roles = [
    {"name": "bitfusion-test", "scopes": ["admin:users", "admin:servers"],
     "services": ["bitfusion-test"]},
]


def per_user_env(spawner):
    '''Each user's own variables (their Jupyter folders), before configure's hook runs.'''
    mine = s["user_env"].get(spawner.user.name, {})
    spawner.environment = {**spawner.environment, **mine}


c.Spawner.pre_spawn_hook = per_user_env
"""
        + extra
        + """
from bitfusion_jupyter.hub import configure
configure(c, servers=s["servers"], token_file=s["minter"], token_ttl_s=s["ttl"])
"""
    )
    return config


def _leftovers(root: Path) -> list[int]:
    """Processes whose working folder is in ``root``: the Hub's proxy and single-user servers
    (each runs in its user's home there) and their kernels, left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            found.append(int(entry.name))
    return found


def _end(proc: subprocess.Popen, pids: Iterable[int], root: Path) -> None:
    # The Hub stops its servers as it ends (which runs the stop hook) and its proxy;
    # whatever it leaves, after a failure too, is killed here.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in {*pids, *_leftovers(root)}:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_hub(
    root: Path,
    gateways: Iterable[GatewayProcess],
    minter_file: Path,
    *,
    users: Iterable[str] = (),
    singleuser_env: Mapping[str, str] | None = None,
    user_env: Mapping[str, Mapping[str, str]] | None = None,
    config: str = "",
    ttl_s: float = TTL_S,
) -> Iterator[Hub]:
    """A JupyterHub whose users get tokens of ``gateways``' pool (minted with the token in
    ``minter_file``), once it answers; everything it keeps and every home is in ``root``
    (homes in ``root/homes``; a test may make some first). ``users`` are made at once (no server);
    ``singleuser_env`` is added to every single-user server's environment, ``user_env[NAME]``
    to NAME's only; ``config`` is more lines of jupyterhub_config.py."""
    (root / "homes").mkdir(parents=True, exist_ok=True)
    api_token, port = uuid.uuid4().hex, free_port()
    env = {**base_env(root), "HOME": str(root), "PYTHONPATH": str(REPO)}
    env["PATH"] = f"{Path(CHP or '').parent}{os.pathsep}{env.get('PATH', '')}"
    keep = {k: env[k] for k in ("PATH", "PYTHONPATH", "BITFUSION_SYSTEM_SERVERS_CONF")}
    path = _config(
        root,
        [gw.address for gw in gateways],
        minter_file,
        api_token,
        port,
        {**keep, **(singleuser_env or {})},
        user_env or {},
        config,
        ttl_s,
    )
    log_path = root / "hub.log"
    log_path.write_text("")

    def launch() -> subprocess.Popen:
        with log_path.open("a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(path)],
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    hub = Hub(f"http://127.0.0.1:{port}", api_token, launch(), log_path, root / "homes")
    hub.launch = launch
    try:
        hub.wait_up()
        names = list(users)
        if names:
            status, said = hub.api("POST", "/users", {"usernames": names})
            assert status == 201, said
        yield hub
    finally:
        _end(hub.proc, hub.pids, root)
