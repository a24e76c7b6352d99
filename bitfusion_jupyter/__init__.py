"""Client side of bitfusion-jupyter: the `bitfusion` CLI, the kernel shim, kernelspecs, the
%bitfusion magic, the live widget and the jupyter_server extension."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["widget"]


def __getattr__(name: str) -> Any:
    """`bitfusion_jupyter.widget()`, the live view (bitfusion_jupyter.live_widget), loaded when
    first asked for: importing the package (each kernel that loads the extension, each CLI
    command) does not load ipywidgets."""
    if name == "widget":
        from bitfusion_jupyter.live_widget import widget

        return widget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(ipython: object) -> None:
    """`%load_ext bitfusion_jupyter`: registers the %bitfusion magic."""
    from bitfusion_jupyter.magics import load

    load(ipython)


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """jupyter_server finds the extension (enabled as "bitfusion_jupyter") through this.
    Imported here, when the server asks, so a kernel importing this package loads no server."""
    from bitfusion_jupyter.serverext import BitfusionExtension

    return [{"module": "bitfusion_jupyter.serverext", "app": BitfusionExtension}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The built JupyterLab panel (labextension/ builds it here; the wheel also installs it
    under share/jupyter/labextensions, where JupyterLab finds it)."""
    return [{"src": "labextension", "dest": "bitfusion-jupyter"}]
