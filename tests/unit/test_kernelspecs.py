"""`bitfusion kernelspec install/list/remove`, checked through Jupyter's own KernelSpecManager.

Every install goes to tmp dirs (--user under JUPYTER_DATA_DIR, or --prefix): never system-wide.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from bitfusion_jupyter import config, kernelspec_command, kernelspecs, share_request
from bitfusion_jupyter.share_request import ShareRequest, UsageError


@pytest.fixture
def jupyter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Jupyter: --user installs land in the returned data dir."""
    data = tmp_path / "jupyter-data"
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter-path"))
    # No servers configured: whatever this machine's own servers.conf says stays out of it.
    monkeypatch.setenv("BITFUSION_CONFIG_DIR", str(tmp_path / "bitfusion"))
    monkeypatch.setattr(config, "SYSTEM_SERVERS_CONF", tmp_path / "none.conf")
    monkeypatch.delenv("BITFUSION_SERVERS", raising=False)
    return data


def bf(*argv: str) -> int:
    """`bitfusion kernelspec ARGV`, parsed by the same parser the CLI uses."""
    parser = argparse.ArgumentParser(prog="bitfusion kernelspec")
    kernelspec_command.add_arguments(parser)
    return kernelspec_command.run(parser.parse_args(list(argv)))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_install_writes_a_kernelspec_jupyter_can_start(jupyter: Path, capsys) -> None:
    args = ["-n", "2", "-m", "4096", "--filter", "device.name=A100", "--wait", "30"]
    assert bf("install", *args, "-l", "gpu1,gpu2:56002", "--user") == 0
    spec = KernelSpecManager().get_kernel_spec("bitfusion-2gpu-4096mib")

    assert spec.argv == [
        sys.executable,
        "-m",
        "bitfusion_jupyter.shim",
        "--connection-file",
        "{connection_file}",
        "-n",
        "2",
        "-m",
        "4096",
        "--filter",
        "device.name=A100",
        "--wait",
        "30",
        "-l",
        "gpu1:56001,gpu2:56002",
        "--kernel",
        "python3",
    ]
    assert spec.display_name == "Python 3 · 2 GPUs × 4 GiB"
    assert spec.language == "python"
    assert spec.interrupt_mode == "signal"
    assert spec.metadata == {
        "bitfusion": {
            "gpus": 2,
            "mib": 4096,
            "fraction": None,
            "filters": [["device.name", "=", "A100"]],
            "wait_s": 30.0,
            "kernel": "python3",
            "servers": "gpu1:56001,gpu2:56002",
            "files": True,
        },
        "debugger": False,
        "supported_encryption": ["curve"],  # Jupyter servers may hand the shim CurveZMQ keys
    }
    where = Path(spec.resource_dir)
    assert where == jupyter / "kernels" / "bitfusion-2gpu-4096mib"
    assert png_size(where / "logo-32x32.png") == (32, 32)
    assert png_size(where / "logo-64x64.png") == (64, 64)
    assert ET.parse(where / "logo-svg.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert (
        f"Installed kernelspec bitfusion-2gpu-4096mib (Python 3 · 2 GPUs × 4 GiB) in {where}."
        in (capsys.readouterr().out)
    )


def test_the_shim_reads_its_options_back_as_the_same_share() -> None:
    from bitfusion_jupyter import shim

    args = ["-n", "3", "-m", "1500", "--filter", "device.memory>=16GiB"]
    memory = share_request.from_args(shim.parse_args(["-f", "c.json", *args]))
    for request in (memory, ShareRequest(1, fraction=1 / 3, wait_s=2.5)):
        argv = kernelspecs.shim_argv(request, "py311", "gpu1:56001")
        assert argv[:3] == [sys.executable, "-m", "bitfusion_jupyter.shim"]
        parsed = shim.parse_args(argv[3:])
        assert share_request.from_args(parsed) == request
        assert parsed.kernel == "py311" and parsed.server_list == "gpu1:56001"
        assert str(parsed.connection_file) == "{connection_file}"


