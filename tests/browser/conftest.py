"""Browser tests: real JupyterLab (a subprocess, wired to a real gateway on a simulated pool)
driven by real headless Chromium through Playwright.

They are skipped, saying why, when /usr/bin/chromium, Playwright or the built panel
(`bitfusion_jupyter/labextension`, built by `pip install -e .`) is missing. Screenshots go to
the test's tmp dir and to `test-output/screenshots/` for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.request import Request, urlopen

import pytest

from gateway.quickstart import JupyterLab
from gateway.spawned import free_port, stop_leftovers
from tests.support.env import REPO, base_env
from tests.support.gateways import GatewayProcess, start_web_gateway

CHROMIUM = Path(os.environ.get("BITFUSION_TEST_CHROMIUM", "/usr/bin/chromium"))
BUILT_PANEL = REPO / "bitfusion_jupyter" / "labextension"
SCREENSHOTS = REPO / "test-output" / "screenshots"
LAB_START_S = 90.0


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


class Lab(JupyterLab):
    """The quick start's JupyterLab process, plus its own REST API for the tests."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, body: object = None) -> object:
        req = Request(
            f"{self.base}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {self.token}"},
        )
        with urlopen(req, timeout=30) as r:
            text = r.read()
        return json.loads(text) if text else None


def start_lab(home: Path, env: dict[str, str]) -> Lab:
    """JupyterLab with everything Jupyter reads or writes under ``home``."""
    jupyter = home / "jupyter"
    labext = jupyter / "labextensions"
    labext.mkdir(parents=True)
    # This checkout's build, ahead of any installed copy (JUPYTER_PATH comes first).
    (labext / "bitfusion-jupyter").symlink_to(BUILT_PANEL, target_is_directory=True)
    settings = home / "lab-settings"
    notification = (
        settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    )
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false"}))  # no news toast on screenshots
    config = home / "config"
    config.mkdir()
    # Enabled here too, so that the tests do not depend on how the package was installed.
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"bitfusion_jupyter": True}}})
    )
    lab_env = {
        **env,
        "HOME": str(home),
        "JUPYTER_PATH": str(jupyter),
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "lab-workspaces"),
    }
    lab = Lab(free_port(), lab_env, home / "jupyterlab.log", (f"--ServerApp.root_dir={home}",))
    deadline = time.monotonic() + LAB_START_S
    while True:
        try:
            lab.api("GET", "/bitfusion/api/presets")  # the server extension answers too
            return lab
        except (URLError, OSError):
            if lab.proc.poll() is not None or time.monotonic() > deadline:
                lab.stop()
                raise AssertionError(f"JupyterLab did not start:\n{lab.log_tail(40)}") from None
            time.sleep(0.3)


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
