"""A real JupyterHub (DummyAuthenticator, SimpleLocalProcessSpawner, configurable-http-proxy)
set up with bitfusion_jupyter.hub.configure against a real gateway on a simulated pool: each
single-user server it spawns holds a user token of its own Hub user and the pool's servers,
never the Hub's minter token; that token takes shares in its user's name, and is revoked when
the Hub stops the server or removes its user. The hooks' refusals (a bad name, no gateway, a
token that cannot mint) are tested on the hooks themselves, without a Hub."""

from __future__ import annotations

import asyncio
import logging
import select
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.spawned import free_port
from remoting import tokens
from tests.support.env import CLI
from tests.support.gateways import GatewayFactory, GatewayProcess, no_traceback
from tests.support.hub import (
    CHP,
    START_S,
    TTL_S,
    Hub,
    alive,
    environ,
    running_hub,
    write_minter,
)
from tests.support.waiting import wait_for

pytest.importorskip("jupyterhub")
from traitlets.config import Config  # noqa: E402  (after the skip: traitlets comes with it)

from bitfusion_jupyter import hub as bfhub  # noqa: E402

pytestmark = pytest.mark.skipif(
    CHP is None, reason="configurable-http-proxy is missing: run ./install-system-packages --test"
)
REVOKED = "This token has been revoked"


@pytest.fixture
def pool(gateway_factory: GatewayFactory) -> GatewayProcess:
    return gateway_factory("--simulate-gpus", "2x16GiB")


@pytest.fixture
def minter_file(pool: GatewayProcess, tmp_path: Path) -> Path:
    path = tmp_path / "bitfusion-minter.token"
    write_minter(pool, path)
    return path


# --- the hooks alone ---------------------------------------------------------------------
class _Spawner:
    """What the hooks use of a Spawner: its user's name, its environment and its log."""

    def __init__(self, name: str) -> None:
        self.user = SimpleNamespace(name=name)
        self.environment: dict[str, str] = {}
        self.log = logging.getLogger("test-hub")


def _spawner(name: str) -> _Spawner:
    return _Spawner(name)


def _hooks(servers: list[str], token_file: Path, c: Config | None = None, **kw: Any):
    c = c or Config()
    kw.setdefault("issued_file", token_file.parent / "issued.json")  # not the working folder
    bfhub.configure(c, servers=servers, token_file=token_file, **kw)
    return c.Spawner.pre_spawn_hook, c.Spawner.post_stop_hook


def test_the_hooks_give_a_user_token_chain_earlier_hooks_and_revoke_at_stop(pool, minter_file):
    c = Config()
    ran: list[str] = []
    c.Spawner.pre_spawn_hook = lambda s: ran.append(f"pre {s.user.name}")

    async def earlier_post(s: Any) -> None:
        ran.append(f"post {s.user.name}")

    c.Spawner.post_stop_hook = earlier_post
    pre, post = _hooks([pool.address], minter_file, c, token_ttl_s=TTL_S)
    spawner = _spawner("erin")
    spawner.environment = {"KEEP": "1"}
    asyncio.run(pre(spawner))
    env = spawner.environment
    assert env["KEEP"] == "1" and env["BITFUSION_SERVERS"] == pool.address
    tok = tokens.parse(env["BITFUSION_TOKEN"])
    assert (tok.user, tok.role) == ("erin", "u")
    assert tok.expires is not None and 0 < tok.expires - time.time() <= TTL_S
    user_env = {**pool.env("erin"), "BITFUSION_TOKEN": str(tok)}
    assert pool.bf("list_gpus", env=user_env).returncode == 0
    asyncio.run(post(spawner))
    assert ran == ["pre erin", "post erin"]
    assert REVOKED in no_traceback(pool.bf("list_gpus", env=user_env))
    asyncio.run(post(spawner))  # a second stop has nothing left to revoke


def test_a_hub_restarted_while_a_server_runs_still_revokes_its_token_at_stop(pool, minter_file):
    issued = minter_file.parent / "issued.json"
    pre, _ = _hooks([pool.address], minter_file, issued_file=issued)
    spawner = _spawner("erin")
    asyncio.run(pre(spawner))
    tok = spawner.environment["BITFUSION_TOKEN"]
    user_env = {**pool.env("erin"), "BITFUSION_TOKEN": tok}
    # What the Hub keeps lets it revoke the token, not use it: no token in it, for it alone.
    assert tok not in issued.read_text() and tokens.parse(tok).nonce in issued.read_text()
    assert issued.stat().st_mode & 0o777 == 0o600
    # The Hub restarts (new hooks, the same file); then the server stops.
    _, post = _hooks([pool.address], minter_file, issued_file=issued)
    assert pool.bf("list_gpus", env=user_env).returncode == 0
    asyncio.run(post(spawner))
    assert REVOKED in no_traceback(pool.bf("list_gpus", env=user_env))
    assert "erin" not in issued.read_text()  # revoked: nothing left to remember


