"""Browser tests: real JupyterLab (a subprocess, wired to a real gateway on a simulated pool)
driven by real headless Chromium through Playwright.

They are skipped, saying why, when /usr/bin/chromium, Playwright or the built panel
(`bitfusion_jupyter/labextension`, built by `pip install -e .`) is missing. Screenshots go to
the test's tmp dir and to `test-output/screenshots/` for a person to look at.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.spawned import stop_leftovers
from tests.support.env import base_env
from tests.support.gateways import GatewayProcess, start_web_gateway
from tests.support.lab import BUILT_PANEL, CHROMIUM, SCREENSHOTS, Lab, start_lab


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not (BUILT_PANEL / "package.json").exists():
        return f"the panel is not built ({BUILT_PANEL} is missing; pip install -e . builds it)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def pool_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway (simulated 2×16 GiB, its dashboard on a free port) for the module: the
    Lab's pool."""
    gw, _ = start_web_gateway(
        tmp_path_factory.mktemp("gateway"), "--simulate-gpus", "2x16GiB", "--lease-grace", "5"
    )
    yield gw
    gw.kill(signal.SIGTERM)
    stop_leftovers(gw.state_dir)


@pytest.fixture(scope="module")
def lab(pool_gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab whose user (alice) has a token for ``pool_gateway``."""
    running = start_lab(tmp_path_factory.mktemp("lab"), pool_gateway.env())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def lab_without_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab of a user who has not run `bitfusion init` yet."""
    home = tmp_path_factory.mktemp("lab-unconfigured")
    env = {**base_env(home), "BITFUSION_CONFIG_DIR": str(home / "bitfusion")}
    running = start_lab(home, env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Never a downloaded browser: the system's Chromium (no network for downloads here).
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture
def shoot(page: object, tmp_path: Path, request: pytest.FixtureRequest):
    """``shoot(name)``: a screenshot of the page, in tmp_path and in test-output/screenshots."""

    def take(name: str) -> Path:
        path = tmp_path / f"{request.node.name}-{name}.png"
        page.screenshot(path=str(path))  # type: ignore[attr-defined]
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / path.name)
        return path

    return take
