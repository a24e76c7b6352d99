"""The gateway's kernel environments (--kernels): how each keeps its channels from other
shares (--kernel-channels), and the banner line that tells the admin."""

from __future__ import annotations

import json

import pytest

from gateway import kernels
from remoting.protocol import jupyter_endpoint

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


@pytest.mark.parametrize(
    "mode, abi, want",
    [
        ("auto", 6, "ipc"),  # Landlock scopes abstract unix sockets to the share
        ("auto", 7, "ipc"),
        ("auto", 5, "curve"),  # it cannot: keys instead
        ("auto", 0, "curve"),  # shares not confined at all
        ("curve", 7, "curve"),
        ("plain", 7, "plain"),
    ],
)
def test_ipykernel_gets_scoped_unix_sockets_where_landlock_can_keep_them_to_the_share(
    mode, abi, want
):
    assert kernels.channel_kind(kernels.DEFAULT_KERNELS["python3"], mode, abi) == want


def test_a_kernel_that_is_not_ipykernel_gets_no_unix_sockets(tmp_path):
    envs = _load(
        tmp_path,
        {
            "ir": {
                "argv": ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]
            },
            "torch": ARGV,
        },
    )
    assert kernels.channel_kind(envs["ir"], "auto", 7) == "plain"
    assert kernels.channel_kind(envs["torch"], "auto", 7) == "ipc"
    line = kernels.kernels_line(envs, "auto", 7)
    assert line.startswith("python3, torch on unix sockets that Landlock keeps to its share; ")
    assert "ir NOT encrypted on the loopback" in line


def test_plain_kernel_channels_give_no_environment_keys_and_the_banner_says_why():
    assert kernels.kernels_line(dict(kernels.DEFAULT_KERNELS), "plain", 7) == (
        "python3 NOT encrypted on the loopback, so code in other shares can listen "
        "(--kernel-channels plain)"
    )


def test_a_unix_socket_connection_file_names_sockets_nobody_can_guess(tmp_path):
    _, one = kernels.write_connection_file(tmp_path, "k-1", "key", "hmac-sha256", "ipc")
    _, two = kernels.write_connection_file(tmp_path, "k-1", "key", "hmac-sha256", "ipc")
    assert one["transport"] == "ipc" and one["ip"].startswith("@bitfusion-k-1-")
    assert one["ip"] != two["ip"] and "curve_secretkey" not in one
    assert jupyter_endpoint(one, "iopub") == f"ipc://{one['ip']}-{one['iopub_port']}"
