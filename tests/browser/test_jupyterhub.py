"""A real JupyterHub (tests/support/hub.py) in headless Chromium (issue #21): two users log in
through the Hub's login page, each starts a notebook on a share from the GPU pool panel of
their own JupyterLab, runs a cell there, and sees only their own share in the panel and on the
gateway's dashboard (where each logs in with the token the Hub gave their server). Stopping
one user's server frees their share and their token stops working, on the gateway and on the
dashboard, while the other's share and token stay."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from remoting import tokens
from tests.support.gateways import GatewayFactory, GatewayProcess, no_traceback
from tests.support.hub import CHP, START_S, Hub, alive, environ, running_hub, write_minter
from tests.support.lab import SCREENSHOTS, lab_env, run_cell, wait_for_idle_kernel
from tests.support.waiting import wait_for

pytest.importorskip("jupyterhub")
pytestmark = [
    pytest.mark.skipif(
        CHP is None,
        reason="configurable-http-proxy is missing: run ./install-system-packages --test",
    ),
    # Usually about a minute; the margin is for 2 cores shared with other engineers' tests.
    pytest.mark.timeout(240),
]

SHARE_MIB = {"alice": 2048, "bob": 3072}  # different sizes: each tells the other's apart
REVOKED = "This token has been revoked"
START_MS = int(START_S * 1000)
HUB_CONFIG = """
c.Spawner.default_url = "/lab"
# The login page answers at once, then the spawn-pending page follows the spawn: both users'
# servers start together.
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
"""


@pytest.fixture
def pool(gateway_factory: GatewayFactory) -> tuple[GatewayProcess, str]:
    """A gateway on a simulated 2×16 GiB pool, and its dashboard's URL."""
    gw, base = gateway_factory.web("--simulate-gpus", "2x16GiB", "--lease-grace", "5")
    return gw, base + "/"


@pytest.fixture
def hub(pool: tuple[GatewayProcess, str], tmp_path: Path) -> Iterator[Hub]:
    """A Hub whose single-user servers run JupyterLab with this checkout's panel, each with
    its Jupyter folders in its user's home."""
    gw, _ = pool
    minter = tmp_path / "bitfusion-minter.token"
    write_minter(gw, minter)
    root = tmp_path / "hub"
    homes = {name: lab_env(root / "homes" / name) for name in SHARE_MIB}
    with running_hub(root, [gw], minter, user_env=homes, config=HUB_CONFIG) as running:
        yield running


def _shoot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"test_jupyterhub-{name}.png"
    page.screenshot(path=str(path))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)


def _log_in(page: Page, hub: Hub, name: str) -> None:
    """The Hub's login page (DummyAuthenticator: any password); it starts the user's server."""
    page.goto(f"{hub.base}/hub/login")
    page.locator("#username_input").fill(name)
    page.locator("#password_input").fill(f"{name}'s password")
    page.locator("#login_submit").click()


def _start_from_panel(page: Page, name: str) -> Locator:
    """Once the user's JupyterLab is up: a notebook on 1 GPU × SHARE_MIB[name] from the
    panel's form."""
    page.wait_for_url(re.compile(rf"/user/{name}/lab"), timeout=START_MS)
    page.locator('.jp-SideBar [data-id="bitfusion-gpu-pool"]').click(timeout=START_MS)
    panel = page.locator("#bitfusion-gpu-pool")
    expect(panel.get_by_test_id("bf-gpu")).to_have_count(2)
    panel.get_by_test_id("bf-gpus").fill("1")
    panel.get_by_test_id("bf-size-kind").select_option("mib")
    panel.get_by_test_id("bf-size").fill(str(SHARE_MIB[name]))
    panel.get_by_test_id("bf-start").click()
    return panel


def _dashboard(page: Page, url: str, token: str) -> None:
    page.goto(url)
    page.get_by_test_id("token").fill(token)
    page.get_by_test_id("login-button").click()


