"""Client side of bitfusion-jupyter: the `bitfusion` CLI and (later) Jupyter integration."""

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """`%load_ext bitfusion_jupyter`: registers the %bitfusion magic."""
    from bitfusion_jupyter.magics import load

    load(ipython)