def test_kernels_carry_their_notebooks_folder_unless_installed_with_no_files(jupyter: Path):
    from bitfusion_jupyter import shim

    assert bf("install", "-m", "1024", "--user") == 0
    assert bf("install", "-m", "1024", "--no-files", "--user") == 0
    manager = KernelSpecManager()
    carrying = shim.parse_args(manager.get_kernel_spec("bitfusion-1gpu-1024mib").argv[3:])
    assert carrying.files is None and not carrying.no_files  # the kernel's cwd: its notebook's
    spec = manager.get_kernel_spec("bitfusion-1gpu-1024mib-nofiles")
    assert shim.parse_args(spec.argv[3:]).no_files
    assert spec.display_name == "Python 3 · 1 GPU × 1 GiB · no folder"
    files = {s["name"]: s["bitfusion"]["files"] for s in kernelspecs.installed()}
    assert files == {"bitfusion-1gpu-1024mib": True, "bitfusion-1gpu-1024mib-nofiles": False}


@pytest.mark.parametrize(
    ("request_", "display", "name"),
    [
        (ShareRequest(2, mib=4096), "Python 3 · 2 GPUs × 4 GiB", "bitfusion-2gpu-4096mib"),
        (ShareRequest(1, mib=1500), "Python 3 · 1 GPU × 1500 MiB", "bitfusion-1gpu-1500mib"),
        (ShareRequest(1, fraction=0.5), "Python 3 · 1 GPU × ½", "bitfusion-1gpu-p50"),
        (ShareRequest(1, fraction=0.25), "Python 3 · 1 GPU × ¼", "bitfusion-1gpu-p25"),
        (ShareRequest(1, fraction=0.3), "Python 3 · 1 GPU × 0.3 of a GPU", "bitfusion-1gpu-p30"),
        (ShareRequest(1), "Python 3 · 1 GPU", "bitfusion-1gpu"),
        (ShareRequest(2), "Python 3 · 2 GPUs", "bitfusion-2gpu"),
    ],
)
def test_default_names(jupyter: Path, request_: ShareRequest, display: str, name: str) -> None:
    assert kernelspecs.display_name_for(request_) == display
    path = kernelspecs.install(
        request_,
        name=None,
        display_name=None,
        kernel="python3",
        servers=None,
        user=True,
        sys_prefix=False,
    )
    assert path.name == name
    assert KernelSpecManager().get_kernel_spec(name).display_name == display


def test_name_display_name_and_kernel_are_the_users(jupyter: Path, capsys) -> None:
    bf("install", "-p", "0.5", "--name", "A100-Half", "--display-name", "A100 half", "--user")
    bf("install", "--kernel", "py311", "--name", "other", "--user")
    # With no server to ask, a kernel name is taken on trust, and the user is told so.
    assert "no server could be asked, so --kernel py311 was not checked" in capsys.readouterr().err
    spec = KernelSpecManager().get_kernel_spec("a100-half")  # Jupyter lowercases names
    assert spec.display_name == "A100 half"
    assert spec.argv[5:] == ["-n", "1", "-p", "0.5", "--kernel", "python3"]
    other = KernelSpecManager().get_kernel_spec("other")
    assert other.display_name == "py311 · 1 GPU"
    assert other.argv[-2:] == ["--kernel", "py311"]


def test_installing_again_replaces_the_kernelspec(jupyter: Path) -> None:
    bf("install", "--name", "mine", "-m", "2048", "--user")
    bf("install", "--name", "mine", "-m", "1024", "--user")
    assert KernelSpecManager().get_kernel_spec("mine").display_name == "Python 3 · 1 GPU × 1 GiB"


def test_prefix_installs_under_it(jupyter: Path, tmp_path: Path) -> None:
    bf("install", "-n", "1", "--prefix", str(tmp_path / "env"))
    assert (tmp_path / "env/share/jupyter/kernels/bitfusion-1gpu/kernel.json").is_file()


