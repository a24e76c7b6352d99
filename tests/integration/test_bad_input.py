"""Bad input: one clear sentence, a non-zero exit, no traceback, nothing leaked."""

import json
import socket
import subprocess
import sys
import time

import pytest
import zmq

from gateway.spawned import free_port
from remoting import protocol
from tests.support.processes import PRINTS_ITS_PID, host_pid


def _clean(r, code=None):
    assert r.returncode != 0
    if code is not None:
        assert r.returncode == code
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    return lines[-1]


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "-n", "0", "--", "true"], "-n 0 asks for no GPU"),
        (["run", "-p", "1.5", "--", "true"], "-p 1.5 is outside (0, 1]"),
        (["run", "-p", "0", "--", "true"], "outside (0, 1]"),
        (["run", "-m", "0", "--", "true"], "-m 0 is not a size"),
        (["run", "-m", "2048", "-p", "0.5", "--", "true"], "not allowed with"),
        (["run", "-n", "1"], "No command given"),
        (["run", "-n", "1", "--"], "No command given"),
        (["run", "--filter", "colour=blue", "--", "true"], "is not understood"),
        (["run", "-n", "3", "--", "true"], "asks for 3 GPUs and this server has 2"),
        (["run", "-m", "99999", "--", "true"], "largest GPU here has 16384 MiB"),
        (["run", "-m", "1024", "--", "/no/such/program"], "cannot run '/no/such/program'"),
    ],
)
def test_bad_share_options(gateway, args, words):
    r = gateway.bf(*args)
    assert words in _clean(r)
    assert '"shares": []' in gateway.bf("list_shares", "--json").stdout  # nothing leaked


@pytest.mark.parametrize(
    "args, line",
    [
        (["run", "-m", "1e9", "--", "true"], "bitfusion run: -m '1e9' is not a whole number"),
        (["run", "-m", "2048", "-p", "0.5", "--", "true"], "bitfusion run: -p is not allowed"),
        (["nosuch"], "bitfusion: 'nosuch' is not a bitfusion command"),
        (["--timeout", "x", "list_gpus"], "bitfusion: --timeout 'x' is not a number"),
        (["gateway", "--police", "maybe"], "bitfusion gateway: --police 'maybe' is not one of"),
        # An unknown option is the command's mistake, so its --help is the one to read.
        (["list_gpus", "--bogus"], "bitfusion list_gpus: unrecognized arguments: --bogus"),
        (["local", "-l", "gpu1", "--", "true"], "bitfusion local: -l chooses among remote"),
    ],
)
def test_a_usage_mistake_is_one_line_that_says_where_to_read_more(args, line):
    r = subprocess.run(
        [sys.executable, "-m", "bitfusion_jupyter", *args], capture_output=True, text=True
    )
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr  # no usage block
    assert r.stderr.startswith(line), r.stderr
    prog = line.split(":")[0]
    assert r.stderr.endswith(f"; see '{prog} --help'.\n")


def test_unreachable_server_is_named_quickly(gateway):
    port = free_port()
    start = time.monotonic()
    r = gateway.bf("--timeout", "2", "list_gpus", "-l", f"127.0.0.1:{port}")
    line = _clean(r)
    assert f"127.0.0.1:{port}" in line and "connection refused" in line
    assert time.monotonic() - start < 15


def test_unknown_host_is_named(gateway):
    r = gateway.bf("list_gpus", "-l", "no-such-host.invalid")
    assert "does not resolve" in _clean(r)


def test_wrong_token_is_refused(gateway, tmp_path):
    from tests.support.gateways import start_gateway

    other = start_gateway(tmp_path / "other", "--simulate-gpus", "1x8GiB")
    try:
        # A token of another pool: its server key does not match this gateway.
        env = gateway.env(BITFUSION_TOKEN=other.token("alice"))
        # Said once the gateway has turned the key down a few times, not after the timeout.
        started = time.monotonic()
        r = gateway.bf("--timeout", "60", "list_gpus", env=env)
        assert "server key does not match" in _clean(r)
        assert time.monotonic() - started < 30, "waited for the whole timeout"
        # health: the server is there (it answered the handshake), the token is refused.
        [row] = json.loads(gateway.bf("--timeout", "2", "health", "--json", env=env).stdout)
        assert row["reachable"] is True and row["token_accepted"] is False
    finally:
        other.kill()
    tok = gateway.token("alice")
    parts = tok.split(".")
    parts[4] = "A" * len(parts[4])  # right server key, forged signature
    r = gateway.bf("list_gpus", env=gateway.env(BITFUSION_TOKEN=".".join(parts)))
    assert "does not accept this token" in _clean(r)
    r = gateway.bf("list_gpus", env=gateway.env(BITFUSION_TOKEN="hello"))
    assert "not a bitfusion token" in _clean(r)


