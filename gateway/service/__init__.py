"""The gateway's service, split by job (see gateway.service.core)."""