def test_presets_install_four_and_print_them(jupyter: Path, capsys) -> None:
    assert bf("install", "--presets", "--filter", "device.name=A100", "--user") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "DISPLAY", "NAME", "SHARE", "LOCATION"]
    names = ["bitfusion-quarter-gpu", "bitfusion-half-gpu", "bitfusion-1gpu", "bitfusion-2gpu"]
    assert [line.split()[0] for line in out[1:]] == names
    assert "Python 3 · 1 GPU × ¼" in out[1] and str(jupyter / "kernels") in out[1]
    manager = KernelSpecManager()
    assert [manager.get_kernel_spec(n).display_name for n in names] == [
        "Python 3 · 1 GPU × ¼",
        "Python 3 · 1 GPU × ½",
        "Python 3 · 1 GPU",
        "Python 3 · 2 GPUs",
    ]
    # --filter applies to every preset
    assert all("device.name=A100" in manager.get_kernel_spec(n).argv for n in names)
    assert [r for _, r in kernelspecs.presets()] == [
        ShareRequest(1, fraction=0.25),
        ShareRequest(1, fraction=0.5),
        ShareRequest(1),
        ShareRequest(2),
    ]


def test_list_shows_only_bitfusion_kernelspecs(jupyter: Path, tmp_path: Path, capsys) -> None:
    _plain_kernelspec(tmp_path / "jupyter-path", "plain")
    bf("install", "-n", "2", "-m", "4096", "--filter", "device.name=A100", "--user")
    bf("install", "-p", "0.25", "-l", "gpu1", "--user")
    capsys.readouterr()

    assert bf("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "DISPLAY", "NAME", "SHARE", "LOCATION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "plain" not in rows
    assert "2 GPUs × 4 GiB, device.name=A100" in rows["bitfusion-2gpu-4096mib"]
    assert "1 GPU × ¼, on gpu1:56001" in rows["bitfusion-1gpu-p25"]
    assert str(jupyter / "kernels" / "bitfusion-1gpu-p25") in rows["bitfusion-1gpu-p25"]

    assert bf("list", "--json") == 0
    listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert "plain" not in listed
    mine = listed["bitfusion-2gpu-4096mib"]
    assert mine["display_name"] == "Python 3 · 2 GPUs × 4 GiB"
    assert mine["location"] == str(jupyter / "kernels" / "bitfusion-2gpu-4096mib")
    assert mine["bitfusion"]["mib"] == 4096
    assert mine["bitfusion"]["filters"] == [["device.name", "=", "A100"]]


def _plain_kernelspec(jupyter_path: Path, name: str) -> None:
    """An ordinary (non-bitfusion) kernelspec, as ipykernel would write one."""
    where = jupyter_path / "kernels" / name
    where.mkdir(parents=True)
    spec = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    (where / "kernel.json").write_text(json.dumps({**spec, "display_name": "Plain"}))


def test_remove(jupyter: Path, capsys) -> None:
    bf("install", "-n", "1", "--user")
    bf("install", "-n", "2", "--user")
    assert bf("remove", "bitfusion-1gpu", "bitfusion-2gpu") == 0
    assert "Removed kernelspec bitfusion-1gpu" in capsys.readouterr().out
    for name in ("bitfusion-1gpu", "bitfusion-2gpu"):
        with pytest.raises(NoSuchKernel):
            KernelSpecManager().get_kernel_spec(name)
    assert not (jupyter / "kernels" / "bitfusion-1gpu").exists()


def test_remove_refuses_other_kernelspecs_and_unknown_names(jupyter: Path, tmp_path: Path) -> None:
    _plain_kernelspec(tmp_path / "jupyter-path", "plain")
    bf("install", "-n", "1", "--user")
    with pytest.raises(UsageError, match="'plain' is not a bitfusion kernelspec"):
        bf("remove", "bitfusion-1gpu", "plain")
    with pytest.raises(UsageError, match="No kernelspec is named 'nope'"):
        bf("remove", "nope")
    # a refused removal removes nothing, not even the names before the bad one
    assert (tmp_path / "jupyter-path/kernels/plain/kernel.json").exists()
    assert KernelSpecManager().get_kernel_spec("bitfusion-1gpu")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-p", "1.5"], r"-p 1.5 is outside \(0, 1\]"),
        (["-n", "0"], "-n 0 asks for no GPU"),
        (["--filter", "colour=red"], "filter 'colour=red' is not understood"),
        (["--sys-prefix"], "--user and --sys-prefix name different places"),
        (["--prefix", "/tmp/x"], "--user and --prefix name different places"),
        (["--name", "two words"], "--name 'two words' cannot name a kernelspec"),
        (["-l", "gpu1:port"], "'gpu1:port' is not host"),
        (["--kernel", " "], "--kernel is empty"),
        (["--presets", "-n", "1", "-m", "2"], "--presets .* leave out -n, -m"),
        (["--name", "plain"], "'plain' is already a kernelspec that is not a bitfusion one"),
    ],
)
def test_bad_install_says_why_and_installs_nothing(
    jupyter: Path, tmp_path: Path, argv: list[str], says: str
) -> None:
    _plain_kernelspec(tmp_path / "jupyter-path", "plain")
    with pytest.raises(UsageError, match=says):
        bf("install", *argv, "--user")
    assert not (jupyter / "kernels").exists()
    assert (tmp_path / "jupyter-path/kernels/plain/kernel.json").exists()


