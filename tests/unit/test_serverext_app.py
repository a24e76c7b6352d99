"""The server extension as a jupyter_server ExtensionApp: its timings are traits that a Jupyter
server's config sets, and its handlers read them (no gateway: no server is configured)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pytest_jupyter")
pytest.importorskip("jupyter_server")

# pytest-jupyter's fixtures, for this module only (as in tests/integration/test_serverext.py).
from pytest_jupyter.jupyter_server import *  # noqa: E402, F403

from bitfusion_jupyter import config, pool_model  # noqa: E402
from bitfusion_jupyter.serverext import (  # noqa: E402
    BitfusionExtension,
    _jupyter_server_extension_points,
)

ENABLED = {"ServerApp": {"jpserver_extensions": {"bitfusion_jupyter": True}}}


@pytest.fixture(autouse=True)
def no_servers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No gateway configured: the pool is answered without asking one."""
    monkeypatch.setattr(config, "SYSTEM_SERVERS_CONF", tmp_path / "no-system-servers.conf")
    monkeypatch.delenv("BITFUSION_SERVERS", raising=False)


def extension(serverapp: Any) -> BitfusionExtension:
    ext = serverapp.web_app.settings["bitfusion_jupyter"]
    assert isinstance(ext, BitfusionExtension)
    return ext


def test_the_extension_points_name_the_app() -> None:
    [point] = _jupyter_server_extension_points()
    assert point == {"module": "bitfusion_jupyter.serverext", "app": BitfusionExtension}
    assert BitfusionExtension.name == "bitfusion_jupyter"


class TestDefaults:
    @pytest.fixture
    def jp_server_config(self) -> dict[str, Any]:
        return ENABLED

    def test_defaults(self, jp_serverapp: Any) -> None:
        ext = extension(jp_serverapp)
        assert (ext.push_interval_s, ext.survey_ttl_s) == (1.0, 1.0)
        assert ext.gateway_timeout_s == pool_model.TIMEOUT_S
        assert (ext.survey.ttl, ext.survey.timeout) == (1.0, pool_model.TIMEOUT_S)


class TestServerConfig:
    @pytest.fixture
    def jp_server_config(self) -> dict[str, Any]:
        return {
            **ENABLED,
            "BitfusionExtension": {
                "push_interval_s": 0.2,
                "survey_ttl_s": 3.0,
                "gateway_timeout_s": 0.5,
            },
        }

    def test_the_traits_come_from_the_servers_config(self, jp_serverapp: Any) -> None:
        ext = extension(jp_serverapp)
        assert (ext.push_interval_s, ext.survey_ttl_s, ext.gateway_timeout_s) == (0.2, 3.0, 0.5)
        assert (ext.survey.ttl, ext.survey.timeout) == (3.0, 0.5)

    def test_the_live_handler_pushes_at_the_configured_interval(
        self, jp_serverapp: Any, jp_ws_fetch: Any, jp_asyncio_loop: asyncio.AbstractEventLoop
    ) -> None:
        async def three() -> tuple[float, list[dict[str, Any]]]:
            ws = await jp_ws_fetch("bitfusion", "api", "live")
            first = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            start = time.monotonic()
            more = [json.loads(await asyncio.wait_for(ws.read_message(), 10)) for _ in range(2)]
            ws.close()
            return time.monotonic() - start, [first, *more]

        took, pushed = jp_asyncio_loop.run_until_complete(three())
        assert all(p["pool"]["configured"] is False for p in pushed)
        assert took < 0.9  # two pushes at 0.2 s; the default (1 s) would take 2


class TestConfigFile:
    @pytest.fixture
    def jp_server_config(self, jp_config_dir: Path) -> dict[str, Any]:
        # A jupyter_server_config.py in the config dir, as an admin would write it.
        (jp_config_dir / "jupyter_server_config.py").write_text(
            "c.BitfusionExtension.push_interval_s = 2.5\n"
        )
        return ENABLED

    def test_a_jupyter_server_config_file_sets_a_trait(self, jp_serverapp: Any) -> None:
        assert extension(jp_serverapp).push_interval_s == 2.5


class TestCommandLine:
    @pytest.fixture
    def jp_server_config(self) -> dict[str, Any]:
        return ENABLED

    @pytest.fixture
    def jp_argv(self) -> list[str]:
        return ["--BitfusionExtension.gateway_timeout_s=4"]

    def test_a_server_flag_sets_a_trait(self, jp_serverapp: Any) -> None:
        assert extension(jp_serverapp).gateway_timeout_s == 4.0
