"""The wire protocol fuzzed against a live gateway (hypothesis), and in process (atheris), each
for a bounded time: the gateway never crashes or hangs, keeps serving a well-behaved client,
logs no traceback, and leaks no share."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.reporting import with_reporter

from gateway.spawned import stop_leftovers
from remoting import protocol
from remoting.client import GatewayConnection, GatewayError
from tests.support.env import REPO
from tests.support.gateways import start_gateway
from tests.support.waiting import WAIT_S
from tests.support.wire import RawClient, connect, still_serves

BUDGET_S = float(os.environ.get("BITFUSION_FUZZ_S", "12"))  # wall clock for the live fuzz
ATHERIS_S = int(os.environ.get("BITFUSION_ATHERIS_S", "10"))
QUIET_S = 0.15  # a batch's replies are in once the socket is this quiet (or after REPLIES_S)
REPLIES_S = 3.0

CLIENT_TYPES = sorted(t for t, s in protocol.MESSAGES.items() if s.authenticated)
OTHER_TYPES = sorted(t for t, s in protocol.MESSAGES.items() if not s.authenticated)
SHARE, PROC = "@share", "@proc"  # replaced by a real share or process id when sending

# --- values: the right kinds, with the odd ones in -------------------------------------------
odd_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "\x00", "\ud800", "x\udcff", "../../etc/passwd", "%s%n", "é" * 50]),
    st.text(min_size=2000, max_size=3000),
)
odd_int = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**100, -(10**100), 10**400]),
)
odd_num = st.one_of(odd_int, st.floats(allow_nan=True, allow_infinity=True))
json_any = st.recursive(
    st.one_of(st.none(), st.booleans(), odd_int, st.floats(), odd_text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
BY_KIND = {
    protocol.STR: odd_text,
    protocol.INT: odd_int,
    protocol.NUM: odd_num,
    protocol.BOOL: st.booleans(),
    protocol.LIST: st.lists(json_any, max_size=4),
    protocol.DICT: st.dictionaries(odd_text, json_any, max_size=4),
}
# Fields whose random values could do harm on this machine get values that cannot: no
# command but `true` or a missing program, no pid that is alive, no kernel that exists.
SAFE: dict[str, st.SearchStrategy[Any]] = {
    "argv": st.one_of(
        st.tuples(st.sampled_from(["true", "/no/such/program", "\x00", "\ud800"])).flatmap(
            lambda head: st.lists(odd_text, max_size=3).map(lambda t: [*head, *t])
        ),
        json_any,
    ),
    "pid": st.one_of(st.integers(max_value=1), st.integers(min_value=2**22 + 1)),
    "kernel": odd_text.filter(lambda k: k not in ("", "python3")),
    "wait_s": st.one_of(
        st.floats(min_value=-1, max_value=1),
        st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    ),
    "share_id": st.one_of(st.just(SHARE), odd_text),
    "proc_id": st.one_of(st.just(PROC), odd_text),
    "nonce": st.text(max_size=20),  # never a real token's: the well-behaved client stays valid
}


@dataclass
class Pool:
    """What the fuzzer may use: real tokens, and the shares and processes it was given."""

    tokens: list[str]
    shares: list[str] = field(default_factory=list)
    procs: list[str] = field(default_factory=list)


@st.composite
def message(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[bytes], bool]:
    """A message shaped like the protocol's: (type, header, payloads, fresh id?)."""
    msg_type = draw(st.sampled_from(CLIENT_TYPES + OTHER_TYPES + ["nope", ""]))
    spec = protocol.MESSAGES.get(msg_type, protocol.Spec())
    header: dict[str, Any] = {"type": msg_type}
    for name, kind in {**spec.required, **spec.optional}.items():
        if name in spec.optional and draw(st.booleans()):
            continue
        if draw(st.integers(0, 19)) == 0:  # a missing field, now and then
            continue
        wrong = draw(st.integers(0, 14)) == 0  # a field of the wrong kind
        header[name] = draw(SAFE.get(name, BY_KIND[kind]) if not wrong else json_any)
    if draw(st.integers(0, 14)) == 0:
        header[draw(st.text(min_size=1, max_size=8))] = draw(json_any)  # an unknown field
    low, high = spec.payloads
    if draw(st.integers(0, 9)):
        n = draw(st.integers(low, min(high, 3)))
    else:  # a wrong payload count, now and then
        n = draw(st.sampled_from([low - 1, high + 1] if low else [high + 1]))
    payloads = draw(st.lists(st.binary(max_size=256), min_size=n, max_size=n))
    return msg_type, header, payloads, draw(st.integers(0, 9)) > 0


