"""The remoting layer: the one wire protocol between clients and gateways."""
