"""The gateway's kernel environments (--kernels): which encrypt their channels, and the
banner line that tells the admin."""

from __future__ import annotations

import json

import pytest

from gateway import kernels

ARGV = ["/opt/conda/envs/torch/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def _load(tmp_path, entries: dict) -> dict[str, kernels.KernelEnv]:
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(entries))
    return kernels.load_kernels(path)


def test_an_entry_says_whether_its_kernels_take_curve_keys_as_a_kernel_json_does(tmp_path):
    envs = _load(
        tmp_path,
        {
            "plain": ARGV,
            "listed": {"argv": ARGV, "metadata": {"supported_encryption": ["curve"]}},
            "named": {"argv": ARGV, "metadata": {"supported_encryption": "CURVE"}},
            "silent": {"argv": ARGV, "metadata": {"debugger": True}},
        },
    )
    assert {name: env.curve for name, env in envs.items() if name != "python3"} == {
        "plain": False,
        "listed": True,
        "named": True,
        "silent": False,
    }
    assert envs["listed"].argv == ARGV


def test_an_object_entry_without_an_argv_is_refused_by_name(tmp_path):
    with pytest.raises(kernels.KernelConfigError) as err:
        _load(tmp_path, {"torch": {"metadata": {}}})
    assert str(err.value) == (
        f"--kernels {tmp_path / 'kernels.json'}: 'torch' needs a list of strings (argv), or an "
        'object with one under "argv".'
    )


def test_the_banner_names_the_environments_whose_channels_are_not_encrypted():
    envs = {
        "python3": kernels.KernelEnv(ARGV, curve=True),
        "torch": kernels.KernelEnv(ARGV, curve=False),
        "jax": kernels.KernelEnv(ARGV, curve=False),
    }
    line = kernels.kernels_line(envs)
    assert line.startswith("python3 with CurveZMQ-encrypted channels; jax, torch NOT encrypted")
    assert kernels.kernels_line({"python3": envs["python3"]}) == (
        "python3 with CurveZMQ-encrypted channels"
    )


def test_plain_kernel_channels_give_no_environment_keys_and_the_banner_says_why(tmp_path):
    envs = kernels.load_kernels(None, curve=False)
    assert [env.curve for env in envs.values()] == [False]
    assert kernels.kernels_line(envs, curve=False) == (
        "python3 NOT encrypted on the loopback, so code in other shares can listen "
        "(--plain-kernel-channels)"
    )
