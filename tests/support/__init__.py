"""What the tests share, imported as ``tests.support.<module>``; the fixtures come from
``fixtures``, which the root conftest.py loads as a plugin.

- ``env``: the checkout (``REPO``), the real CLI (``CLI``) and a clean process environment;
- ``gateways``: a gateway process started by a test, ``start_gateway`` and the
  ``GatewayFactory`` behind the ``gateway_factory`` fixture;
- ``kernels``: kernels started through the real ``kernel.json`` that
  `bitfusion kernelspec install` writes, and the helpers that drive them;
- ``processes``: code that a share runs to show who it is;
- ``waiting``: waiting for a condition or a log line;
- ``wire``: raw CurveZMQ clients and well-behaved ones, for the security tests;
- ``fixtures``: ``gateway``, ``gateway_factory`` and the session-wide ones.
"""

import pkgutil

import pytest

# Before any of them is imported: their asserts explain themselves as a conftest's do.
pytest.register_assert_rewrite(*(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)))
