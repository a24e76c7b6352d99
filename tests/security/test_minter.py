"""A minter token (a JupyterHub's): it mints users' tokens that expire and revokes tokens,
and can do nothing else, on a real gateway. What a user would notice: the tokens it hands
out work like any user's, end when revoked, and the minter itself reaches no share."""

from __future__ import annotations

import sys
import time

import pytest

from remoting import tokens
from remoting.client import GatewayConnection, GatewayError
from tests.support.waiting import WAIT_S


def _minter(gateway) -> GatewayConnection:
    text = gateway.token("jupyterhub", minter=True)
    tok = tokens.parse(text)
    assert tok.minter and not tok.admin
    return GatewayConnection(gateway.address, tok, WAIT_S)


def test_a_minted_token_works_as_its_users_until_revoked(gateway):
    hub = _minter(gateway)
    try:
        minted = hub.request("mint", user="dora", expires_s=3600)
        assert (minted["user"], minted["admin"]) == ("dora", False)
        assert time.time() + 3500 < minted["expires"] <= time.time() + 3600
        r = gateway.bf(
            "run", "--no-files", "-m", "1024", "--", sys.executable, "-c",
            "import os; print(os.environ['BITFUSION_MEMORY_MIB'])",
            env={**gateway.env("dora"), "BITFUSION_TOKEN": minted["token"]},
        )  # fmt: skip
        assert r.returncode == 0 and r.stdout.strip() == "1024", r.stderr
        hub.request("revoke", nonce=tokens.parse(minted["token"]).nonce)
        r = gateway.bf("list_gpus", env={**gateway.env("dora"), "BITFUSION_TOKEN": minted["token"]})
        assert r.returncode != 0 and "revoked" in r.stderr and "Traceback" not in r.stderr
    finally:
        hub.close()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"user": "dora"}, "must expire"),  # nothing it hands out lives for ever
        ({"user": "dora", "expires_s": 60, "admin": True}, "users' tokens only"),
        ({"user": "not a name", "expires_s": 60}, "is not allowed"),
        ({"user": "dora", "expires_s": -1}, "expires_s is a number of seconds"),
    ],
)
def test_a_minter_mints_only_users_tokens_that_expire(gateway, fields, words):
    hub = _minter(gateway)
    try:
        with pytest.raises(GatewayError, match=words):
            hub.request("mint", **fields)
    finally:
        hub.close()


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("list_gpus", {}),
        ("list_shares", {}),
        ("allocate", {"gpus": 1, "mib": 1024}),
        ("drain", {"index": 0, "drain": True}),
    ],
)
def test_a_minter_reaches_no_share_and_sees_no_one(gateway, kind, fields):
    hub = _minter(gateway)
    try:
        assert hub.request("hello")["user"] == "jupyterhub"
        with pytest.raises(GatewayError, match="only mints and revokes users' tokens") as refused:
            hub.request(kind, **fields)
        assert refused.value.code == "denied"
        assert gateway.shares() == []
    finally:
        hub.close()


def test_only_an_admin_or_a_minter_mints(gateway):
    user = GatewayConnection(gateway.address, tokens.parse(gateway.token("erin")), WAIT_S)
    admin = GatewayConnection(gateway.address, tokens.parse(gateway.token("root", True)), WAIT_S)
    try:
        with pytest.raises(GatewayError, match="Only an admin token may mint a token"):
            user.request("mint", user="erin", expires_s=60)
        made = admin.request("mint", user="ops", admin=True)  # an admin's may last
        assert made["admin"] and made["expires"] is None
    finally:
        user.close()
        admin.close()
