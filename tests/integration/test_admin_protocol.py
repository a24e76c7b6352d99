"""The gateway's side of the dashboard: admin actions, idle reclaim, history and counters,
asked over the real protocol with real tokens (the dashboard is a client like any other)."""

from __future__ import annotations

import signal
import time

import pytest

from remoting import tokens
from remoting.client import GatewayConnection, GatewayError
from tests.support.gateways import start_gateway


def _conn(gateway, user: str, admin: bool = False) -> GatewayConnection:
    return GatewayConnection(gateway.address, tokens.parse(gateway.token(user, admin)))


@pytest.fixture
def admin(gateway):
    conn = _conn(gateway, "root", admin=True)
    yield conn
    conn.close()


def test_a_plain_user_may_not_take_admin_actions(gateway):
    bob = _conn(gateway, "bob")
    try:
        for kind, fields in (
            ("drain", {"index": 0, "drain": True}),
            ("set_idle_timeout", {"seconds": 5}),
            ("revoke", {"nonce": "x"}),
        ):
            with pytest.raises(GatewayError) as err:
                bob.request(kind, **fields)
            assert err.value.code == "denied" and "admin token" in str(err.value)
    finally:
        bob.close()
    assert gateway.bf("list_gpus").returncode == 0  # and nothing was drained
    assert "drain" not in gateway.bf("list_gpus").stdout.lower()


def test_a_drained_gpu_takes_no_new_share_and_undrain_restores_it(gateway, admin):
    assert admin.request("drain", index=0, drain=True) == {"index": 0, "draining": True}
    assert admin.request("drain", index=1, drain=True)["draining"]
    refused = gateway.bf("run", "-m", "1024", "--", "true")
    assert refused.returncode != 0 and "draining" in refused.stderr
    admin.request("drain", index=1, drain=False)
    ran = gateway.bf("run", "-m", "1024", "--", "sh", "-c", "echo $BITFUSION_GPU_INDICES")
    assert ran.returncode == 0 and ran.stdout.strip() == "1"
    with pytest.raises(GatewayError) as err:
        admin.request("drain", index=7, drain=True)
    assert "no GPU 7" in str(err.value)
    rows = {g["index"]: g["draining"] for g in admin.request("list_gpus")["gpus"]}
    assert rows == {0: True, 1: False}


def test_draining_survives_a_gateway_restart(tmp_path):
    gw = start_gateway(tmp_path, "--simulate-gpus", "2x16GiB")
    try:
        conn = _conn(gw, "root", admin=True)
        conn.request("drain", index=1, drain=True)
        conn.close()
        gw.kill(signal.SIGKILL)
        gw.start()
        conn = _conn(gw, "root", admin=True)
        rows = {g["index"]: g["draining"] for g in conn.request("list_gpus")["gpus"]}
        conn.close()
        assert rows == {0: False, 1: True}
    finally:
        gw.kill(signal.SIGTERM)


def test_an_idle_share_is_reclaimed_after_the_idle_timeout(gateway, admin):
    held = gateway.bf("request_gpus", "-m", "2048")
    assert held.returncode == 0, held.stderr
    [share] = admin.request("list_shares")["shares"]
    assert share["idle_s"] < 5
    assert admin.request("set_idle_timeout", seconds=1.5) == {"idle_timeout_s": 1.5}
    assert admin.request("list_gpus")["idle_timeout_s"] == 1.5
    assert gateway.no_shares_within(10), "the idle share was not reclaimed"
    reply = admin.request("list_shares")
    assert any(e["kind"] == "idle_reclaim" for e in reply["events"])
    assert admin.request("list_gpus")["counters"]["idle_reclaims"] == 1
    with pytest.raises(GatewayError) as err:
        admin.request("set_idle_timeout", seconds=-1)
    assert "0 or more" in str(err.value)
    assert admin.request("set_idle_timeout", seconds=0) == {"idle_timeout_s": None}


def test_a_running_command_keeps_its_share_from_going_idle(gateway, admin):
    admin.request("set_idle_timeout", seconds=1)
    run = gateway.bf("run", "-m", "1024", "--", "sleep", "3")
    assert run.returncode == 0, run.stderr  # not killed by the idle timeout
    kinds = [e["kind"] for e in admin.request("list_shares")["events"]]
    assert "idle_reclaim" not in kinds


def test_revoke_over_the_protocol_refuses_the_token_at_once(gateway, admin):
    text = gateway.token("carol")
    assert gateway.bf("list_gpus", user="carol").returncode == 0
    admin.request("revoke", nonce=tokens.parse(text).nonce)
    refused = gateway.bf("list_gpus", user="carol")
    assert refused.returncode != 0 and "revoked" in refused.stderr


def test_history_and_counters_follow_the_pool(gateway, admin):
    gateway.bf("run", "-m", "99999", "--", "true")  # a refusal
    assert gateway.bf("run", "-m", "2048", "--", "true").returncode == 0  # a grant
    deadline = time.monotonic() + 10
    while not admin.request("history", range="hour")["samples"]:
        assert time.monotonic() < deadline, "no history sample within 10 s"
        time.sleep(0.3)
    hour = admin.request("history", range="hour")
    assert hour["step_s"] == 10 and hour["range"] == "hour"
    assert {g["index"] for g in hour["samples"][0]["gpus"]} == {0, 1}
    assert admin.request("history", range="day")["step_s"] == 300
    with pytest.raises(GatewayError) as err:
        admin.request("history", range="week")
    assert "hour, day" in str(err.value)
    counters = admin.request("list_gpus")["counters"]
    assert counters["grants"] >= 1 and counters["refusals"] >= 1