def _specials(token: str) -> list[list[bytes]]:
    """Frames that break naive decoders: deep nesting, huge numbers, odd sizes and bytes."""
    deep = b"[" * 30000 + b"]" * 30000
    return [
        [protocol.MAGIC, deep],
        [protocol.MAGIC, b'{"type":"list_gpus","token":"t","id":1,"x":' + deep + b"}"],
        [protocol.MAGIC, b'{"type":"list_gpus","token":"t","id":' + b"9" * 5000 + b"}"],
        [protocol.MAGIC, b'{"type":"list_gpus","id":1,"token":"' + b"a" * 70000 + b'"}'],
        [protocol.MAGIC, b'{"type":"allocate","gpus":1,"id":3,"wait_s":NaN,"token":"x"}'],
        [protocol.MAGIC, b'{"type":"list_gpus","id":1e400,"token":"x"}'],
        [protocol.MAGIC, b"\xef\xbb\xbf{}", b"\xff\xfe"],
        [protocol.MAGIC, b'{"type":"list_gpus","type":"smi","token":"x","id":2}'],
        [protocol.MAGIC, b'{"type":"stdin","token":"x","proc_id":"\\ud800","seq":1}', b"x"],
        [protocol.MAGIC, json.dumps({"type": "kernel_in", "token": token}).encode()] + [b""] * 5000,
        [b""],
        [b"\x00" * 100_000],
    ]


frames_strategy = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=5).map(lambda f: ("raw", f)),
    st.binary(max_size=300).map(lambda h: ("raw", [protocol.MAGIC, h])),
    json_any.map(lambda v: ("raw", [protocol.MAGIC, json.dumps(v).encode()])),
    message().map(lambda m: ("msg", m)),
    message().map(lambda m: ("msg", m)),
    st.integers(0, 11).map(lambda i: ("special", i)),
)


class BudgetSpent(Exception):
    """The live fuzz's wall-clock budget is spent (hypothesis has no time limit of its own)."""


@dataclass
class Figures:
    batches: int = 0
    messages: int = 0
    replies: int = 0
    checks: int = 0  # times a well-behaved client was served between batches
    started: float = field(default_factory=time.monotonic)


def _frames(item: tuple[str, Any], pool: Pool, ids: list[int], draw_token: int) -> list[bytes]:
    kind, body = item
    if kind == "raw":
        return list(body)
    if kind == "special":
        return _specials(pool.tokens[0])[body]
    msg_type, header, payloads, fresh_id = body
    header = dict(header)
    if "token" in header and draw_token < len(pool.tokens):
        header["token"] = pool.tokens[draw_token]
    if "id" in header and fresh_id:
        ids[0] += 1
        header["id"] = ids[0]
    for key, known in (("share_id", pool.shares), ("proc_id", pool.procs)):
        if header.get(key) in (SHARE, PROC):
            header[key] = known[-1] if known else "none"
    return [protocol.MAGIC, json.dumps(header).encode(), *payloads]


def _collect(raw: RawClient, pool: Pool, figures: Figures) -> None:
    """Read replies until the socket is quiet; remember the shares and processes granted."""
    deadline = time.monotonic() + REPLIES_S
    while time.monotonic() < deadline and raw.sock.poll(int(QUIET_S * 1000)):
        msg = protocol.decode(raw.sock.recv_multipart())  # the gateway's own must decode
        figures.replies += 1
        data = (msg.get("data") or {}) if msg.type == "reply" else {}
        if isinstance(data.get("share"), dict):
            pool.shares.append(data["share"]["share_id"])
        if isinstance(data.get("proc_id"), str):
            pool.procs.append(data["proc_id"])