def test_two_hub_users_each_see_only_their_own_share_until_a_server_stops(
    browser: Browser, hub: Hub, pool: tuple[GatewayProcess, str], tmp_path: Path
):
    gw, dashboard_url = pool
    admin = (gw.state_dir / "admin.token").read_text().strip()
    users = list(SHARE_MIB)
    contexts = [browser.new_context(viewport={"width": 1400, "height": 900}) for _ in users]
    try:
        labs: dict[str, Page] = {}
        for name, context in zip(users, contexts, strict=True):
            context.set_default_timeout(30_000)
            labs[name] = context.new_page()
            _log_in(labs[name], hub, name)  # both servers start meanwhile
        panels = {name: _start_from_panel(labs[name], name) for name in users}

        # Each notebook's kernel runs in a share of its user's: a cell there says whose.
        shares: dict[str, str] = {}
        for name in users:
            wait_for_idle_kernel(labs[name])
            run_cell(
                labs[name], "import os; print(os.environ['USER'], os.environ['BITFUSION_SHARE_ID'])"
            )
        for name in users:
            said = (
                labs[name]
                .locator(".jp-OutputArea-output")
                .filter(has_text=re.compile(rf"^{name} s-[0-9a-f]+\s*$"))
            )
            expect(said).to_have_count(1)
            shares[name] = said.inner_text().split()[1]
        assert {s["owner"]: s["share_id"] for s in gw.shares()} == shares

        # The token the Hub gave each server is its own user's; no admin token in there.
        pids = {name: hub.wait_ready(name) for name in users}
        envs = {name: environ(pid) for name, pid in pids.items()}
        for name, env in envs.items():
            assert tokens.parse(env["BITFUSION_TOKEN"]).user == name
            assert admin.encode() not in Path(f"/proc/{pids[name]}/environ").read_bytes()

        # Each panel lists that user's kernel on their share, and the other's share only as
        # "others" memory, without its id.
        for name, other in zip(users, reversed(users), strict=True):
            panel = panels[name]
            kernel = panel.get_by_test_id("bf-kernel")
            expect(kernel).to_have_count(1)
            expect(kernel).to_have_attribute("data-share-id", shares[name])
            mine = panel.locator(".bf-mine.bf-share")
            expect(mine).to_have_count(1)
            expect(mine).to_have_attribute("title", re.compile(shares[name]))
            legends = panel.get_by_test_id("bf-gpu-legend")
            expect(legends.filter(has_text=f"mine {SHARE_MIB[name]} ")).to_have_count(1)
            expect(legends.filter(has_text=f"others {SHARE_MIB[other]} ")).to_have_count(1)
            expect(panel).not_to_contain_text(shares[other])
            _shoot(labs[name], tmp_path, f"lab-{name}")

        # On the dashboard, each logs in with their server's token and sees their share alone.
        boards = {name: contexts[i].new_page() for i, name in enumerate(users)}
        for name in users:
            _dashboard(boards[name], dashboard_url, envs[name]["BITFUSION_TOKEN"])
        for name, other in zip(users, reversed(users), strict=True):
            board = boards[name]
            expect(board.get_by_test_id("who")).to_have_text(name)
            row = board.get_by_test_id("share-row")
            expect(row).to_have_count(1, timeout=15_000)
            expect(row).to_have_attribute("data-share-id", shares[name])
            expect(row).to_contain_text(name)
            named = board.locator('[data-testid="share-seg"][data-owner]')
            expect(named).to_have_count(1)
            expect(named).to_have_attribute("data-owner", name)
            expect(board.get_by_test_id("share-seg")).to_have_count(2)  # the other's: no name
            expect(board.locator("body")).not_to_contain_text(shares[other])
            _shoot(board, tmp_path, f"dashboard-{name}")

        # Stopping alice's server ends her kernel, so her share; her token is revoked.
        hub.stop("alice")
        assert not alive(pids["alice"])
        assert wait_for(lambda: [s["owner"] for s in gw.shares()] == ["bob"], 30), gw.shares()
        assert REVOKED in no_traceback(gw.bf("list_gpus", env=envs["alice"]))
        expect(boards["alice"].get_by_test_id("login-error")).to_contain_text(
            REVOKED, timeout=20_000
        )  # her dashboard's next refresh logs her out
        _shoot(boards["alice"], tmp_path, "dashboard-alice-revoked")

        # Bob's server, share and token stay.
        assert gw.bf("list_gpus", env=envs["bob"]).returncode == 0
        assert [s["share_id"] for s in gw.shares()] == [shares["bob"]]
        assert alive(pids["bob"])
        expect(boards["bob"].get_by_test_id("who")).to_have_text("bob")
        expect(boards["bob"].get_by_test_id("share-row")).to_have_attribute(
            "data-share-id", shares["bob"]
        )
        expect(panels["bob"].get_by_test_id("bf-kernel")).to_have_attribute(
            "data-share-id", shares["bob"]
        )
    finally:
        for context in contexts:
            context.close()
