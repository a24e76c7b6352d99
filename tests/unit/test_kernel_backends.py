"""Both kernels a shim forwards to, on a share and on this machine, offer everything the shim
asks of one (kernel_backends.KernelBackend), with the same parameters."""

import inspect

import pytest

from bitfusion_jupyter.kernel_backends import KernelBackend, LocalChild, RemoteKernel

ASKED = sorted(n for n in vars(KernelBackend) if not n.startswith("_"))


def test_the_interface_names_what_the_shim_asks():
    assert ASKED == [
        "drain", "exit_code", "interrupt", "poll_sockets", "probe", "ready", "send",
    ]  # fmt: skip


@pytest.mark.parametrize("backend", [RemoteKernel, LocalChild], ids=lambda c: c.__name__)
def test_each_backend_offers_it(backend):
    for name in ASKED:
        wanted = vars(KernelBackend)[name]
        offered = getattr(backend, name, None)
        assert offered is not None, f"{backend.__name__} has no {name}"
        if inspect.isfunction(wanted):
            assert list(inspect.signature(offered).parameters) == list(
                inspect.signature(wanted).parameters
            ), f"{backend.__name__}.{name} takes other parameters"