def test_fuzzed_messages_never_stop_the_gateway(gateway):
    pool = Pool(
        [
            gateway.token("fuzz"),
            gateway.token("fuzzadmin", admin=True),
            gateway.token("fuzz").replace(".fuzz.", ".fuzzy."),  # forged
        ]
    )
    figures = Figures()
    budget_end = time.monotonic() + BUDGET_S

    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: the batch that failed is printed as it was
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(st.tuples(frames_strategy, st.integers(0, 4)), min_size=5, max_size=30))
    def one_batch(batch: list[tuple[tuple[str, Any], int]]) -> None:
        if time.monotonic() > budget_end:
            raise BudgetSpent  # ends the run now: generating the examples left takes long
        raw = RawClient(gateway)
        ids = [0]
        try:
            for item, draw_token in batch:
                frames = _frames(item, pool, ids, draw_token)
                try:
                    raw.send(frames)
                except zmq.ZMQError:
                    continue  # a frame libzmq itself refuses to send is no test of ours
                figures.messages += 1
            _collect(raw, pool, figures)
        finally:
            raw.close()
        figures.batches += 1
        still_serves(gateway)  # alive, and it answers a well-behaved client's list_gpus
        figures.checks += 1

    said: list[str] = []  # hypothesis's report, shown only for a real failure
    try:
        with with_reporter(said.append):
            one_batch()
    except BudgetSpent:
        pass
    except BaseException:
        print("\n".join(said))
        raise
    wall = time.monotonic() - figures.started
    print(
        f"\nlive fuzz: {figures.batches} batches, {figures.messages} messages, "
        f"{figures.replies} replies, {figures.checks} well-behaved checks in {wall:.1f} s"
    )
    assert figures.batches >= 5, "the fuzz ran too few batches to mean anything"
    # Afterwards: no waiter stuck in the queue, no share left over (leases are 2 s here), and
    # no bug's traceback in the log.
    admin = connect(gateway, "root", admin=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while admin.request("list_gpus")["queued"]:
            assert time.monotonic() < deadline, "a fuzzed request is stuck in the queue"
            time.sleep(0.2)
    finally:
        admin.close()
    assert gateway.no_shares_within(WAIT_S), f"shares left over: {gateway.shares()}"
    log = gateway.log()
    errors = {ln for ln in log.splitlines() if re.match(r"\w+(Error|Exception)\b", ln)}
    assert "Traceback" not in log and "internal error" not in log, "\n".join(sorted(errors))
    still_serves(gateway)


@pytest.mark.parametrize(
    "header, words",
    [
        (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
        (b'{"type":"revoke","token":"t","id":1,"nonce":"\\ud800"}', "not Unicode text"),
        (b'{"type":"revoke","token":"t","id":1,"nonce":"\xed\xa0\x80"}', "not Unicode text"),
        (b'{"type":"list_gpus","token":"t","id":' + b"9" * 5000 + b"}", "not JSON"),
    ],
    ids=["deep", "surrogate-escape", "surrogate-bytes", "huge-int"],
)
def test_decode_refuses_headers_that_would_break_a_handler(header, words):
    """The nesting (live fuzz) and the surrogate escape (edge sweep) were found here: each got
    past decode() to a traceback in the gateway's log. Raw surrogate bytes decode the same way
    (json reads bytes with 'surrogatepass'); a huge int always was refused."""
    with pytest.raises(protocol.ProtocolError, match=words):
        protocol.decode([protocol.MAGIC, header])
    fine = b'{"type":"revoke","token":"t","id":1,"nonce":"\\u00e9\xc3\xa9\xed\x9f\xbf"}'
    assert protocol.decode([protocol.MAGIC, fine])["nonce"] == "\u00e9\u00e9\ud7ff"


# --- every field of every message, with the edge values of its kind ------------------------
EDGES: dict[str, list[Any]] = {
    protocol.STR: ["", "\x00", "\ud800", "x" * 60000, "../../etc/passwd", "é"],
    protocol.INT: [-1, 0, 2**31, 2**63, 10**100, 10**400, -(10**400)],
    protocol.NUM: [float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324, 10**400],
    protocol.BOOL: [True, False],
    protocol.LIST: [
        [],
        [[]],
        [None],
        ["x"] * 1000,
        [[[[[[]]]]]],
        [["p", 10**400]],
        ["\x00"],
        ["\ud800"],
    ],
    protocol.DICT: [{}, {"": None}, {"\ud800": "\x00"}, {"PATH": ""}, {"x": [1]}],
}
# Where the edge of a field would start a kernel or signal a live process, a value that
# cannot: the sweep must stay harmless to this machine.
NOT_THESE = {("kernel_start", "kernel"): ["", "python3"]}
LEASE_S = 5


def _base(msg_type: str, share: str) -> dict[str, Any]:
    """Good values for every required field, so each edge value is what gets tested."""
    good = {
        "share_id": share,
        "argv": ["true"],
        "pid": -1,
        "key": "k",
        "signature_scheme": "hmac-sha256",
        "kernel": "nope",  # no such kernel: kernel_start is refused before it starts one
        "kernel_id": "k-none",
        "channel": "shell",
        "range": "hour",
        "index": 0,
        "drain": False,
        "seconds": 0,
        "nonce": "not-a-real-nonce",
        "proc_id": "p-none",
        "out_from": 1,
        "seq": 1,
        "signum": 0,
        "gpus": 1,
    }
    spec = protocol.MESSAGES[msg_type]
    return {"type": msg_type, **{k: good[k] for k in spec.required if k in good}}


def test_every_field_takes_edge_values(tmp_path):
    """Each field of each client message, one edge value at a time, from a user and an admin,
    on a full pool (so allocate reaches its queue): every request is answered, none with a
    traceback in the log."""
    gw = start_gateway(tmp_path, "--simulate-gpus", "2x16GiB", "--lease-grace", str(LEASE_S))
    holder = connect(gw, "holder")
    admin = connect(gw, "root", admin=True)
    raw = RawClient(gw)
    sent = requests = 0
    fillers: list[str] = []
    try:
        for msg_type in CLIENT_TYPES:
            spec = protocol.MESSAGES[msg_type]
            _undo_admin_sweep(admin)
            fillers = _full_pool(holder, fillers)
            for tok in (gw.token("holder"), gw.token("edgeadmin", admin=True)):
                for name, kind in {**spec.required, **spec.optional}.items():
                    if name in ("token", "id"):
                        continue
                    for value in EDGES[kind]:
                        if value in NOT_THESE.get((msg_type, name), []):
                            continue
                        header = {**_base(msg_type, fillers[0]), "token": tok, name: value}
                        if spec.request:
                            requests += 1
                            header["id"] = requests
                        payloads = [b"x"] * spec.payloads[0]
                        raw.send([protocol.MAGIC, json.dumps(header).encode(), *payloads])
                        sent += 1
                        if spec.request:
                            _answered(raw, requests)  # no request goes unanswered
        _undo_admin_sweep(admin)
        for share_id in _full_pool(holder, fillers):
            holder.request("release", share_id=share_id)
    finally:
        raw.close()
        holder.close()
        admin.close()
    try:
        print(f"\nedge sweep: {sent} messages, {requests} requests, each answered")
        assert gw.no_shares_within(LEASE_S * 6), f"shares left over: {gw.shares()}"
        log = gw.log()
        errors = {ln for ln in log.splitlines() if re.match(r"\w+(Error|Exception)\b", ln)}
        assert "Traceback" not in log and "internal error" not in log, "\n".join(sorted(errors))
        still_serves(gw)
    finally:
        gw.kill(signal.SIGTERM)
        stop_leftovers(gw.state_dir)


def test_a_wait_that_is_no_number_of_seconds_is_refused(gateway):
    """NaN (found in review) made a waiter that never timed out, holding the queue's head and
    every later request behind it; a huge int (found by the edge sweep) raised OverflowError."""
    holder = connect(gateway, "holder")
    raw = RawClient(gateway)
    tok = gateway.token("holder")
    try:
        for _ in range(2):  # a full pool, so a request has to wait
            holder.request("allocate", gpus=1)
        for i, wait in enumerate((float("nan"), float("inf"), 10**400), start=1):
            reply = raw.request(protocol.encode("allocate", token=tok, id=i, gpus=1, wait_s=wait))
            assert reply["code"] == protocol.E_BAD_REQUEST
            assert reply["error"] == "--wait takes a number of seconds."
        assert holder.request("list_gpus")["queued"] == 0
    finally:
        raw.close()
        holder.close()
    still_serves(gateway)


def _undo_admin_sweep(admin: GatewayConnection) -> None:
    """Put back what the admin's edge values may have set: an idle timeout, drained GPUs."""
    admin.request("set_idle_timeout", seconds=0)
    for index in (0, 1):
        admin.request("drain", index=index, drain=False)


def _full_pool(holder: GatewayConnection, fillers: list[str]) -> list[str]:
    """Two whole-GPU shares that fill the pool, renewed, or taken anew where one ended."""
    kept = []
    for share_id in fillers:
        try:
            holder.request("renew", share_id=share_id)
            kept.append(share_id)
        except GatewayError:  # released by the sweep itself (an idle timeout of 5e-324 s)
            pass
    while len(kept) < 2:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                kept.append(holder.request("allocate", gpus=1)["share"]["share_id"])
                break
            except GatewayError:  # the queue ahead of us (a sweep's waiter) still holds it
                assert time.monotonic() < deadline, "the pool did not free up"
                time.sleep(0.2)
    return kept


def _answered(raw: RawClient, msg_id: int) -> int:
    """1 once request ``msg_id`` has its reply (or, for a queued allocate, its place)."""
    deadline = time.monotonic() + WAIT_S
    while raw.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        msg = protocol.decode(raw.sock.recv_multipart())
        if msg.type in ("reply", "queued") and msg["id"] == msg_id:
            return 1
    raise AssertionError(f"request {msg_id} got no answer within {WAIT_S:g} s")


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (python3 -m pip install atheris); the hypothesis fuzz "
    "above still runs",
)
def test_atheris_fuzz_of_decode_and_handle(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.security.fuzz_target",
            f"-max_total_time={ATHERIS_S}",
            "-timeout=30",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=ATHERIS_S + 120,
    )
    assert r.returncode == 0, r.stderr[-6000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", r.stderr)
    assert done, r.stderr[-3000:]
    print(f"\natheris: {done.group(1)} runs in {done.group(2)} s")
