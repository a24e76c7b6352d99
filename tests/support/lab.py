"""JupyterLab for the browser tests: started with this checkout's panel, and driven in
Chromium (shared by the panel, dashboard and JupyterHub tests)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import Request, urlopen

from playwright.sync_api import Page, expect

from gateway.quickstart import JupyterLab
from gateway.spawned import free_port
from tests.support.env import REPO

CHROMIUM = Path(os.environ.get("BITFUSION_TEST_CHROMIUM", "/usr/bin/chromium"))
BUILT_PANEL = REPO / "bitfusion_jupyter" / "labextension"
SCREENSHOTS = REPO / "test-output" / "screenshots"
LAB_START_S = 90.0
KERNEL_READY_MS = 90_000  # the shim takes a share and starts a kernel on the gateway


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


def lab_env(home: Path) -> dict[str, str]:
    """The variables that keep everything a Jupyter server reads or writes under ``home`` and
    make it load this checkout's panel and server extension (made here, under ``home``)."""
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
    return {
        "HOME": str(home),
        "JUPYTER_PATH": str(jupyter),
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "lab-workspaces"),
    }


def start_lab(home: Path, env: dict[str, str]) -> Lab:
    """JupyterLab with everything Jupyter reads or writes under ``home``."""
    full_env = {**env, **lab_env(home)}
    lab = Lab(free_port(), full_env, home / "jupyterlab.log", (f"--ServerApp.root_dir={home}",))
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


def run_cell(page: Page, code: str) -> None:
    """Type ``code`` into the last cell of the active notebook and run it."""
    editor = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content").last
    editor.click()
    expect(editor).to_be_focused()
    page.keyboard.insert_text(code)  # no key events, so no auto-closed brackets
    expect(editor).to_contain_text(code.splitlines()[-1])
    page.keyboard.press("Shift+Enter")


def wait_for_idle_kernel(page: Page) -> None:
    """Until the notebook's kernel (started by the shim inside its share) is idle."""
    expect(page.locator(".jp-NotebookPanel .jp-Notebook")).to_be_visible()
    expect(page.get_by_role("button", name=re.compile(r"\| Idle$"))).to_be_visible(
        timeout=KERNEL_READY_MS
    )
