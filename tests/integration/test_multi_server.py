"""A pool of two gateways sharing the cluster keys: one token, one list, allocation that
falls through to the server that fits, and a server that is down."""

import json
import sys

import pytest

from tests.support.waiting import wait_for

# A command that prints which server's share it runs in.
WHERE = [sys.executable, "-c", "import os; print(os.environ['BITFUSION_SERVER'])"]


@pytest.fixture
def pool(gateway_factory, tmp_path):
    small = gateway_factory("--simulate-gpus", "1x8GiB", home=tmp_path / "a", name="small")
    big = gateway_factory(
        "--simulate-gpus", "1x16GiB", home=tmp_path / "b", name="big", keys_from=small
    )
    return small, big


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
    r = small.bf("run", "-m", "12000", "--", *WHERE, env=_env(small, big))
    assert r.returncode == 0 and r.stdout.strip() == "big", r.stderr
    r = small.bf("run", "-m", "2000", "--", *WHERE, env=_env(small, big))
    assert r.stdout.strip() == "small"  # first server in the list that has room
    hold = _env(small, big, BITFUSION_SESSION="fill-small")
    assert small.bf("request_gpus", "-m", "8000", env=hold).returncode == 0
    r = small.bf("run", "-m", "2000", "--", *WHERE, env=_env(small, big))
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


def _fill(small, big) -> tuple[dict[str, str], dict[str, str]]:
    """Alice takes all of both servers, one shell (session) each; their environments."""
    envs = []
    for gw, mib in ((small, "8192"), (big, "16384")):
        env = _env(small, big, BITFUSION_SESSION=f"fill-{gw.name}")
        r = small.bf("request_gpus", "-m", mib, "-l", gw.address, env=env)
        assert r.returncode == 0, r.stderr
        envs.append(env)
    return envs[0], envs[1]


def _queued(gw) -> int:
    return json.loads(gw.bf("list_gpus", "--json", "-l", gw.address).stdout)[0]["data"]["queued"]


def _bob_waits(small, big, *args: str, **env: str):
    """Bob's `bitfusion ARGS`, once it waits in the queues of both servers."""
    waiter = small.bf_background(*args, env=_env(small, big, user="bob", **env))
    assert wait_for(lambda: _queued(small) == 1 and _queued(big) == 1, 15)
    return waiter


def test_wait_takes_whichever_server_frees_first(pool):
    small, big = pool
    hold_small, hold_big = _fill(small, big)
    waiter = _bob_waits(small, big, "run", "-m", "2000", "--wait", "60", "--", *WHERE)
    # The second server in the list frees first: bob's command runs there at once.
    assert small.bf("release_gpus", env=hold_big).returncode == 0
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert out.strip() == "big"
    assert f"on {small.address}, {big.address}..." in err and "Traceback" not in err
    # His place on the first server was given up, so freeing it later grants him nothing.
    assert _queued(small) == 0
    assert "bob's request for 1 GPU × 2000 MiB left the queue: its client gave up" in small.log()
    assert small.bf("release_gpus", env=hold_small).returncode == 0
    assert small.no_shares_within(5) and big.no_shares_within(5)


def test_a_server_that_dies_while_waited_on_does_not_hold_up_the_grant(pool):
    small, big = pool
    hold_small, _ = _fill(small, big)
    waiter = _bob_waits(small, big, "run", "-m", "2000", "--wait", "120", "--", *WHERE)
    big.kill()  # its place can no longer be given up: the grant must not wait for it
    assert small.bf("release_gpus", env=hold_small).returncode == 0
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert out.strip() == "small" and "Traceback" not in err


def test_servers_freeing_at_once_leave_one_share_to_the_waiter(pool):
    small, big = pool
    hold_small, hold_big = _fill(small, big)
    bob_session = {"BITFUSION_SESSION": "bob-wait"}
    waiter = _bob_waits(small, big, "request_gpus", "-m", "2000", "--wait", "60", **bob_session)
    both = [small.bf_background("release_gpus", env=env) for env in (hold_small, hold_big)]
    assert all(p.wait(timeout=20) == 0 for p in both)  # both free at (nearly) once
    _, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    owners = [s["owner"] for gw in (small, big) for s in gw.shares()]
    assert owners == ["bob"]  # a second grant, had there been one, was given back
    assert small.bf("release_gpus", env=_env(small, big, user="bob", **bob_session)).returncode == 0


def test_a_wait_in_vain_on_several_servers_says_what_each_said(pool):
    small, big = pool
    hold_small, hold_big = _fill(small, big)
    r = small.bf("run", "-m", "2000", "--wait", "1", "--", "true", env=_env(small, big))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("Waited in vain") == 2
    assert small.address in r.stderr and big.address in r.stderr
    assert _queued(small) == 0 and _queued(big) == 0
    for env in (hold_small, hold_big):
        assert small.bf("release_gpus", env=env).returncode == 0
