"""The reply types and error codes of remoting.messages, and protocol versions on the wire."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from remoting import messages, protocol
from remoting.messages import ErrorCode, ReplyMismatch, check_reply
from remoting.protocol import ProtocolError

ROOT = Path(__file__).resolve().parents[2]

HELLO = {
    "server": "gpu1",
    "version": protocol.VERSION,
    "protocol": protocol.PROTOCOL_VERSION,
    "simulated": True,
    "sandbox": {"sandboxed": True, "refused": False, "line": "sandboxed"},
    "driver": None,
    "cuda": None,
    "mps": False,
    "kernels": ["python3"],
    "web_port": None,
    "user": "alice",
    "admin": False,
    "uptime_s": 1.5,
}


def test_every_request_has_a_reply_type():
    requests = {name for name, spec in protocol.MESSAGES.items() if spec.request}
    assert set(messages.REPLIES) == requests


def test_a_reply_that_matches_its_type_passes():
    check_reply("hello", HELLO)
    check_reply("release", {"released": "s-1"})


@pytest.mark.parametrize(
    "change, words",
    [
        ({"extra": 1}, "extra key"),  # a field no type names: drift between the two sides
        ({"uptime_s": "1.5"}, "uptime_s"),
        ({"sandbox": {"sandboxed": True, "line": "x"}}, "refused"),  # a nested key missing
        ({"kernels": ["python3", 3]}, "kernels"),  # every item, not only the first
    ],
)
def test_a_reply_that_drifted_is_named(change, words):
    with pytest.raises(ReplyMismatch, match=re.escape(words)):
        check_reply("hello", {**HELLO, **change})
    missing = {k: v for k, v in HELLO.items() if k != "user"}
    with pytest.raises(ReplyMismatch, match="user"):
        check_reply("hello", missing)


def test_error_codes_keep_their_wire_strings_and_old_names():
    assert protocol.E_NO_FIT is ErrorCode.NO_FIT and ErrorCode.NO_FIT == "no_fit"
    assert json.loads(json.dumps({"code": ErrorCode.AUTH})) == {"code": "auth"}


def test_no_error_code_is_compared_as_a_bare_string():
    literal = re.compile(r"""code\s*(==|!=)\s*["']|code in \(["']""")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("remoting", "gateway", "bitfusion_jupyter")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert found == []


def _header(**fields):
    return [protocol.MAGIC, json.dumps(fields).encode()]


ACK = {"type": "ack", "token": "t", "proc_id": "p", "seq": 1}


def test_a_peer_of_the_same_version_is_held_to_the_table():
    for version in ({}, {"protocol": protocol.PROTOCOL_VERSION}):  # absent means version 1
        with pytest.raises(ProtocolError, match="unknown fields"):
            protocol.decode(_header(**ACK, **version, future=1))


def test_fields_a_peer_of_another_version_added_are_dropped():
    for version in (protocol.PROTOCOL_VERSION + 1, protocol.PROTOCOL_VERSION + 7):
        msg = protocol.decode(_header(**ACK, protocol=version, future=1))
        assert msg["seq"] == 1 and "future" not in msg.header
    # what both versions know is still checked
    with pytest.raises(ProtocolError, match="lacks its 'seq'"):
        protocol.decode(_header(type="ack", token="t", proc_id="p", protocol=2))
    with pytest.raises(ProtocolError, match="must be int"):
        protocol.decode(_header(**{**ACK, "seq": "1"}, protocol=2))


@pytest.mark.parametrize("bad", [0, -1, "2", 1.5, True, None])
def test_a_protocol_field_that_is_not_a_version_is_refused(bad):
    with pytest.raises(ProtocolError, match="protocol version"):
        protocol.decode(_header(**ACK, protocol=bad))
