import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.mps import mps_pipe_dir, mps_running
from gateway.share_env import SHARE_SITE, ShareGpu, share_environment

GPUS = [
    ShareGpu(3, "GPU-aaaa", "Sim", 2048, 16384),
    ShareGpu(1, "GPU-bbbb", "Sim", 8192, 16384),
]


def env_of(gpus=GPUS, *, mps=False, usage_dir=None, base=None) -> dict[str, str]:
    return share_environment(
        server="gpuhost",
        share_id="s-12",
        gpus=gpus,
        simulated_usage_dir=usage_dir,
        mps=mps,
        base={"HOME": "/home/alice"} if base is None else base,
    )


def test_a_share_sees_its_gpus_in_share_order():
    env = env_of(usage_dir=Path("/state/simulated-usage"))
    assert env["HOME"] == "/home/alice"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["BITFUSION_SERVER"] == "gpuhost" and env["BITFUSION_SHARE_ID"] == "s-12"
    assert env["BITFUSION_GPU_INDICES"] == "3,1"
    assert env["BITFUSION_GPU_UUIDS"] == "GPU-aaaa,GPU-bbbb"
    assert env["BITFUSION_MEMORY_MIB"] == "2048,8192"
    assert env["BITFUSION_GPU_MEMORY_TOTAL_MIB"] == "16384,16384"
    assert env["BITFUSION_SIMULATED"] == "1"
    assert env["BITFUSION_SIMULATED_USAGE_DIR"] == "/state/simulated-usage"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env


