"""Fixtures of the integration tests that run kernels on a share (the helpers that start and
drive kernels are in tests/support/kernels.py)."""

from __future__ import annotations

import pytest

from tests.support.kernels import point_client_at, start_shim_kernel


@pytest.fixture
def client_env(gateway, monkeypatch):
    point_client_at(gateway, monkeypatch)
    return gateway


@pytest.fixture
def kernel(client_env):
    km, kc = start_shim_kernel("-m", "2048")
    kc.wait_for_ready(timeout=60)
    yield km, kc
    kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel(now=True)
