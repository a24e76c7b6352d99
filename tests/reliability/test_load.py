"""Load (issue 7): 200 concurrent clients allocate, use and release shares for 60 s against one
gateway, while the invariant is checked four times a second (reliability/load.py).

Runs the script itself, as a separate process, and reads the figures it writes (kept in
test-output/load.json). Asserts what must hold under load, never a timing or a throughput."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "test-output" / "load.json"  # for RELIABILITY.md; no timing there is asserted


@pytest.mark.timeout(400)
def test_200_clients_for_60_s(tmp_path: Path) -> None:
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.unlink(missing_ok=True)
    figures_path = FIGURES
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "reliability" / "load.py"),
            "--clients",
            "200",
            "--seconds",
            "60",
            "--json",
            str(figures_path),
            "--gateway-log",
            str(tmp_path / "gateway.log"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert figures_path.exists(), f"no figures written:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    f = json.loads(figures_path.read_text())
    report = run.stdout[-6000:]

    # The invariant held at every check, and every share was gone at the end.
    assert f["invariant"]["checks"] > 0, report
    assert f["invariant"]["violations"] == 0, f["invariant"]["details"]
    assert f["leaked_shares"] == [], report
    # Only dead holders' shares ran out of lease: no live client lost one.
    assert f["expired_live"] == [], f["expired_live"]

    # No error but clear refusals: clients count anything else (a timeout, a wrong code, an
    # unclear or multi-line message, a missing share) as unexpected; the gateway logged no bug.
    assert f["unexpected_errors"] == 0, f["errors"]
    log = f["gateway_log"]
    assert (log["tracebacks"], log["internal_errors"], log["error_lines"]) == (0, 0, 0), log
    assert run.returncode == 0, report

    # Every kind of operation really happened, and both kinds of refusal.
    for kind, n in f["operations"].items():
        assert n > 0, f"no {kind} happened: {report}"
    assert f["commands_run"] > 0, report
    assert f["refusals"]["no_fit"] > 0 and f["refusals"]["never_fits"] > 0, report

    # Holders died (a worker killed, sockets dropped) and the gateway freed their shares.
    dead = f["dead_holders"]
    assert dead["killed_worker_held"] > 0 and dead["dropped"] > 0, report
    assert dead["freed_seen"] > 0 and dead["gateway_lease_expiries"] > 0, report


def test_a_release_that_waits_for_a_process_stalls_no_one(gateway) -> None:
    """A share whose command ignores SIGTERM takes the terminate grace (5 s) to release; the
    gateway must keep answering everyone else meanwhile (found by the load run: it did not,
    and with a short lease grace every other holder lost its share)."""
    from remoting import tokens
    from remoting.client import GatewayConnection

    a = GatewayConnection(gateway.address, tokens.parse(gateway.token("alice")), timeout=30)
    b = GatewayConnection(gateway.address, tokens.parse(gateway.token("bob")), timeout=30)
    try:
        mine = a.request("allocate", gpus=1, mib=256)["share"]["share_id"]
        theirs = b.request("allocate", gpus=1, mib=256)["share"]["share_id"]
        a.request("spawn", share_id=mine, argv=["sh", "-c", "trap '' TERM; sleep 60"])
        released: list[dict] = []
        releasing = threading.Thread(
            target=lambda: released.append(a.request("release", share_id=mine))
        )
        releasing.start()
        # Bob renews well within his lease (2 s) all through alice's release.
        while releasing.is_alive():
            b.request("renew", share_id=theirs)
            time.sleep(0.5)
        releasing.join()
        assert released == [{"released": mine}]
        assert [s["share_id"] for s in gateway.shares()] == [theirs]
        b.request("release", share_id=theirs)
    finally:
        a.close()
        b.close()
