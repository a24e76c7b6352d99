"""The cluster dashboard's API and /metrics, served by real gateways (two of one pool), asked
over real HTTP with real tokens: who may see and do what, the admin actions end to end, and
the metrics as Prometheus parses them."""

from __future__ import annotations

import json
import signal
import sys
import time
from urllib.error import HTTPError
from urllib.parse import quote
from urllib.request import Request, urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families


class Web:
    """A gateway's dashboard, asked as one token."""

    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, path: str, token: str | None, method: str = "GET", body: object = None):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = Request(
            self.base + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers=headers,
        )
        try:
            with urlopen(req, timeout=30) as r:
                text = r.read().decode()
                return r.status, json.loads(text) if path != "/metrics" else text
        except HTTPError as err:
            return err.code, json.loads(err.read())


@pytest.fixture
def cluster(gateway_factory, tmp_path):
    """Two gateways of one pool; the first lists the second as its peer and serves the web."""
    # The second runs shares unconfined, which the dashboard must show on its server.
    second = gateway_factory(
        "--simulate-gpus", "1x8GiB", "--unconfined", home=tmp_path / "b", name="second"
    )
    peers = tmp_path / "peers.conf"
    peers.write_text(f"# the rest of the cluster\n{second.address}\n")
    first, base = gateway_factory.web(
        "--simulate-gpus", "2x16GiB", "--peers", str(peers), "--lease-grace", "3",
        home=tmp_path / "a", name="first", keys_from=second,
    )  # fmt: skip
    return first, second, Web(base)


API = ["/api/v1/me", "/api/v1/cluster", "/api/v1/shares", "/api/v1/events",
       "/api/v1/history?range=hour", "/metrics"]  # fmt: skip


def test_nothing_is_served_without_a_valid_token(cluster):
    first, second, web = cluster
    with urlopen(web.base + "/", timeout=10) as r:  # the page shell: a login form, no data
        assert b"Log in" in r.read()
    forged = second.token("mallory")[:-6] + "AAAAAA"
    for path in API:
        for token in (None, "not-a-token", forged):
            status, body = web.call(path, token)
            assert status == 401, (path, token, status)
            assert "token" in body["message"]
    status, _ = web.call("/api/v1/tokens", None, "POST", {"user": "x"})
    assert status == 401


