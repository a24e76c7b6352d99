"""Client side of bitfusion-jupyter: the `bitfusion` CLI and (later) Jupyter integration."""

__version__ = "0.1.0"