def test_revoked_token_is_refused(gateway):
    tok = gateway.token("eve")
    assert gateway.bf("list_gpus", user="eve").returncode == 0
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "token",
            "revoke",
            tok,
            "--state-dir",
            str(gateway.state_dir),
        ],
        check=True,
        capture_output=True,
    )
    assert "revoked" in _clean(gateway.bf("list_gpus", user="eve"))


def test_malformed_servers_conf_names_file_and_line(gateway, tmp_path):
    env = gateway.env()
    del env["BITFUSION_SERVERS"]
    conf = tmp_path / "client-alice" / "servers.conf"
    conf.write_text(f"# ok\n{gateway.address}\ngpu2:port\n")
    line = _clean(gateway.bf("list_gpus", env=env))
    assert f"{conf}, line 3" in line


def test_no_servers_configured(gateway):
    env = gateway.env()
    del env["BITFUSION_SERVERS"]
    assert "No servers are configured" in _clean(gateway.bf("list_gpus", env=env))


def test_hostile_messages_do_not_stop_the_gateway(gateway):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    tok = gateway.token("mallory")
    from remoting import tokens

    sock.curve_serverkey = tokens.parse(tok).server_public_z85
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(f"tcp://{gateway.address}")
    for frames in (
        [b"garbage"],
        [protocol.MAGIC, b"{not json"],
        [protocol.MAGIC, b'{"id": 7}'],
        [protocol.MAGIC, b'{"type":"allocate","token":"x","id":8,"gpus":"many"}'],
        [protocol.MAGIC, b'{"type":"reply","id":1,"ok":true}'],
    ):
        sock.send_multipart(frames)
    # A malformed request with an id gets an answer instead of silence.
    assert sock.poll(5000)
    reply = protocol.decode(sock.recv_multipart())
    assert reply.type == "reply" and not reply["ok"] and reply["code"] == "bad_request"
    sock.close(0)
    ctx.term()
    # Raw TCP junk (no CurveZMQ handshake) too.
    with socket.create_connection(("127.0.0.1", gateway.port)) as raw:
        raw.sendall(b"\x00" * 5000 + b"GET / HTTP/1.0\r\n\r\n")
    assert gateway.bf("list_gpus").returncode == 0
    assert gateway.proc.poll() is None
    assert "malformed" in gateway.log()


def test_one_user_cannot_touch_anothers_share(gateway):
    env_a = gateway.env("alice", BITFUSION_SESSION="alice-own")
    r = gateway.bf("request_gpus", "-m", "1000", env=env_a)
    assert r.returncode == 0, r.stderr
    share_id = r.stdout.split("share ")[1].split()[0]
    from remoting import tokens
    from remoting.client import GatewayConnection, GatewayError

    conn = GatewayConnection(gateway.address, tokens.parse(gateway.token("bob")))
    try:
        for kind in ("release", "renew"):
            with pytest.raises(GatewayError, match=f"No share {share_id} of yours"):
                conn.request(kind, share_id=share_id)
        with pytest.raises(GatewayError, match="of yours"):
            conn.request("spawn", share_id=share_id, argv=["true"])
    finally:
        conn.close()
    assert gateway.bf("release_gpus", env=env_a).returncode == 0


def test_gateway_refuses_a_bad_simulate_spec(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "--simulate-gpus",
            "2x16TB",
            "--state-dir",
            str(tmp_path),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "2x16GiB" in r.stderr


def test_a_user_cannot_claim_another_shares_process(gateway):
    """register_pid (used by `bitfusion local`) must not let bob adopt alice's process, which
    the gateway would then signal when bob's share ends."""
    from remoting import tokens
    from remoting.client import GatewayConnection, GatewayError

    alice = gateway.bf_background(
        "run",
        "-m",
        "512",
        "--",
        sys.executable,
        "-c",
        f"{PRINTS_ITS_PID}\nimport time; time.sleep(60)",
    )
    victim = host_pid(alice.stdout.readline())
    conn = GatewayConnection(gateway.address, tokens.parse(gateway.token("bob")))
    try:
        share = conn.request("allocate", gpus=1, mib=512)["share"]["share_id"]
        for pid in (victim, 1, gateway.proc.pid):
            with pytest.raises(GatewayError, match=f"Process {pid} cannot join"):
                conn.request("register_pid", share_id=share, pid=pid)
        conn.request("release", share_id=share)
    finally:
        conn.close()
    assert alice.poll() is None  # alice's command is untouched
    alice.kill()
    alice.wait()
