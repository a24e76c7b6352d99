"""Tokens a gateway must refuse, and clients it must not even talk to: each refused with one
sentence the user can act on, each logged by the gateway, and the gateway serving on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import zmq

from gateway import cluster_keys
from remoting import protocol, tokens
from tests.support.gateways import no_traceback
from tests.support.waiting import wait_for_log
from tests.support.wire import RawClient, connect, still_serves

SECRET = b"cluster-secret"
PUBLIC, _ = zmq.curve_keypair()


# --- the token format: expiry is optional, signed, and old tokens still read ---------------
def test_an_expiring_token_carries_a_signed_expiry():
    tok = tokens.mint(SECRET, PUBLIC, "alice", expires=2_000_000_000)
    text = str(tok)
    assert text.split(".")[4] == "e2000000000" and len(text.split(".")) == 7
    back = tokens.parse(text)
    assert back == tok and tokens.verify(SECRET, back)
    assert not back.expired(now=1_999_999_999) and back.expired(now=2_000_000_000)
    assert back.expires_text == "2033-05-18 03:33:20 UTC"
    # Moving the expiry, or cutting it off to make a token that never expires, breaks the MAC.
    later = text.replace(".e2000000000.", ".e2999999999.")
    assert not tokens.verify(SECRET, tokens.parse(later))
    parts = text.split(".")
    cut = ".".join(parts[:4] + parts[5:])
    assert tokens.parse(cut).expires is None and not tokens.verify(SECRET, tokens.parse(cut))


def test_a_six_part_token_still_reads_and_never_expires():
    tok = tokens.mint(SECRET, PUBLIC, "alice")
    assert len(str(tok).split(".")) == 6
    back = tokens.parse(str(tok))
    assert back.expires is None and not back.expired() and tokens.verify(SECRET, back)


@pytest.mark.parametrize("part", ["x123", "e", "e-5", "e12345678901234", "E123"])
def test_a_damaged_expiry_part_is_one_sentence(part):
    parts = str(tokens.mint(SECRET, PUBLIC, "alice", expires=2_000_000_000)).split(".")
    parts[4] = part
    with pytest.raises(
        tokens.TokenError, match=r"damaged \(its expiry part is unreadable\): .* a new one\.$"
    ):
        tokens.parse(".".join(parts))


@pytest.mark.parametrize(
    "text, seconds", [("90m", 5400), ("8h", 28800), ("30d", 2592000), ("45s", 45), (" 2H ", 7200)]
)
def test_lifetimes_read(text, seconds):
    assert tokens.parse_duration(text) == seconds


def _gateway_cli(*args: str, state_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bitfusion_jupyter", "gateway", "token", "create"]
        + ["--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("value", ["soon", "8", "8x", "0h", "-1d", "1.5h", "3651d", ""])
def test_token_create_refuses_a_bad_lifetime_in_one_sentence(tmp_path, value):
    r = _gateway_cli("--user", "erin", f"--expires={value}", state_dir=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert no_traceback(r) == (
        f"bitfusion: --expires {value!r} is not a lifetime; give a whole number with s, m, h "
        "or d (e.g. 90m, 8h or 30d), at most 3650d."
    )


# --- tokens the gateway refuses ------------------------------------------------------------
def test_an_expired_token_is_refused_with_its_date_and_logged(gateway):
    made = _gateway_cli("--user", "erin", "--expires", "1s", state_dir=gateway.state_dir)
    assert made.returncode == 0, made.stderr
    tok = tokens.parse(made.stdout.strip())
    assert f"This token of erin expires on {tok.expires_text}." in made.stderr
    while time.time() < (tok.expires or 0) + 0.5:
        time.sleep(0.1)
    env = gateway.env("erin", BITFUSION_TOKEN=str(tok))
    line = no_traceback(gateway.bf("list_gpus", env=env))
    assert line == (
        f"bitfusion: {gateway.address}: This token of erin expired on {tok.expires_text}; "
        "ask your admin for a new one."
    )
    [row] = json.loads(gateway.bf("health", "--json", env=env).stdout)
    assert row["reachable"] is True and row["token_accepted"] is False
    logged = wait_for_log(gateway, "refused list_gpus from a refused token of user erin")
    assert f"expired on {tok.expires_text}" in logged
    # A token with time left works like any other.
    fresh = _gateway_cli("--user", "erin", "--expires", "8h", state_dir=gateway.state_dir)
    ok = gateway.bf("list_gpus", env=gateway.env("erin", BITFUSION_TOKEN=fresh.stdout.strip()))
    assert ok.returncode == 0, ok.stderr
    still_serves(gateway)


def test_a_token_signed_by_another_pool_is_refused_and_logged(gateway, tmp_path):
    # Another pool's signing secret with this gateway's server key: the handshake succeeds,
    # the signature does not.
    other = cluster_keys.load_or_create(tmp_path / "other-pool")
    ours = tokens.parse(gateway.token("alice")).server_public_z85
    wrong = tokens.mint(other.token_secret, ours, "alice")
    line = no_traceback(gateway.bf("list_gpus", env=gateway.env(BITFUSION_TOKEN=str(wrong))))
    assert line == (
        # The address as configured, and the gateway's own name beside it: one server.
        f"bitfusion: The gateway on {gateway.address} (gpuhost) does not accept this token; "
        "ask your admin for a token of this pool and record it with 'bitfusion init'."
    )
    wait_for_log(gateway, "refused list_gpus from a refused token of user alice", "does not accept")
    still_serves(gateway)


@pytest.mark.parametrize(
    "forge",
    [
        lambda p: p[:4] + ["A" * len(p[4])] + p[5:],  # a made-up signature
        lambda p: [p[0], "a", *p[2:]],  # alice promotes herself to admin
        lambda p: [p[0], p[1], "bob", *p[3:]],  # alice passes as bob
    ],
    ids=["signature", "role", "user"],
)
def test_a_forged_token_is_refused_and_logged(gateway, forge):
    forged = ".".join(forge(gateway.token("alice").split(".")))
    line = no_traceback(gateway.bf("list_shares", env=gateway.env(BITFUSION_TOKEN=forged)))
    assert "does not accept this token" in line
    wait_for_log(gateway, "refused list_shares from a refused token of user", "does not accept")
    still_serves(gateway)


def test_a_revoked_token_is_refused_and_logged(gateway):
    tok = gateway.token("dave")
    assert gateway.bf("list_gpus", user="dave").returncode == 0
    revoked = gateway.bf("gateway", "token", "revoke", tok, "--state-dir", str(gateway.state_dir))
    assert revoked.stdout.strip() == "Revoked the token of dave."
    line = no_traceback(gateway.bf("list_gpus", user="dave"))
    assert line.endswith("This token has been revoked; ask your admin for a new one.")
    wait_for_log(gateway, "refused list_gpus from a refused token of user dave", "revoked")
    still_serves(gateway)


def test_a_message_without_a_real_token_is_refused_and_logged(gateway):
    # The CLI refuses such a token before sending; a hostile client sends it anyway.
    raw = RawClient(gateway)
    try:
        frames = protocol.encode("list_shares", token="hello", id=1)
        reply = raw.request(frames)
        assert not reply["ok"] and reply["code"] == protocol.E_AUTH
        assert "not a bitfusion token" in reply["error"]
    finally:
        raw.close()
    wait_for_log(gateway, "refused list_shares from a message whose token is not a bitfusion")
    still_serves(gateway)


def test_a_client_with_the_wrong_server_key_fails_the_handshake_and_is_logged(gateway, tmp_path):
    other = cluster_keys.load_or_create(tmp_path / "other-pool")
    stranger = tokens.mint(other.token_secret, other.public, "alice")
    r = gateway.bf("--timeout", "3", "list_gpus", env=gateway.env(BITFUSION_TOKEN=str(stranger)))
    assert no_traceback(r) == (
        f"bitfusion: The gateway {gateway.address} refused the encrypted "
        "handshake: your token's server key does not match this gateway; get a token of this "
        "pool and run 'bitfusion init'."
    )
    line = wait_for_log(
        gateway, "refused a connection on tcp://127.0.0.1:", "CurveZMQ handshake failed"
    )
    assert "before any message" in line
    still_serves(gateway)


def test_an_admin_action_by_a_user_is_refused_and_logged(gateway):
    bob = connect(gateway, "bob")
    try:
        for kind, fields in (
            ("drain", {"index": 0, "drain": True}),
            ("set_idle_timeout", {"seconds": 1}),
            ("revoke", {"nonce": tokens.parse(gateway.token("carol")).nonce}),
        ):
            with pytest.raises(Exception, match="Only an admin token may") as err:
                bob.request(kind, **fields)
            assert getattr(err.value, "code", None) == protocol.E_DENIED
            wait_for_log(gateway, f"refused {kind} from user bob", "Only an admin token")
    finally:
        bob.close()
    still_serves(gateway)  # carol's token was not revoked, no GPU drained
    assert "drain" not in gateway.bf("list_gpus").stdout.lower()