def test_help_says_where_it_installs_by_default(capsys) -> None:
    with pytest.raises(SystemExit):
        bf("install", "--help")
    assert "system-wide unless --user, --sys-prefix or --prefix" in " ".join(
        capsys.readouterr().out.split()
    )


def test_servers_but_no_token_yet_install_with_a_note(jupyter: Path, capsys) -> None:
    # An admin installing kernelspecs for the users of a Jupyter server holds no user token:
    # the servers cannot be asked, which is no reason to refuse (it was a traceback).
    assert bf("install", "--user", "-m", "1024", "--kernel", "julia", "-l", "gpu1") == 0
    assert "Note: no server could be asked, so --kernel julia was not checked" in (
        capsys.readouterr().err
    )
    assert (jupyter / "kernels" / "bitfusion-1gpu-1024mib" / "kernel.json").exists()


# --- --provisioner: the bitfusion-provisioner takes the share, the shim only forwards ------


def test_provisioner_kernelspecs_name_it_and_keep_the_shims_argv(jupyter: Path) -> None:
    share = ["-n", "2", "-m", "4096", "--filter", "device.memory>=16GiB", "--wait", "30"]
    assert bf("install", *share, "-l", "gpu1", "--no-files", "--name", "plain", "--user") == 0
    assert bf("install", *share, "-l", "gpu1", "--no-files", "--name", "prov", "--user",
              "--provisioner") == 0  # fmt: skip
    manager = KernelSpecManager()
    plain, prov = manager.get_kernel_spec("plain"), manager.get_kernel_spec("prov")
    # Frontends that ignore provisioners start the same shim, which then takes the share.
    assert prov.argv == plain.argv
    assert prov.display_name == plain.display_name
    assert prov.metadata["bitfusion"] == plain.metadata["bitfusion"]
    assert "kernel_provisioner" not in plain.metadata
    assert prov.metadata["kernel_provisioner"] == {
        "provisioner_name": "bitfusion-provisioner",
        "config": {
            "gpus": 2,
            "mib": 4096,
            "fraction": None,
            "filters": ["device.memory>=16384"],  # as --filter takes it; MiB when no unit
            "wait_s": 30.0,
            "servers": "gpu1:56001",
            "kernel": "python3",
            "files": False,
        },
    }
    listed = {s["name"]: s["provisioner"] for s in kernelspecs.installed()}
    assert listed == {"plain": None, "prov": "bitfusion-provisioner"}


