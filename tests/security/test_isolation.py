"""One user against another's share, process and kernel: every attempt is refused (requests)
or dropped (one-way messages), has no effect on the victim, and is logged; the admin may."""

from __future__ import annotations

import signal
import sys
import time
import uuid

import pytest
from jupyter_client.session import Session

from gateway import kernels, landlock
from remoting import protocol
from remoting.client import GatewayConnection, GatewayError
from tests.support.gateways import long_lease_gateway
from tests.support.waiting import WAIT_S, wait_for_log
from tests.support.wire import connect, still_serves

# Prints a line, then echoes each stdin line: its output shows whose input reached it.
ECHO = (
    "import sys\n"
    "print('alice-secret', flush=True)\n"
    "for line in sys.stdin:\n"
    "    print('got', line.strip(), flush=True)\n"
)


@pytest.fixture
def gateway(gateway_factory):
    return long_lease_gateway(gateway_factory)


def _lines_until(conn: GatewayConnection, want: str, timeout: float = WAIT_S) -> list[str]:
    """The output lines of ``conn``'s processes, read until one holds ``want`` (acking them)."""
    text = ""  # output comes in chunks, not lines
    deadline = time.monotonic() + timeout
    while want not in text:
        msg = conn.receive(max(0.0, deadline - time.monotonic()))
        assert msg is not None, f"no {want!r} within {timeout:g} s; got {text!r}"
        if msg.type == "out":
            text += protocol.as_bytes(msg.payloads[0]).decode()
            conn.send("ack", proc_id=msg["proc_id"], seq=msg["seq"])
        elif msg.type == "exit":
            text += f"\n<exit {msg['code']}>\n"
    return text.splitlines()


def _nothing_for(conn: GatewayConnection, seconds: float) -> list[str]:
    """The types of whatever ``conn`` receives within ``seconds`` (it should be nothing)."""
    got = []
    deadline = time.monotonic() + seconds
    while (msg := conn.receive(max(0.0, deadline - time.monotonic()))) is not None:
        got.append(msg.type)
    return got


def _alices_process(gateway) -> tuple[GatewayConnection, str, str]:
    alice = connect(gateway, "alice")
    share = alice.request("allocate", gpus=1, mib=1024)["share"]["share_id"]
    proc = alice.request("spawn", share_id=share, argv=[sys.executable, "-c", ECHO])["proc_id"]
    assert "alice-secret" in _lines_until(alice, "alice-secret")
    return alice, share, proc


def test_a_user_cannot_touch_anothers_share_or_process(gateway):
    alice, share, proc = _alices_process(gateway)
    bob = connect(gateway, "bob")
    try:
        # Requests: someone else's share looks exactly like a missing one.
        for kind, fields in (
            ("release", {}),
            ("renew", {}),
            ("spawn", {"argv": ["sh", "-c", "echo owned"]}),
            ("kernel_start", {"key": "k", "signature_scheme": "hmac-sha256"}),
        ):
            with pytest.raises(GatewayError) as err:
                bob.request(kind, share_id=share, **fields)
            assert err.value.code == protocol.E_NOT_FOUND
            assert str(err.value) == (
                f"No share {share} of yours is held on {gateway.address} (gpuhost); it may "
                "have been released or its lease may have expired."
            )
        # One-way messages: dropped. Read the output, write stdin, close it, kill, ack it away.
        bob.send("attach", proc_id=proc, out_from=1)
        bob.send("stdin", [b"bob-was-here\n"], proc_id=proc, seq=1)
        bob.send("stdin_close", proc_id=proc, seq=2)
        bob.send("signal", proc_id=proc, signum=int(signal.SIGKILL))
        bob.send("ack", proc_id=proc, seq=10**6)
        # ... and through a renew of a share of his own, re-subscribing to alice's process.
        own = bob.request("allocate", gpus=1, mib=512)["share"]["share_id"]
        bob.request("renew", share_id=own, attach=[[proc, 1]])
        assert _nothing_for(bob, 2.0) == []  # not a line of alice's output
        # Alice's process runs on, reads her stdin (her seq 1 was not used up by bob's), and
        # never saw bob's.
        alice.send("stdin", [b"from-alice\n"], proc_id=proc, seq=1)
        lines = _lines_until(alice, "got from-alice")
        assert not any("bob" in ln or "<exit" in ln for ln in lines), lines
        shares = {s["share_id"]: s for s in gateway.shares()}
        assert [p["proc_id"] for p in shares[share]["processes"]] == [proc]
        bob.request("release", share_id=own)
    finally:
        bob.close()
    for what in ("release", "renew", "spawn", "kernel_start"):
        wait_for_log(gateway, f"refused {what} from user bob", "No share")
    wait_for_log(gateway, f"refused user bob on share {share} of alice")
    wait_for_log(gateway, f"refused user bob on process {proc} of alice (dropped)")
    # The admin token may do all of it: read the output, write stdin, stop the process,
    # release the share.
    admin = connect(gateway, "root", admin=True)
    try:
        assert admin.request("hello")["admin"]  # connected: one-way messages leave at once
        admin.send("attach", proc_id=proc, out_from=1)
        admin.send("stdin", [b"from-admin\n"], proc_id=proc, seq=2)
        assert "got from-admin" in _lines_until(admin, "got from-admin")
        admin.send("signal", proc_id=proc, signum=int(signal.SIGTERM))
        assert any(ln.startswith("<exit") for ln in _lines_until(admin, "<exit"))
        assert admin.request("release", share_id=share) == {"released": share}
    finally:
        admin.close()
        alice.close()
    assert gateway.no_shares_within(WAIT_S)
    still_serves(gateway)


