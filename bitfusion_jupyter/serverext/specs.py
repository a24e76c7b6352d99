"""Kernelspecs for the panel's "start a notebook on a share" form: list them, or make one.

A request for a share size someone already has a bitfusion kernelspec for reuses it (the
presets included); otherwise a user kernelspec is installed, as
`bitfusion kernelspec install --user` would.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bitfusion_jupyter import kernelspecs
from bitfusion_jupyter.share_request import ShareRequest, UsageError
from remoting.shares import FIELDS, Want, WantError


class SpecError(ValueError):
    """A request the panel should not have sent; the text is one sentence for the user."""


def presets() -> list[dict[str, Any]]:
    """Every installed bitfusion kernelspec, as ``/bitfusion/api/presets`` lists it."""
    out = []
    for spec in kernelspecs.installed():
        meta = spec[kernelspecs.METADATA_KEY]
        out.append(
            {
                "name": spec["name"],
                "display_name": spec["display_name"],
                "gpus": meta.get("gpus") or 1,
                "mib": meta.get("mib"),
                "fraction": meta.get("fraction"),
                "files": bool(meta.get("files")),
            }
        )
    return out


def _whole(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{key} must be a whole number of at least 1, not {value!r}.")
    return value


def read_request(body: Any) -> ShareRequest:
    """The share a POST body asks for; raises SpecError. The JSON types are checked here;
    what a share may be is remoting.shares.Want.validate's, as on every other way in."""
    if not isinstance(body, dict):
        raise SpecError('Send a JSON object such as {"gpus": 1, "mib": 2048}.')
    if body.get("gpus") is None:
        raise SpecError('Say how many GPUs the kernel gets, e.g. {"gpus": 1}.')
    gpus = _whole(body, "gpus")
    mib = _whole(body, "mib")
    fraction = body.get("fraction")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, int | float)
    ):
        raise SpecError(f"fraction must be a number in (0, 1], e.g. 0.5, not {fraction!r}.")
    assert gpus is not None
    try:
        want = Want(gpus, mib, fraction).validate(FIELDS)  # any JSON number gets a sentence
    except WantError as exc:
        raise SpecError(str(exc)) from None
    return want if fraction is None else replace(want, fraction=float(fraction))


def read_files(body: Any) -> bool:
    """Whether the kernels work in their notebook's folder, carried to the share."""
    files = body.get("files", True) if isinstance(body, dict) else True
    if not isinstance(files, bool):
        raise SpecError(f"files must be true or false, not {files!r}.")
    return files


def _same(meta: dict[str, Any], request: ShareRequest, files: bool) -> bool:
    return (
        bool(meta.get("files")) == files
        and (meta.get("gpus") or 1) == request.gpus
        and meta.get("mib") == request.mib
        and meta.get("fraction") == request.fraction
        and not meta.get("filters")
        and not meta.get("wait_s")
        and not meta.get("servers")
        and (meta.get("kernel") or kernelspecs.DEFAULT_KERNEL) == kernelspecs.DEFAULT_KERNEL
    )


def ensure(request: ShareRequest, files: bool = True) -> dict[str, str]:
    """A kernelspec for ``request``: an installed one that matches, else a new user one.
    ``files``: its kernels work in their notebook's folder, carried to the share."""
    for spec in kernelspecs.installed():
        if _same(spec[kernelspecs.METADATA_KEY], request, files):
            return {"name": spec["name"], "display_name": spec["display_name"]}
    # As `bitfusion kernelspec install` does: a kernel that could never start is no choice.
    why = kernelspecs.never_held(request, kernelspecs.ask_pool(None))
    if why:
        raise SpecError(
            f"No server could ever hold {request.describe()}: {why}. Ask for less, or see "
            "the GPUs in the pool above."
        )
    try:
        path = kernelspecs.install(
            request,
            name=None,
            display_name=None,
            kernel=kernelspecs.DEFAULT_KERNEL,
            servers=None,
            user=True,
            sys_prefix=False,
            files=files,
        )
    except UsageError as exc:
        raise SpecError(str(exc)) from None
    suffix = "" if files else kernelspecs.NO_FILES_SUFFIX
    return {"name": path.name, "display_name": kernelspecs.display_name_for(request) + suffix}