def test_the_base_environment_is_not_changed_and_stale_values_do_not_leak():
    base = {
        "BITFUSION_SIMULATED_USAGE_DIR": "/elsewhere",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=99999M",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
    }
    env = env_of(base=base)
    assert base["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert env["BITFUSION_SIMULATED"] == "0"
    assert "BITFUSION_SIMULATED_USAGE_DIR" not in env
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env


def test_framework_caps_follow_the_tightest_gpu_and_never_exceed_the_share():
    env = env_of()
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.125"
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["CUPY_GPU_MEMORY_LIMIT"] == str(2048 * 1024 * 1024)
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    thirds = env_of([ShareGpu(0, "GPU-c", "Sim", 2, 3)])
    assert thirds["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.666"  # rounded down, not to 0.667
    whole = env_of([ShareGpu(0, "GPU-c", "Sim", 16384, 16384)])
    assert whole["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "1.000"


def test_mps_limit_uses_the_ordinals_the_share_sees():
    env = env_of(mps=True)
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M,1=8192M"


def test_share_site_goes_first_on_pythonpath_and_keeps_the_rest():
    env = env_of(base={"PYTHONPATH": f"/opt/lib{os.pathsep}/srv/lib"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SHARE_SITE), "/opt/lib", "/srv/lib"]
    again = env_of(base=env)  # a share's environment used as a base does not stack it twice
    assert again["PYTHONPATH"] == env["PYTHONPATH"]
    assert env_of()["PYTHONPATH"] == str(SHARE_SITE)


# --- the share's sitecustomize, run in real interpreters -------------------------------------

FAKE_TORCH_CUDA = """
import json, os
_queued = []

def _record(*call):
    if os.environ.get("FAKE_FAIL"):
        raise RuntimeError("the driver said no")
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(call) + "\\n")

def device_count():
    return 2

def is_available():
    return True

def set_per_process_memory_fraction(fraction, device=None):
    _record("torch", fraction, device)

def init():  # what real torch does when a program first uses CUDA: run the queued calls
    for call in _queued:
        call()
"""
LAZY_CALL = """
def _lazy_call(callable, **kwargs):
    _queued.append(callable)
"""
FAKE_TF_CONFIG = """
import json, os

class LogicalDeviceConfiguration:
    def __init__(self, memory_limit=None):
        self.memory_limit = memory_limit

def list_physical_devices(kind):
    return [f"/physical_device:{kind}:{i}" for i in range(2)]

def set_logical_device_configuration(device, configs):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(["tf", device, [c.memory_limit for c in configs]]) + "\\n")
"""


def fake_frameworks(root: Path, lazy: bool = True) -> Path:
    """Tiny stand-ins for torch and tensorflow (not installed here) that log their calls."""
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "__init__.py").write_text("from . import cuda\n")
    (root / "torch" / "cuda.py").write_text(FAKE_TORCH_CUDA + (LAZY_CALL if lazy else ""))
    (root / "tensorflow").mkdir()
    (root / "tensorflow" / "__init__.py").write_text("from . import config\n")
    (root / "tensorflow" / "config.py").write_text(FAKE_TF_CONFIG)
    return root


def run_in_share(tmp_path: Path, code: str, gpus=GPUS, pythonpath: str = "", **extra: str):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BITFUSION_", "PYTHON"))}
    base.update(PYTHONPATH=pythonpath, FAKE_LOG=str(tmp_path / "calls.log"), **extra)
    env = env_of(gpus, base=base)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    log = tmp_path / "calls.log"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy_call", "no_lazy_call"])
def test_torch_is_capped_per_device_when_cuda_starts(tmp_path, lazy):
    fakes = str(fake_frameworks(tmp_path / "fakes", lazy))
    proc, calls = run_in_share(tmp_path, "import torch; torch.cuda.init()", pythonpath=fakes)
    assert proc.returncode == 0 and proc.stderr == ""
    assert calls == [["torch", 0.125, 0], ["torch", 0.5, 1]]


def test_importing_torch_alone_does_not_start_cuda(tmp_path):
    fakes = str(fake_frameworks(tmp_path / "fakes"))
    proc, calls = run_in_share(tmp_path, "import torch", pythonpath=fakes)
    assert proc.returncode == 0 and calls == []


def test_probing_for_torch_before_importing_it_keeps_the_cap(tmp_path):
    fakes = str(fake_frameworks(tmp_path / "fakes"))
    code = (
        "import importlib.util; importlib.util.find_spec('torch'); import torch; torch.cuda.init()"
    )
    proc, calls = run_in_share(tmp_path, code, pythonpath=fakes)
    assert proc.returncode == 0 and calls == [["torch", 0.125, 0], ["torch", 0.5, 1]]


def test_a_gpu_granted_whole_gets_no_cap(tmp_path):
    fakes = str(fake_frameworks(tmp_path / "fakes"))
    gpus = [ShareGpu(0, "GPU-a", "Sim", 16384, 16384), ShareGpu(1, "GPU-b", "Sim", 4096, 16384)]
    proc, calls = run_in_share(
        tmp_path, "import torch; torch.cuda.init()", gpus=gpus, pythonpath=fakes
    )
    assert calls == [["torch", 0.25, 1]]


def test_tensorflow_gets_a_logical_device_limit_per_gpu(tmp_path):
    fakes = str(fake_frameworks(tmp_path / "fakes"))
    proc, calls = run_in_share(tmp_path, "import tensorflow", pythonpath=fakes)
    assert proc.returncode == 0 and proc.stderr == ""
    assert calls == [
        ["tf", "/physical_device:GPU:0", [2048]],
        ["tf", "/physical_device:GPU:1", [8192]],
    ]


def test_a_failing_cap_costs_one_warning_line_and_nothing_else(tmp_path):
    fakes = str(fake_frameworks(tmp_path / "fakes"))
    code = "import torch; torch.cuda.init(); print('still running')"
    proc, _ = run_in_share(tmp_path, code, pythonpath=fakes, FAKE_FAIL="1")
    assert proc.returncode == 0 and proc.stdout == "still running\n"
    assert proc.stderr.count("\n") == 1 and "could not apply" in proc.stderr
    assert "the driver said no" in proc.stderr


def test_a_garbled_share_environment_does_not_break_python(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BITFUSION_", "PYTHON"))}
    env = {**env_of(base=base), "BITFUSION_MEMORY_MIB": "lots"}
    proc = subprocess.run(
        [sys.executable, "-c", "print('ok')"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n"
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bitfusion: ")


def test_a_sitecustomize_further_along_the_path_still_runs(tmp_path):
    other = tmp_path / "venv-site"
    other.mkdir()
    marker = tmp_path / "other-ran"
    (other / "sitecustomize.py").write_text(
        f"open({str(marker)!r}, 'w').write('yes')\nFLAVOUR = 'theirs'\n"
    )
    code = textwrap.dedent(
        f"""
        import sys, sitecustomize
        print(sitecustomize.FLAVOUR)
        print({str(SHARE_SITE)!r} in sys.path)
        """
    )
    proc, _ = run_in_share(tmp_path, code, pythonpath=str(other))
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.split() == ["theirs", "False"]
    assert marker.read_text() == "yes"


# --- MPS detection ------------------------------------------------------------------------


def test_mps_pipe_dir_needs_the_control_pipe(tmp_path):
    assert mps_pipe_dir({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) is None
    (tmp_path / "control").write_text("")  # a plain file is not the daemon's pipe
    assert mps_pipe_dir({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) is None
    (tmp_path / "control").unlink()
    os.mkfifo(tmp_path / "control")
    assert mps_pipe_dir({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) == str(tmp_path)
    assert mps_running({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})


def test_a_running_mps_control_process_is_found(tmp_path):
    no_pipe = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    if mps_running(no_pipe):
        pytest.skip("an MPS control daemon really runs here")
    # A real process by the daemon's name (a copy of sleep) is what /proc shows for one.
    daemon = tmp_path / "nvidia-cuda-mps-control"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", daemon)
    proc = subprocess.Popen([str(daemon), "30"])
    try:
        # Popen returns a moment before the kernel fills in the new program's command line.
        deadline = time.monotonic() + 5
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mps_running(no_pipe)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not mps_running(no_pipe)


def test_share_site_reads_the_variables_by_the_names_the_gateway_sets():
    # share_site runs under the user's Python, without our packages, so it spells the names:
    # each must be one remoting.share_env defines (a rename there would silently stop it).
    import re

    from remoting import share_env as names

    defined = {v for v in vars(names).values() if isinstance(v, str)}
    read = set()
    for path in SHARE_SITE.glob("*.py"):
        read |= set(re.findall(r'"(BITFUSION_[A-Z_]+)"', path.read_text()))
    assert read and read <= defined, read - defined
