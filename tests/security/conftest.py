"""The security tests' own fixtures; their helpers (raw CurveZMQ sockets, the gateway's log,
a well-behaved client) are in tests/support/wire.py and waiting.py.

Every test here runs against a real gateway process (the ``gateway`` fixture of
tests/support/fixtures.py, or a ``gateway_factory`` one) over real sockets on loopback, and
checks three things a user or an admin would notice: what the refused client is told, the line
the gateway logs, and that the gateway still serves a well-behaved client afterwards.
"""
