"""The gateway's service, split by job: core (state, sockets, life cycle) composes the parts,
and dispatch's HANDLERS table names the part that answers each message."""

from gateway.service.config import GatewayConfig
from gateway.service.core import Gateway
from gateway.service.state import RequestError

__all__ = ["Gateway", "GatewayConfig", "RequestError"]
