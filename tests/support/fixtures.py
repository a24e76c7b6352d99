"""The fixtures every test folder may use, loaded by the root conftest.py as a plugin."""

from __future__ import annotations

import site
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateways import GatewayFactory, GatewayProcess


@pytest.fixture(autouse=True, scope="session")
def _no_user_site_kernelspecs(tmp_path_factory) -> Iterator[None]:
    """Jupyter also searches the user site's share/jupyter (~/.local/share/jupyter), beside
    JUPYTER_DATA_DIR, and `bitfusion up` installs its presets there: the tests that count
    kernelspecs in this process must see only their own."""
    patch = pytest.MonkeyPatch()
    patch.setattr(site, "USER_BASE", str(tmp_path_factory.mktemp("user-base")))
    yield
    patch.undo()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """``gateway_factory(*flags, home=, name=, keys_from=, env_extra=)`` starts a gateway
    (``.web(...)``: with its dashboard); each is stopped, with its leftovers, after the test."""
    factory = GatewayFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> GatewayProcess:
    """A gateway on a simulated 2×16 GiB pool with a 2 s lease grace."""
    return gateway_factory(
        "--simulate-gpus", "2x16GiB", "--lease-grace", "2", "--police-grace", "1"
    )