def test_a_spawn_fails_in_one_sentence_when_the_pool_cannot_mint(pool, minter_file, tmp_path):
    bad_name = _hooks([pool.address], minter_file)[0]
    with pytest.raises(bfhub.HubSpawnError) as err:
        asyncio.run(bad_name(_spawner("carol.smith")))
    assert err.value.status_code == 400
    assert "'carol.smith' cannot be a GPU pool user name" in err.value.jupyterhub_message

    down = f"127.0.0.1:{free_port()}"
    no_gateway = _hooks([down], minter_file, timeout_s=1)[0]
    with pytest.raises(bfhub.HubSpawnError) as err:
        asyncio.run(no_gateway(_spawner("alice")))
    said = err.value.jupyterhub_message
    assert said.startswith("No GPU pool gateway answered the Hub") and down in said
    assert "start 'bitfusion gateway'" in said and said.count(". ") == 0

    # The first that answers mints: a server that is down before it costs a timeout only.
    both = _hooks([down, pool.address], minter_file, timeout_s=1)[0]
    spawner = _spawner("alice")
    asyncio.run(both(spawner))
    assert tokens.parse(spawner.environment["BITFUSION_TOKEN"]).user == "alice"

    user_token = tmp_path / "not-a-minter.token"
    user_token.write_text(pool.token("mallory") + "\n")
    not_minter = _hooks([pool.address], user_token)[0]
    with pytest.raises(bfhub.HubSpawnError) as err:
        asyncio.run(not_minter(_spawner("alice")))
    said = err.value.jupyterhub_message
    assert "refused the Hub's minter token" in said and "--minter" in said

    missing = _hooks([pool.address], tmp_path / "nowhere.token")[0]
    with pytest.raises(bfhub.HubSpawnError) as err:
        asyncio.run(missing(_spawner("alice")))
    assert "cannot read its GPU pool minter token" in err.value.jupyterhub_message


def test_configure_refuses_bad_settings_at_once(tmp_path):
    with pytest.raises(ValueError, match="at least one server"):
        bfhub.configure(Config(), servers="", token_file=tmp_path / "t")
    with pytest.raises(ValueError, match="token_ttl_s"):
        bfhub.configure(Config(), servers="gpu1", token_file=tmp_path / "t", token_ttl_s=0)


# --- a real JupyterHub -------------------------------------------------------------------
@pytest.fixture
def hub(pool: GatewayProcess, minter_file: Path, tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub", [pool], minter_file) as running:
        yield running


def test_a_hub_restarted_while_its_servers_run_revokes_a_token_when_its_server_stops(
    pool, minter_file, tmp_path
):
    # An upgrade that keeps users' servers running (as the Helm chart's Hub does).
    keep = "c.JupyterHub.cleanup_servers = False\n"
    with running_hub(tmp_path / "hub", [pool], minter_file, config=keep) as hub:
        status, said = hub.start("alice")
        assert status in (201, 202), said
        pid = hub.wait_ready("alice")
        alice = environ(pid)
        hub.restart()
        assert alive(pid)  # her server ran on through the Hub's restart
        assert pool.bf("list_gpus", env=alice).returncode == 0
        hub.stop("alice")
        assert wait_for(lambda: pool.bf("list_gpus", env=alice).returncode != 0, 20)
        assert REVOKED in no_traceback(pool.bf("list_gpus", env=alice))


def _line(proc: subprocess.Popen, timeout: float = START_S) -> str:
    """The first line ``proc`` prints, without waiting forever for it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"nothing printed in {timeout:g} s"
    return proc.stdout.readline().strip()


def test_each_hub_user_gets_their_own_pool_token_revoked_at_stop(hub, pool, minter_file):
    minter = minter_file.read_text().strip()
    admin = (pool.state_dir / "admin.token").read_text().strip()
    users = ["alice", "bob"]
    # Both spawn at once, as a Hub's users do (the API waits on each spawn for a while).
    with ThreadPoolExecutor(len(users)) as starts:
        for status, said in starts.map(hub.start, users):
            assert status in (201, 202), said
    pids = {name: hub.wait_ready(name) for name in users}
    envs = {name: environ(pid) for name, pid in pids.items()}

    for name, env in envs.items():
        tok = tokens.parse(env["BITFUSION_TOKEN"])
        assert (tok.user, tok.role, tok.admin, tok.minter) == (name, "u", False, False)
        assert tok.expires is not None and tok.expires - time.time() <= TTL_S
        assert env["BITFUSION_SERVERS"] == pool.address
        raw = Path(f"/proc/{pids[name]}/environ").read_bytes()
        assert minter.encode() not in raw and admin.encode() not in raw, name

    # Each user's token takes a share in that user's name, at once for both.
    runs = {
        name: subprocess.Popen(
            [
                *CLI,
                "run",
                "--no-files",
                "-n",
                "1",
                "-m",
                "1024",
                "--",
                "python",
                "-c",
                "import os, sys; print(os.environ['USER'], flush=True); sys.stdin.readline()",
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in envs.items()
    }
    try:
        assert {name: _line(run) for name, run in runs.items()} == {n: n for n in users}
        assert sorted(s["owner"] for s in pool.shares()) == users
    finally:
        for run in runs.values():
            out, err = run.communicate("\n", timeout=START_S)
            assert run.returncode == 0, err

    # Stopping alice's server revokes her token on the gateway; bob's still works.
    hub.stop("alice")
    alice = envs["alice"]
    assert not alive(pids["alice"])  # her single-user server is gone
    assert wait_for(lambda: pool.bf("list_gpus", env=alice).returncode != 0, 20)
    assert REVOKED in no_traceback(pool.bf("list_gpus", env=alice))
    assert pool.bf("list_gpus", env=envs["bob"]).returncode == 0

    # A Hub admin who removes a user stops their server first, which revokes their token.
    status, said = hub.api("DELETE", "/users/bob")
    assert status == 204, said
    assert wait_for(lambda: pool.bf("list_gpus", env=envs["bob"]).returncode != 0, 20)
    assert REVOKED in no_traceback(pool.bf("list_gpus", env=envs["bob"]))

    # A Hub name that cannot be a pool user's fails its spawn, in one sentence.
    status, said = hub.start("carol.smith")
    assert status == 400, said
    assert "'carol.smith' cannot be a GPU pool user name" in said["message"]