def test_the_provisioner_reads_its_config_back_as_the_same_share(jupyter: Path) -> None:
    """Through jupyter_client's own factory, as a Jupyter server starts the kernel: the
    entry point is installed, and the kernelspec's config becomes the provisioner's traits."""
    from jupyter_client.provisioning import KernelProvisionerFactory

    from bitfusion_jupyter import shim
    from bitfusion_jupyter.provisioner import BitfusionProvisioner, shim_command

    cases = [
        (["-n", "2", "-m", "4096", "--filter", "device.memory>=16GiB", "--wait", "30"], False),
        (["-p", "0.5", "--filter", "device.name=A100", "-l", "gpu1", "--kernel", "torch"], True),
    ]
    for options, files in cases:
        no_files = [] if files else ["--no-files"]
        assert bf("install", *options, *no_files, "--name", "k", "--user", "--provisioner") == 0
        spec = KernelSpecManager().get_kernel_spec("k")
        provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            "kernel-1", spec, parent=None
        )
        assert isinstance(provisioner, BitfusionProvisioner)
        wanted = share_request.from_args(shim.parse_args(spec.argv[3:]))
        assert provisioner.share_request() == wanted
        # The command it starts tells the shim the same kernel, folder and servers.
        argv = shim_command(spec.argv, provisioner.kernel, provisioner.files, provisioner.servers)
        assert shim.parse_args(argv[3:]) == shim.parse_args(spec.argv[3:])


def test_the_provisioner_sets_what_the_shim_forwards_to_from_its_config() -> None:
    from bitfusion_jupyter import shim
    from bitfusion_jupyter.provisioner import shim_command

    cmd = [sys.executable, "-m", "bitfusion_jupyter.shim", "--connection-file", "c.json",
           "-m", "1024", "--no-files", "-l", "old:1", "--kernel=py39", "extra.py"]  # fmt: skip
    argv = shim_command(cmd, "torch", "/data/project", "gpu1:56001,gpu2:56001")
    assert argv[:7] == [*cmd[:5], "-m", "1024"]
    args = shim.parse_args(argv[3:])
    assert args.kernel == "torch" and args.server_list == "gpu1:56001,gpu2:56001"
    assert args.files == "/data/project" and not args.no_files
    assert "extra.py" in argv  # what the frontend passed stays: the shim says it sets it aside
    assert shim.parse_args(shim_command(cmd, "python3", False, None)[3:]).no_files
    carried = shim.parse_args(shim_command(cmd, "python3", True, None)[3:])
    assert carried.files is None and not carried.no_files and carried.server_list is None


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"gpus": 0}, "-n 0 asks for no GPU"),
        ({"fraction": 1.5}, "-p 1.5 is outside (0, 1]"),
        ({"filters": ["colour=red"]}, "filter 'colour=red' is not understood"),
        ({"wait_s": -1.0}, "--wait -1 is negative"),
    ],
)
def test_a_bad_provisioner_config_is_one_sentence(config: dict, says: str) -> None:
    from jupyter_client.kernelspec import KernelSpec

    from bitfusion_jupyter.provisioner import BitfusionProvisioner, ShareError

    spec = KernelSpec(argv=kernelspecs.shim_argv(ShareRequest(), "python3", None))
    with pytest.raises(ShareError) as raised:
        BitfusionProvisioner(kernel_id="k", kernel_spec=spec, **config).share_request()
    assert says in str(raised.value) and "\n" not in str(raised.value)
    assert raised.value.status_code == 400


def test_presets_take_the_provisioner_too(jupyter: Path, capsys) -> None:
    assert bf("install", "--presets", "--provisioner", "--user") == 0
    named = {s["name"]: s["provisioner"] for s in kernelspecs.installed()}
    assert set(named.values()) == {"bitfusion-provisioner"} and len(named) == 4
    config = (
        KernelSpecManager()
        .get_kernel_spec("bitfusion-quarter-gpu")
        .metadata["kernel_provisioner"]["config"]
    )
    assert (config["gpus"], config["fraction"], config["files"]) == (1, 0.25, True)


def test_installing_for_a_provisioner_that_is_not_installed_says_so(
    jupyter: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert kernelspecs.provisioner_installed()  # `pip install -e .` registers it
    assert bf("install", "-m", "1024", "--user", "--provisioner") == 0
    assert "is not installed" not in capsys.readouterr().err
    monkeypatch.setattr(kernelspecs, "provisioner_installed", lambda: False)
    assert bf("install", "-m", "1024", "--user", "--provisioner") == 0
    err = capsys.readouterr().err
    assert "Note: bitfusion-provisioner is not installed as a Jupyter kernel provisioner" in err
