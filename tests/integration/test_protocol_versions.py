"""A pool upgraded one machine at a time: a client and a gateway of different protocol
versions still work together for the messages both know, and only then.

The newer peer is today's code run through tests/integration/newer_protocol.py: it speaks
PROTOCOL_VERSION + 1 and sends an optional field of its own in hello, allocate, list_gpus,
renew (client) or in every reply and in out and exit (gateway).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.env import CLI, REPO
from tests.support.gateways import start_gateway

NEWER = [sys.executable, "-m", "tests.integration.newer_protocol"]
RUN = ["run", "-n", "1", "-m", "1024", "--no-files", "--"]
PRINT_MIB = [sys.executable, "-c", "import os; print(os.environ['BITFUSION_MEMORY_MIB'])"]


def _cli(gw, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=gw.env("alice"), cwd=REPO
    )


def test_a_newer_client_works_with_todays_gateway(tmp_path):
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB")
    try:
        r = _cli(gw, [*NEWER, *CLI, "list_gpus", "--json"])
        assert r.returncode == 0, r.stderr
        [server] = json.loads(r.stdout)
        assert server["data"]["protocol"] == 1  # today's gateway says its own version
        r = _cli(gw, [*NEWER, *CLI, *RUN, *PRINT_MIB])
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1024"
        assert "speaks protocol 2, this gateway 1: fields it adds are ignored" in gw.log()
        assert gw.shares() == []  # released as usual
    finally:
        gw.kill()


def test_todays_client_works_with_a_newer_gateway(tmp_path):
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB")
    gw.kill()
    gw.prefix = NEWER  # the same state dir and port, now the next version's gateway
    gw.start()
    try:
        r = gw.bf("list_gpus", "--json")
        assert r.returncode == 0, r.stderr
        [server] = json.loads(r.stdout)
        assert server["data"]["protocol"] == 2
        r = gw.bf(*RUN, *PRINT_MIB)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1024"  # its out and exit carried a field we do not know
        assert gw.shares() == []
    finally:
        gw.kill()


def test_a_peer_of_todays_version_is_still_held_to_todays_fields(tmp_path):
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB")
    try:
        r = _cli(gw, [*NEWER[:-1], NEWER[-1], "--same-version", *CLI, *RUN, "true"])
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "unknown fields" in r.stderr
        assert gw.shares() == []
    finally:
        gw.kill()


def test_the_suites_gateways_check_every_reply_against_its_type(tmp_path):
    """So every integration test also checks the reply shapes of remoting.messages."""
    gw = start_gateway(tmp_path, "--simulate-gpus", "1x8GiB")
    try:
        environ = (Path("/proc") / str(gw.proc.pid) / "environ").read_bytes().split(b"\0")
        assert b"BITFUSION_CHECK_REPLIES=1" in environ
    finally:
        gw.kill()
