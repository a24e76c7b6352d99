"""The fixtures of every test: a real gateway process on loopback with a simulated pool
(``gateway``), a factory of them (``gateway_factory``), and the session-wide ones. They live in
tests/support/fixtures.py; the helpers beside them in tests/support/."""

pytest_plugins = ["tests.support.fixtures"]
