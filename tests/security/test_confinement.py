"""Code in a share cannot reach the gateway's state directory, though it runs as the
gateway's Unix user: the keys, the admin token, the ledger and other users' kernel
connection files stay out of reach, and it cannot signal the gateway (Linux Landlock)."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from gateway import sandbox
from gateway.spawned import stop_leftovers
from tests.conftest import start_gateway

needs_landlock = pytest.mark.skipif(
    sandbox.abi() < 1, reason="this kernel has no Landlock; the gateway says so at start"
)

# Walks STATE_DIR from inside a share and reports which files it could read.
PROBE = """
import json, os, sys
readable, denied = [], []
for top, dirs, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(top, name)
        try:
            with open(path, "rb") as f:
                f.read(1)
            readable.append(os.path.relpath(path, sys.argv[1]))
        except OSError:
            denied.append(os.path.relpath(path, sys.argv[1]))
print(json.dumps({"readable": readable, "denied": denied}))
"""


@needs_landlock
def test_a_share_reads_nothing_of_the_state_directory_but_usage_figures(gateway):
    # A kernel of another user, so its connection file (HMAC key) exists to be protected.
    bob = gateway.bf_background("run", "-m", "1024", "--", "sleep", "30", user="bob")
    try:
        r = gateway.bf("run", "-m", "1024", "--", sys.executable, "-c", PROBE,
                       str(gateway.state_dir), user="mallory")  # fmt: skip
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)
        denied = set(seen["denied"])
        assert {"admin.token", "keys/token.secret", "keys/server.curve"} <= denied
        assert "ledger.sqlite3" in denied
        assert any(p.startswith("run/") for p in denied)  # nannies' status files, bob's logs
        assert all(p.startswith(("usage/", "simulated-usage/")) for p in seen["readable"])
        cat = gateway.bf("run", "--", "cat", str(gateway.state_dir / "admin.token"))
        assert cat.returncode != 0 and "Permission denied" in cat.stderr
        assert "bf1." not in cat.stdout
    finally:
        bob.kill()
        bob.communicate()


@needs_landlock
def test_a_share_cannot_signal_the_gateway(gateway):
    if sandbox.abi() < 6:
        pytest.skip("signal scoping needs Landlock ABI 6 (Linux 6.12)")
    r = gateway.bf("run", "--", "kill", "-TERM", str(gateway.proc.pid), user="mallory")
    assert r.returncode != 0 and "not permitted" in r.stderr
    assert gateway.bf("list_gpus").returncode == 0  # still serving


@needs_landlock
def test_a_notebook_kernel_starts_confined(gateway, monkeypatch):
    # The kernel reads its own connection file inside STATE_DIR, and nothing else there.
    from tests.integration.conftest import point_client_at, start_shim_kernel

    point_client_at(gateway, monkeypatch)
    km, kc = start_shim_kernel("-m", "1024")
    try:
        kc.wait_for_ready(timeout=60)
        outputs = []
        reply = kc.execute_interactive(
            f"open({str(gateway.state_dir / 'admin.token')!r}).read()",
            timeout=60,
            output_hook=outputs.append,
        )
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "PermissionError"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_an_unconfined_gateway_says_so(tmp_path):
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB", "--unconfined")
    try:
        assert "shares: NOT confined (--unconfined)" in gw.log()
        r = gw.bf("run", "--", "cat", str(gw.state_dir / "admin.token"))
        assert r.returncode == 0 and r.stdout.startswith("bf1.a.")  # what the flag means
    finally:
        gw.kill(signal.SIGTERM)
        stop_leftovers(gw.state_dir)


@needs_landlock
def test_a_state_dir_inside_the_workdir_leaves_shares_free_to_save_files(tmp_path):
    # Confining would stop shares making files in their own working directory, so the
    # gateway runs them unconfined and says why and what to change.
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB", "--workdir", str(tmp_path))
    try:
        assert f"NOT confined: the state directory {gw.state_dir} is inside" in gw.log()
        r = gw.bf("run", "--", "sh", "-c", "echo saved > model.txt")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "model.txt").read_text() == "saved\n"
    finally:
        gw.kill(signal.SIGTERM)
        stop_leftovers(gw.state_dir)
