"""The cluster dashboard a gateway serves on its web port, in headless Chromium: the login,
a wrong token said plainly, the pool's memory map with a share in it, the shares table, an
admin's drain toggle and the history chart."""

from __future__ import annotations

import json
import re
import signal

import pytest
from playwright.sync_api import Page, expect

from gateway.spawned import stop_leftovers
from tests.support.gateways import start_web_gateway


@pytest.fixture
def dashboard(tmp_path):
    gw, base = start_web_gateway(tmp_path, "--simulate-gpus", "2x16GiB")
    url = base + "/"
    yield gw, url
    gw.kill(signal.SIGTERM)
    stop_leftovers(gw.state_dir)


def _log_in(page: Page, url: str, token: str) -> None:
    page.goto(url)
    page.get_by_test_id("token").fill(token)
    page.get_by_test_id("login-button").click()


def test_the_dashboard_shows_the_pool_and_its_shares_to_an_admin(page: Page, dashboard, shoot):
    gw, url = dashboard
    holder = gw.bf_background("run", "-m", "4096", "--", "sleep", "120", user="alice")
    try:
        _log_in(page, url, "bf1.not-a-token-of-this-pool")
        expect(page.get_by_test_id("login-error")).to_have_text(
            "This gateway does not accept that token; ask your admin for one."
        )
        expect(page.get_by_test_id("servers")).to_be_hidden()

        _log_in(page, url, gw.token("root", admin=True))
        expect(page.get_by_test_id("who")).to_have_text("root (admin)")
        gpus = page.get_by_test_id("gpu")
        expect(gpus).to_have_count(2)
        expect(gpus.first.get_by_test_id("simulated")).to_have_text("SIMULATED")
        row = page.get_by_test_id("share-row")
        expect(row).to_have_count(1, timeout=15_000)
        expect(row).to_contain_text("alice")
        expect(row).to_contain_text("sleep 120")
        share_id = row.get_attribute("data-share-id")
        seg = page.locator(f'[data-testid="share-seg"][data-share-id="{share_id}"]')
        expect(seg).to_be_visible()
        expect(seg).to_have_class("seg seen")  # alice's, seen by an admin: not "mine"
        expect(page.get_by_test_id("health")).to_contain_text(" ms · version")
        chart = page.get_by_test_id("chart").first
        expect(chart).to_be_visible()
        # Axes with units and a legend: which line is which, in MiB over clock time.
        expect(chart.get_by_test_id("y-tick").first).to_have_text("0")
        expect(chart.locator("text.axis-title")).to_have_text(["MiB", "time"])
        expect(chart.get_by_test_id("x-tick")).to_have_count(3)
        expect(chart.get_by_test_id("x-tick").first).to_have_text(re.compile(r"\d\d:\d\d"))
        legend = page.get_by_test_id("chart-legend").first
        expect(legend.get_by_test_id("legend-gpu")).to_have_text(["GPU 0", "GPU 1"])
        expect(legend).to_contain_text("shared out (granted)")
        expect(legend).to_contain_text("in use")

        page.get_by_test_id("drain-toggle").nth(1).click()
        expect(gpus.nth(1).get_by_test_id("draining")).to_have_text("DRAINING")
        [listed] = json.loads(gw.bf("list_gpus", "--json").stdout)
        assert [g["draining"] for g in listed["data"]["gpus"]] == [False, True]
        shoot("admin")

        page.get_by_test_id("release").click()
        expect(page.get_by_test_id("no-shares")).to_be_visible(timeout=15_000)
        assert gw.no_shares_within(10)
    finally:
        holder.kill()


def test_a_plain_user_sees_no_admin_controls(page: Page, dashboard, shoot):
    gw, url = dashboard
    _log_in(page, url, gw.token("bob"))
    expect(page.get_by_test_id("who")).to_have_text("bob")
    expect(page.get_by_test_id("gpu")).to_have_count(2)
    expect(page.get_by_test_id("admin")).to_be_hidden()
    expect(page.get_by_test_id("drain-toggle")).to_have_count(0)
    shoot("plain-user")