def test_a_refused_token_is_told_why_on_the_dashboard(cluster):
    first, second, web = cluster
    made = first.bf(
        "gateway", "token", "create", "--user", "erin", "--expires", "1s",
        "--state-dir", str(first.state_dir),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    time.sleep(1.5)
    status, body = web.call("/api/v1/me", made.stdout.strip())
    assert status == 401 and "This token of erin expired on" in body["message"]
    dave = first.token("dave")
    assert first.bf("gateway", "token", "revoke", dave,
                    "--state-dir", str(first.state_dir)).returncode == 0  # fmt: skip
    status, body = web.call("/api/v1/me", dave)
    assert status == 401 and "This token has been revoked" in body["message"]


def test_a_plain_user_sees_the_cluster_and_only_their_own_shares(cluster):
    first, second, web = cluster
    mine = first.bf_background("run", "-m", "2048", "--", "sleep", "60", user="alice")
    theirs = first.bf_background("run", "-m", "4096", "--", "sleep", "60", user="bob")
    try:
        deadline = time.monotonic() + 15
        while len(first.shares()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        status, view = web.call("/api/v1/cluster", first.token("alice"))
        assert status == 200 and view["user"] == "alice" and not view["admin"]
        assert [s["hostname"] for s in view["servers"]] == ["first", "second"]
        assert all(s["state"] == "ok" and s["simulated"] for s in view["servers"])
        for s in view["servers"]:  # health, as `bitfusion health` gives it
            assert s["reachable"] and 0 < s["rtt_ms"] < 2000 and s["uptime_s"] >= 0
        sandboxes = [s["sandbox"] for s in view["servers"]]
        assert [(b["sandboxed"], b["line"].split(":")[0]) for b in sandboxes] == [
            (True, "sandboxed by bubblewrap"),
            (False, "UNCONFINED (--unconfined)"),
        ]
        gpus = [g for s in view["servers"] for g in s["gpus"]]
        assert sorted(m for g in gpus for m in g["share_sizes_mib"]) == [2048, 4096]
        detailed = [sh for g in gpus for sh in g["shares"]]
        assert [(sh["owner"], sh["mib"]) for sh in detailed] == [("alice", 2048)]
        status, shares = web.call("/api/v1/shares", first.token("alice"))
        assert [(s["owner"], s["runs"]) for s in shares["shares"]] == [("alice", "sleep 60")]
        status, events = web.call("/api/v1/events", first.token("alice"))
        assert {e["user"] for e in events["events"]} == {"alice"}
        for path, body in (("/api/v1/tokens", {"user": "eve"}),
                           ("/api/v1/settings/idle-timeout", {"seconds": 5})):  # fmt: skip
            method = "PUT" if "idle" in path else "POST"
            status, said = web.call(path, first.token("alice"), method, body)
            assert status == 403 and "admin" in said["message"]
        status, admin_view = web.call("/api/v1/shares", first.token("root", admin=True))
        assert sorted(s["owner"] for s in admin_view["shares"]) == ["alice", "bob"]
    finally:
        for p in (mine, theirs):
            p.kill()


def test_admin_releases_a_share_and_its_process_stops(cluster):
    first, second, web = cluster
    admin = first.token("root", admin=True)
    run = second.bf_background("run", "-m", "1024", "--", "sleep", "60", user="alice",
                               env=second.env("alice"))  # fmt: skip
    deadline = time.monotonic() + 15
    while not second.shares():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    [share] = second.shares()
    path = f"/api/v1/shares/{quote(second.address)}/{share['share_id']}/release"
    status, said = web.call(path, admin, "POST", {})
    assert status == 200 and said["released"] == share["share_id"]
    run.wait(20)
    assert run.returncode != 0  # the command was stopped
    assert second.no_shares_within(10)
    status, said = web.call(path, admin, "POST", {})
    assert status == 404 and "No share" in said["message"]
    status, said = web.call(f"/api/v1/shares/{quote('10.9.9.9:1')}/x/release", admin, "POST", {})
    assert status == 404 and "not a gateway of this cluster" in said["message"]


def test_admin_drains_a_gpu_sets_the_idle_timeout_and_manages_tokens(cluster):
    first, second, web = cluster
    admin = first.token("root", admin=True)
    status, said = web.call(f"/api/v1/gpus/{quote(second.address)}/0/drain", admin, "POST",
                            {"drain": True})  # fmt: skip
    assert status == 200 and said["draining"] is True
    refused = second.bf("run", "-m", "1024", "--", "true", env=second.env("alice"))
    assert refused.returncode != 0 and "draining" in refused.stderr
    web.call(f"/api/v1/gpus/{quote(second.address)}/0/drain", admin, "POST", {"drain": False})
    assert second.bf("run", "-m", "1024", "--", "true", env=second.env("alice")).returncode == 0

    status, said = web.call("/api/v1/settings/idle-timeout", admin, "PUT", {"seconds": 2})
    assert status == 200 and said["idle_timeout_s"] == 2
    assert set(said["servers"].values()) == {"ok"}  # set on both servers
    held = first.bf("request_gpus", "-m", "2048")
    assert held.returncode == 0, held.stderr
    assert first.no_shares_within(12), "an idle share outlived the idle timeout"
    status, events = web.call("/api/v1/events", admin)
    assert any(e["kind"] == "idle_reclaim" for e in events["events"])
    web.call("/api/v1/settings/idle-timeout", admin, "PUT", {"seconds": 0})

    status, made = web.call("/api/v1/tokens", admin, "POST", {"user": "dora"})
    assert status == 200 and made["user"] == "dora" and not made["admin"]
    env = {**second.env("dora"), "BITFUSION_TOKEN": made["token"]}
    assert second.bf("list_gpus", env=env).returncode == 0  # works on every server of the pool
    status, said = web.call("/api/v1/tokens/revoke", admin, "POST", {"token": made["token"]})
    assert status == 200 and said["revoked"] == "dora" and set(said["servers"].values()) == {"ok"}
    for gw in (first, second):
        r = gw.bf("list_gpus", env={**gw.env("dora"), "BITFUSION_TOKEN": made["token"]})
        assert r.returncode != 0 and "revoked" in r.stderr
    status, _ = web.call("/api/v1/cluster", made["token"])
    assert status == 401
    status, said = web.call("/api/v1/tokens", admin, "POST", {"user": 5})
    assert status == 400


def test_metrics_parse_and_match_the_shares(cluster):
    first, second, web = cluster
    run = first.bf_background(
        "run", "-m", "3000", "--", sys.executable, "-m", "gateway.simulated_alloc", "1200",
        "--seconds", "60",
    )  # fmt: skip
    try:
        assert "allocated 1200 MiB" in run.stdout.readline()
        first.bf("run", "-m", "999999", "--", "true")  # one refusal
        deadline = time.monotonic() + 10
        while True:
            status, text = web.call("/metrics", first.token("root", admin=True))
            assert status == 200
            families = {f.name: f for f in text_string_to_metric_families(text)}
            used = [s.value for s in families["bitfusion_share_used_mib"].samples]
            if used == [1200.0] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert used == [1200.0]
        [size] = families["bitfusion_share_size_mib"].samples
        assert size.value == 3000 and size.labels["owner"] == "alice"
        assert size.labels["uuid"].startswith("GPU-")
        status, text = web.call("/metrics", first.token("alice"))  # a user's scrape names no one
        [mine] = [f for f in text_string_to_metric_families(text)
                  if f.name == "bitfusion_share_size_mib"][0].samples  # fmt: skip
        assert mine.value == 3000 and "owner" not in mine.labels
        up = {s.labels["server"]: s.value for s in families["bitfusion_server_up"].samples}
        assert up == {first.address: 1.0, second.address: 1.0}
        total = [s for s in families["bitfusion_gpu_memory_total_mib"].samples]
        assert sorted(s.value for s in total) == [8192, 16384, 16384]
        assert all(s.labels["simulated"] == "true" for s in total)
        shared = {(s.labels["server"], s.labels["gpu"]): s.value
                  for s in families["bitfusion_gpu_memory_shared_mib"].samples}  # fmt: skip
        assert sum(shared.values()) == 3000
        refusals = {s.labels["server"]: s.value for s in families["bitfusion_refusals"].samples
                    if s.name == "bitfusion_refusals_total"}  # fmt: skip
        assert refusals[first.address] >= 1
    finally:
        run.kill()


def test_a_peer_that_is_down_is_shown_as_unreachable(cluster):
    first, second, web = cluster
    second.kill(signal.SIGKILL)
    status, view = web.call("/api/v1/cluster", first.token("alice"))
    assert status == 200
    states = {s["address"]: s["state"] for s in view["servers"]}
    assert states == {first.address: "ok", second.address: "unreachable"}
    [down] = [s for s in view["servers"] if s["address"] == second.address]
    assert "Could not connect" in down["error"] or "did not answer" in down["error"]
    assert not down["reachable"] and down["rtt_ms"] is None
    # An action for every server says plainly where it did not happen.
    admin = first.token("root", admin=True)
    status, said = web.call("/api/v1/tokens/revoke", admin, "POST", {"token": first.token("eve")})
    assert status == 502 and said["servers"][first.address] == "ok"
    assert said["message"].startswith("Revoked on 1 of 2 servers, not on " + second.address)
    status, said = web.call("/api/v1/settings/idle-timeout", admin, "PUT", {"seconds": 30})
    assert status == 502 and second.address in said["message"]


def test_an_idle_timeout_that_is_not_a_finite_number_is_refused(cluster):
    first, second, web = cluster
    headers = {"Authorization": f"Bearer {first.token('root', admin=True)}"}
    for raw in (b'{"seconds": NaN}', b'{"seconds": Infinity}', b'{"seconds": 1e400}'):
        req = Request(web.base + "/api/v1/settings/idle-timeout", raw, headers, method="PUT")
        with pytest.raises(HTTPError) as refused:
            urlopen(req, timeout=10)
        assert refused.value.code == 400, raw
        assert json.loads(refused.value.read())["message"].startswith(("The request", '"seconds"'))
