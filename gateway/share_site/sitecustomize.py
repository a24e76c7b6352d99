"""Caps PyTorch and TensorFlow to the share's GPU memory as soon as they are imported.

The gateway puts this directory first on the PYTHONPATH of every process in a share, so Python's
``site`` imports this file when the interpreter starts. Hence two rules: it stays cheap (only
``os`` and ``sys``, already loaded, until a framework is actually imported) and it never breaks
the process (every failure becomes at most one warning line on stderr). The caps are the
frameworks' own and cooperative; the gateway's police enforces the share's limit regardless.

Values come from BITFUSION_MEMORY_MIB and BITFUSION_GPU_MEMORY_TOTAL_MIB, one entry per GPU in
CUDA_VISIBLE_DEVICES order, i.e. per device ordinal as the frameworks number them. A GPU granted
whole gets no cap. When the client's folder is carried (BITFUSION_FILES), the bytecode of its
modules is kept on this server (bitfusion_folder_bytecode, beside this file). Any other
``sitecustomize`` further along sys.path (a venv's, a distro's) still runs afterwards. It may
run under any Python a user brings, so it keeps to Python 3.7's syntax.
"""

from __future__ import annotations  # annotations stay unevaluated, as old Pythons need

import os
import sys

if False:  # typing only: never imported at run time, which must stay cheap
    from collections.abc import Callable
    from typing import Any

_warned = False


def _warn(problem: object) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    try:
        print(
            f"bitfusion: could not apply the share's GPU memory cap ({problem}); "
            "the gateway still polices it.",
            file=sys.stderr,
            flush=True,
        )
    except Exception:
        pass


def _caps() -> list[tuple[int, int, int]]:
    """[(device ordinal, granted MiB, total MiB)] for the GPUs granted in part; [] elsewhere."""
    granted = os.environ.get("BITFUSION_MEMORY_MIB", "")
    totals = os.environ.get("BITFUSION_GPU_MEMORY_TOTAL_MIB", "")
    if not granted:
        return []
    mibs, totals_mib = granted.split(","), totals.split(",")
    caps = [(i, int(mibs[i]), int(totals_mib[i])) for i in range(len(mibs))]
    if len(mibs) != len(totals_mib) or any(mib < 0 or total <= 0 for _, mib, total in caps):
        raise ValueError(f"BITFUSION_MEMORY_MIB={granted!r} does not fit {totals!r}")
    return [c for c in caps if c[1] < c[2]]


def _cap_torch(torch: Any, caps: list[tuple[int, int, int]]) -> None:
    cuda = torch.cuda

    def apply() -> None:
        try:
            count = cuda.device_count()
            for ordinal, mib, total in caps:
                if ordinal < count:
                    cuda.set_per_process_memory_fraction(mib / total, ordinal)
        except Exception as exc:  # raising here would fail the program's CUDA start-up
            _warn(f"torch: {exc}")

    # set_per_process_memory_fraction initialises CUDA, which at import time would slow every
    # `import torch` and break CUDA in children forked later. _lazy_call (private, but what
    # torch.manual_seed itself uses) runs it when the program first initialises CUDA instead.
    lazy_call = getattr(cuda, "_lazy_call", None)
    if lazy_call is not None:
        lazy_call(apply)
    elif cuda.is_available():
        apply()


def _cap_tensorflow(tf: Any, caps: list[tuple[int, int, int]]) -> None:
    # Logical device limits must be set before TensorFlow initialises the GPUs, which it does
    # not do at import; listing the physical devices does not initialise them either.
    config = tf.config
    gpus = config.list_physical_devices("GPU")
    for ordinal, mib, _total in caps:
        if ordinal < len(gpus):
            config.set_logical_device_configuration(
                gpus[ordinal], [config.LogicalDeviceConfiguration(memory_limit=mib)]
            )


class _AfterImport:
    """A sys.meta_path finder that runs a callback right after a module's code has run.

    It finds the module with the other finders and wraps that spec's loader's exec_module. The
    callback is consumed only when the module really executes, since importlib.util.find_spec
    (used by libraries to probe for torch) asks the finders too without importing anything.
    """

    def __init__(self, callbacks: dict[str, Callable[[Any], None]]) -> None:
        self.callbacks = callbacks  # module name -> callback(module)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.callbacks:
            return None
        spec = self._find_elsewhere(name, path, target)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec
        hook = self

        def exec_then_cap(module: Any) -> None:
            if module.__spec__ is not spec:  # a loader shared by several modules (zipimport)
                return exec_module(module)
            try:
                exec_module(module)
            finally:
                loader.__dict__.pop("exec_module", None)
            callback = hook.callbacks.pop(name, None)
            if not hook.callbacks and hook in sys.meta_path:
                sys.meta_path.remove(hook)
            if callback is not None:
                try:
                    callback(module)
                except Exception as exc:
                    _warn(f"{name}: {exc}")

        try:
            loader.exec_module = exec_then_cap  # type: ignore[union-attr]  # it has one
        except Exception:
            pass  # a loader we cannot wrap: the import goes on uncapped
        return spec

    def _find_elsewhere(self, name: str, path: Any, target: Any) -> Any:
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                return spec
        return None


def _install() -> None:
    caps = _caps()
    if caps:
        hooks = {
            "torch": lambda m: _cap_torch(m, caps),
            "tensorflow": lambda m: _cap_tensorflow(m, caps),
        }
        sys.meta_path.insert(0, _AfterImport(hooks))


def _chain() -> None:
    """Run the next ``sitecustomize`` on sys.path, which this one shadows."""
    here = os.path.realpath(__file__)
    folder = os.path.dirname(here)
    sys.path[:] = [
        p for p in sys.path if not (isinstance(p, str) and os.path.realpath(p or ".") == folder)
    ]
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("sitecustomize", sys.path)
    if spec is None or spec.loader is None or os.path.realpath(spec.origin or "") == here:
        return
    from importlib.util import module_from_spec

    ours = sys.modules.get("sitecustomize")
    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # as a plain `import sitecustomize` would have it
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        if ours is not None:
            sys.modules["sitecustomize"] = ours
        _warn(f"the other sitecustomize at {spec.origin} failed: {exc}")


try:
    _install()
except Exception as exc:
    _warn(exc)
if os.environ.get("BITFUSION_FILES") and sys.version_info >= (3, 8):
    try:  # an optimisation: without it, Python's own __pycache__ in the folder
        import bitfusion_folder_bytecode  # type: ignore[import-not-found]  # share_site's

        bitfusion_folder_bytecode.install(os.environ["BITFUSION_FILES"], os.path.expanduser("~"))
    except Exception:
        pass
try:
    _chain()
except Exception as exc:
    _warn(exc)
