"""The gateway's service, now the package gateway.service; this name stays for code that
imports it from here (the fuzz target, older scripts)."""

from gateway.service import Gateway, GatewayConfig, RequestError

__all__ = ["Gateway", "GatewayConfig", "RequestError"]