def test_the_output_of_an_ended_process_stays_its_owners(gateway):
    """A process that has exited keeps its output until its owner acks it; nobody else may
    read it meanwhile (nor ack it away)."""
    alice = connect(gateway, "alice")
    bob = connect(gateway, "bob")
    try:
        share = alice.request("allocate", gpus=1, mib=1024)["share"]["share_id"]
        proc = alice.request("spawn", share_id=share, argv=["echo", "alice-secret"])["proc_id"]
        # Alice reads to the exit but acks nothing: the output waits in the nanny.
        seen: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while "exit" not in seen:
            msg = alice.receive(max(0.0, deadline - time.monotonic()))
            assert msg is not None, f"the process did not end: {seen}"
            seen.append(msg.type)
        bob.send("attach", proc_id=proc, out_from=1)
        bob.send("ack", proc_id=proc, seq=10**6)
        assert _nothing_for(bob, 2.0) == []
        alice.send("attach", proc_id=proc, out_from=1)  # still all there for alice
        assert "alice-secret" in _lines_until(alice, "<exit 0>")
        alice.request("release", share_id=share)
    finally:
        alice.close()
        bob.close()
    wait_for_log(gateway, f"refused user bob on process {proc} of alice (dropped)")
    still_serves(gateway)


def _kernel_request(session: Session, msg_type: str) -> list[bytes]:
    return session.serialize(session.msg(msg_type, {}))


def _kernel_reply(conn: GatewayConnection, timeout: float = 60.0) -> str:
    """The msg_type of the next shell message from the kernel."""
    deadline = time.monotonic() + timeout
    while True:
        msg = conn.receive(max(0.0, deadline - time.monotonic()))
        assert msg is not None, "the kernel did not answer"
        if msg.type == "kernel_out" and msg["channel"] == "shell":
            frames = [protocol.as_bytes(f) for f in msg.payloads]
            return Session().unpack(frames[frames.index(b"<IDS|MSG>") + 2])["msg_type"]


def test_a_user_cannot_drive_or_hijack_anothers_kernel(gateway):
    alice = connect(gateway, "alice")
    bob = connect(gateway, "bob")
    key = uuid.uuid4().hex
    session = Session(key=key.encode(), signature_scheme="hmac-sha256")
    frontend = b"alice-frontend".hex()
    try:
        share = alice.request("allocate", gpus=1, mib=1024)["share"]["share_id"]
        started = alice.request(
            "kernel_start", share_id=share, key=key, signature_scheme="hmac-sha256", timeout=60
        )
        kernel = started["kernel_id"]
        frames = _kernel_request(session, "kernel_info_request")
        alice.send("kernel_in", frames, kernel_id=kernel, channel="shell", ident=frontend)
        assert _kernel_reply(alice) == "kernel_info_reply"
        # Bob writes to alice's kernel: dropped before it reaches the kernel, and alice's
        # kernel output does not move to bob's connection.
        forged = _kernel_request(Session(key=b"guess", signature_scheme="hmac-sha256"), "x")
        for channel in ("shell", "control", "stdin"):
            bob.send("kernel_in", forged, kernel_id=kernel, channel=channel, ident=frontend)
        # The owner's own odd input (a frontend id libzmq cannot take) is dropped, not a crash.
        alice.send("kernel_in", forged, kernel_id=kernel, channel="shell", ident="ab" * 300)
        again = _kernel_request(session, "kernel_info_request")  # the kernel refuses replays
        alice.send("kernel_in", again, kernel_id=kernel, channel="shell", ident=frontend)
        assert _kernel_reply(alice) == "kernel_info_reply"
        assert _nothing_for(bob, 1.0) == []
        alice.request("release", share_id=share)
    finally:
        alice.close()
        bob.close()
    wait_for_log(gateway, f"refused user bob on kernel {kernel} of share {share} (dropped)")
    assert "Traceback" not in gateway.log()
    still_serves(gateway)


