"""A pool of two gateways sharing the cluster keys: one token, one list, allocation that
falls through to the server that fits, and a server that is down."""

import json
import sys

import pytest

from tests.conftest import start_gateway, stop_leftovers


@pytest.fixture
def pool(tmp_path):
    small = start_gateway(tmp_path / "a", "--simulate-gpus", "1x8GiB", name="small")
    big = start_gateway(
        tmp_path / "b", "--simulate-gpus", "1x16GiB", name="big", keys_from=small.state_dir
    )
    yield small, big
    for gw in (small, big):
        gw.kill()
        stop_leftovers(gw.state_dir)


def _env(small, big, **extra):
    return small.env(BITFUSION_SERVERS=f"{small.address},{big.address}", **extra)


def test_one_token_lists_every_server(pool):
    small, big = pool
    r = small.bf("list_gpus", env=_env(small, big))
    assert r.returncode == 0, r.stderr
    assert small.address in r.stdout and big.address in r.stdout
    health = json.loads(small.bf("health", "--json", env=_env(small, big)).stdout)
    assert [h["name"] for h in health] == ["small", "big"]
    assert all(h["token_accepted"] for h in health)


def test_allocation_goes_to_the_server_that_fits(pool):
    small, big = pool
    where = [sys.executable, "-c", "import os; print(os.environ['BITFUSION_SERVER'])"]
    r = small.bf("run", "-m", "12000", "--", *where, env=_env(small, big))
    assert r.returncode == 0 and r.stdout.strip() == "big", r.stderr
    r = small.bf("run", "-m", "2000", "--", *where, env=_env(small, big))
    assert r.stdout.strip() == "small"  # first server in the list that has room
    hold = _env(small, big, BITFUSION_SESSION="fill-small")
    assert small.bf("request_gpus", "-m", "8000", env=hold).returncode == 0
    r = small.bf("run", "-m", "2000", "--", *where, env=_env(small, big))
    assert r.stdout.strip() == "big"  # the first is full: the next one serves
    small.bf("release_gpus", env=hold)


def test_what_no_server_can_hold_is_explained_per_server(pool):
    small, big = pool
    r = small.bf("run", "-m", "20000", "--", "true", env=_env(small, big))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "No server in the pool can ever hold 1 GPU × 20000 MiB" in r.stderr
    assert "8192 MiB" in r.stderr and "16384 MiB" in r.stderr


def test_a_server_that_is_down_does_not_hide_the_others(pool):
    small, big = pool
    big.kill()
    r = small.bf("--timeout", "2", "list_gpus", env=_env(small, big))
    assert r.returncode == 1
    assert small.address in r.stdout
    assert big.address in r.stderr and "connection refused" in r.stderr
    r = small.bf("--timeout", "2", "run", "-m", "1000", "--", "true", env=_env(small, big))
    assert r.returncode == 0, r.stderr  # the live server still serves


def test_revoking_on_the_command_line_reaches_every_peer(pool, tmp_path):
    small, big = pool
    peers = tmp_path / "peers.conf"
    peers.write_text(f"# the rest of the pool\n{big.address}\n")

    def revoke(user: str):
        return small.bf(
            "gateway", "token", "revoke", small.token(user),
            "--state-dir", str(small.state_dir), "--peers", str(peers),
        )  # fmt: skip

    def refused(user: str) -> list[bool]:
        env = {**_env(small, big), "BITFUSION_TOKEN": small.token(user)}
        answers = [gw.bf("list_gpus", "-l", gw.address, env=env) for gw in (small, big)]
        assert all(a.returncode == 0 or "revoked" in a.stderr for a in answers)
        return [a.returncode != 0 for a in answers]

    assert refused("dora") == [False, False]
    r = revoke("dora")
    assert r.returncode == 0, r.stderr
    assert "Revoked the token of dora here and on 1 of 1 peers." in r.stdout
    assert refused("dora") == [True, True]  # not only on the server where it was typed
    # A peer that does not answer is named; the command fails, so a script notices.
    big.kill()
    r = revoke("erin")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"the token still works on {big.address}; run this again" in r.stderr
    assert "here and on 0 of 1 peers" in r.stdout