# Code in bob's share that listens to a kernel's output channel, as anyone's code could try.
EAVESDROP = (
    "import sys, time, zmq\n"
    "sub = zmq.Context().socket(zmq.SUB)\n"
    "sub.setsockopt(zmq.SUBSCRIBE, b'')\n"
    "sub.connect(sys.argv[1])\n"
    "print('listening', flush=True)\n"
    "heard, end = 0, time.monotonic() + float(sys.argv[2])\n"
    "while time.monotonic() < end:\n"
    "    if sub.poll(100):\n"
    "        heard += b'alice-secret' in b''.join(sub.recv_multipart())\n"
    "print('heard', heard, flush=True)\n"
)


@pytest.fixture(params=["auto", "curve"])
def channels_gateway(request, gateway_factory):
    """A gateway per way of keeping kernels' channels from other shares: "auto" gives
    ipykernel unix sockets that Landlock scopes to the share, "curve" CurveZMQ on TCP."""
    if request.param == "auto" and landlock.abi() < kernels.SCOPED_UNIX_ABI:
        pytest.skip(f"this Linux has no Landlock ABI {kernels.SCOPED_UNIX_ABI} to scope sockets")
    return long_lease_gateway(gateway_factory, "--kernel-channels", request.param)


def test_code_in_another_share_cannot_listen_to_a_kernel(channels_gateway):
    # Code in every share can reach the server's loopback and its unix sockets. A kernel's
    # channels are either abstract unix sockets that Landlock lets only the kernel's own
    # share (and the gateway) connect to, or loopback ports encrypted with a key pair only
    # the kernel's connection file holds: bob's listener hears nothing of what alice's
    # kernel prints, while the control listener (outside any share, with the keys) does.
    import json

    import zmq

    gateway = channels_gateway
    alice, bob = connect(gateway, "alice"), connect(gateway, "bob")
    key = uuid.uuid4().hex
    session = Session(key=key.encode(), signature_scheme="hmac-sha256")
    control = zmq.Context.instance().socket(zmq.SUB)
    try:
        share = alice.request("allocate", gpus=1, mib=1024)["share"]["share_id"]
        started = alice.request(
            "kernel_start", share_id=share, key=key, signature_scheme="hmac-sha256", timeout=60
        )
        frontend = b"alice-frontend".hex()
        alice.send(
            "kernel_in",
            _kernel_request(session, "kernel_info_request"),
            kernel_id=started["kernel_id"],
            channel="shell",
            ident=frontend,
        )
        assert _kernel_reply(alice) == "kernel_info_reply"
        kernel_id = started["kernel_id"]
        conn_file = gateway.state_dir / "run" / "kernels" / kernel_id / f"kernel-{kernel_id}.json"
        info = json.loads(conn_file.read_text())
        assert info["transport"] == ("ipc" if gateway.args[-1] == "auto" else "tcp")
        if "curve_publickey" in info:
            public, secret = info["curve_publickey"].encode(), info["curve_secretkey"].encode()
            control.curve_serverkey = control.curve_publickey = public
            control.curve_secretkey = secret
        control.setsockopt(zmq.SUBSCRIBE, b"")
        iopub = protocol.jupyter_endpoint(info, "iopub")
        control.connect(iopub)

        own = bob.request("allocate", gpus=1, mib=512)["share"]["share_id"]
        argv = [sys.executable, "-c", EAVESDROP, iopub, "8"]
        bob.request("spawn", share_id=own, argv=argv)
        assert "listening" in _lines_until(bob, "listening")
        time.sleep(0.5)  # both subscriptions settle
        code = "import time\nfor i in range(40):\n    print('alice-secret', i)\n    time.sleep(0.1)"
        execute = session.msg("execute_request", {"code": code, "silent": False})
        alice.send(
            "kernel_in",
            session.serialize(execute),
            kernel_id=started["kernel_id"],
            channel="shell",
            ident=frontend,
        )
        heard_by_control = 0
        deadline = time.monotonic() + WAIT_S
        while not heard_by_control and time.monotonic() < deadline:
            if control.poll(200):
                heard_by_control += b"alice-secret" in b"".join(control.recv_multipart())
        assert heard_by_control, "the control listener, which holds the keys, heard nothing"
        heard = [ln for ln in _lines_until(bob, "<exit") if ln.startswith("heard")]
        assert heard == ["heard 0"], "code in bob's share read alice's kernel's output"
        alice.request("release", share_id=share)
        bob.request("release", share_id=own)
    finally:
        control.close(0)
        alice.close()
        bob.close()
    still_serves(gateway)
