"""Pulled cables between the client host and the GPU servers.

A short cut must cost nothing: the kernel lives on, and every output line arrives once, in
order, after the link returns. A cut longer than the lease grace must cost the share: the
server ends it and its processes, and the client says so in one sentence.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import PRINTS_ITS_PID_AND_WAITS, client_left, client_only
from tests.support.processes import ECHOES_ITS_STDIN, PRINTS_ITS_PID, host_pid
from tests.support.waiting import wait_for

PRINTS_FOR_10_S = (
    "import time\n"
    "for i in range(100):\n"
    "    print(i, time.time(), flush=True)\n"
    "    time.sleep(0.1)\n"
)


def _line_arrivals(arrivals: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """(first word, arrival time) of each whole line; a line may come in several chunks,
    and it arrived with the chunk that completed it."""
    done, partial = [], ""
    for arrived, text in arrivals:
        partial += text
        *lines, partial = partial.split("\n")
        done += [(line.split()[0], arrived) for line in lines if line]
    return done


def test_a_kernel_rides_out_a_5_s_cut_and_every_output_arrives_once(cluster, figures):
    fe = cluster.frontend()
    fe.call("start", args=["-m", "1024"])
    fe.send_cell(PRINTS_FOR_10_S, timeout=120)
    time.sleep(2)
    cluster.client.cut()
    cut_at = time.time()
    time.sleep(5)
    cluster.client.restore()
    restored_at = time.time()

    out = fe.outcome()
    assert out["status"] == "ok", out
    lines = [line.split() for line in out["stdout"].splitlines()]
    assert [int(n) for n, _ in lines] == list(range(100)), "output lost or duplicated"
    # The cut was real: what the kernel printed well inside it reached us only afterwards.
    printed_inside = {n for n, t in lines if cut_at + 0.5 < float(t) < restored_at - 0.5}
    assert printed_inside, "the kernel printed nothing during the cut"
    for n, arrived in _line_arrivals(out["arrivals"]):
        if n in printed_inside:
            assert arrived >= restored_at - 0.1, f"line {n} crossed a pulled cable"
    figures["lines"] = len(lines)
    figures["lines held back by the cut"] = len(printed_inside)
    figures["s from restore to first held-back line"] = round(
        min(a for n, a in _line_arrivals(out["arrivals"]) if n in printed_inside) - restored_at,
        2,
    )

    assert fe.run_cell("print(i)")["stdout"] == "99\n", "the kernel lost its state"
    assert len(cluster.shares()) == 1


def test_a_command_rides_out_a_5_s_cut(cluster):
    client = cluster.run_python(
        "import time\nfor i in range(80):\n    print(i)\n    time.sleep(0.1)\n", "-m", "1024"
    )
    assert client.stdout.readline() == "0\n"
    cluster.client.cut()
    time.sleep(5)
    cluster.client.restore()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert [int(x) for x in ("0\n" + out).split()] == list(range(80)), "lost or duplicated"
    assert wait_for(lambda: not cluster.shares(), 15), "share not given back"


@pytest.fixture
def client_folder() -> Iterator[Path]:
    """A folder path for a project only the client host has (see client_only)."""
    folder = Path("/var/tmp") / f"bf-client-only-{os.getpid()}-{time.monotonic_ns()}"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
    shutil.rmtree(folder, ignore_errors=True)
    Path(f"{folder}.client.json").unlink(missing_ok=True)


PROJECT = {"helper.py": "def hi():\n    return 'hi from helper'\n", "data.csv": "a,b\n1,2\n"}


def test_a_command_on_a_gpu_server_works_in_a_folder_only_the_client_has(cluster, client_folder):
    """The project exists on the client host alone (the GPU servers' hosts see an empty
    folder): the command imports from it, reads it and writes its result back there."""
    code = (
        "import os, helper; print(os.getcwd(), helper.hi());"
        "print(open('data.csv').read().split());"
        "open('model.txt', 'w').write('trained on gpu1')"
    )
    client = cluster.run_python_in(client_folder, PROJECT, code, "-m", "1024")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert out.splitlines() == [f"{client_folder} hi from helper", "['a,b', '1,2']"], err
    assert client_left(client_folder)["model.txt"] == "trained on gpu1"
    assert os.listdir(client_folder) == [], "the folder was on the servers' disk after all"
    assert wait_for(lambda: not cluster.shares(), 15), "share not given back"


def test_a_notebook_on_a_gpu_server_works_in_its_folder_only_the_client_has(cluster, client_folder):
    """A bitfusion kernel started in the notebook's folder, on the client host alone: its
    cells import from it, read it, and write back, before and after a %bitfusion move."""
    fe = cluster.frontend(prefix=client_only(client_folder, PROJECT, []))
    fe.call("start", args=["-m", "1024"], cwd=str(client_folder))
    cell = fe.run_cell("import os, helper; print(os.getcwd(), helper.hi())")
    assert cell["stdout"] == f"{client_folder} hi from helper\n", cell
    fe.run_cell("open('model.txt', 'w').write('saved from the notebook')")
    assert "moves to" in fe.run_cell("%bitfusion -m 2048")["stdout"]
    cell = fe.run_cell(
        "import os; print(os.environ['BITFUSION_MEMORY_MIB'], open('model.txt').read())"
    )
    assert cell["stdout"] == "2048 saved from the notebook\n", cell
    fe.close()
    assert client_left(client_folder)["model.txt"] == "saved from the notebook"
    assert os.listdir(client_folder) == []
    assert wait_for(lambda: not cluster.shares(), 15), "share not given back"


def test_reading_the_clients_folder_rides_out_a_5_s_cut(cluster, client_folder):
    """File operations on the client's folder wait while the cable is out and go on after:
    every read arrives, whole, and the command exits 0 (issue #19)."""
    reads = (
        "import time\nfor i in range(80):\n"
        "    n = len(open('data.txt').read())\n    print(i, n)\n    time.sleep(0.1)\n"
    )
    client = cluster.run_python_in(client_folder, {"data.txt": "payload " * 1000}, reads, "-m",
                                   "1024")  # fmt: skip
    assert client.stdout.readline() == "0 8000\n", client.stderr.read()
    cluster.client.cut()
    time.sleep(5)
    cluster.client.restore()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert out.splitlines() == [f"{i} 8000" for i in range(1, 80)], "a read failed or lost"
    assert wait_for(lambda: not cluster.shares(), 15), "share not given back"


def test_lines_typed_during_a_5_s_cut_reach_the_command_once(cluster):
    client = cluster.run_python(ECHOES_ITS_STDIN, "-m", "1024", stdin=subprocess.PIPE)
    client.stdin.write("one\n")
    client.stdin.flush()
    assert client.stdout.readline() == "got one\n"
    cluster.client.cut()
    for word in ("two", "three"):
        client.stdin.write(f"{word}\n")
        client.stdin.flush()
        time.sleep(2)
    cluster.client.restore()
    client.stdin.write("four\n")
    client.stdin.close()
    out = client.stdout.read()
    assert client.wait(60) == 0, client.stderr.read()
    assert out == "got two\ngot three\ngot four\n", "stdin lost or repeated across the cut"
    assert wait_for(lambda: not cluster.shares(), 15), "share not given back"


def test_a_cut_longer_than_the_lease_ends_the_command_and_says_so(short_lease_cluster, figures):
    cluster = short_lease_cluster
    client = cluster.run_python(PRINTS_ITS_PID_AND_WAITS, "-m", "1024")
    remote_pid = host_pid(client.stdout.readline())
    assert len(cluster.shares()) == 1
    cluster.client.cut()
    cut_at = time.monotonic()
    try:
        cluster.expect_freed(figures, "s from cut to share freed", cut_at, remote_pid)
        client.wait(timeout=cluster.lease_grace_s * 3 + 15)  # it gives up while the cable is out
        figures["s from cut to client's message and exit"] = round(time.monotonic() - cut_at, 2)
    finally:
        cluster.client.restore()
    err = client.stderr.read()
    assert client.returncode == 1, err
    assert "Traceback" not in err
    assert "lost the gateway" in err and "retrying" in err
    assert (
        f"for longer than the lease grace ({cluster.lease_grace_s:g} s); the share and its "
        "processes have been ended there." in err
    )
    events = cluster.gateways["gpu1"].bf("list_shares", "--json", user="root", admin=True)
    assert "lease_expired" in events.stdout


def test_a_cut_past_the_grace_ends_writing_to_the_folder_and_writes_nowhere_else(
    short_lease_cluster, client_folder, figures
):
    """Past the lease grace the share ends with its processes: the command writing to the
    client's folder is stopped, what it wrote before the cut is on the client, whole, and
    nothing went on in an empty folder of the server's."""
    cluster = short_lease_cluster
    code = (
        f"{PRINTS_ITS_PID}\nimport time\n"
        "for i in range(100000):\n"
        "    with open('log.txt', 'a') as f: f.write(f'line {i}\\n')\n"
        "    time.sleep(0.05)\n"
    )
    client = cluster.run_python_in(client_folder, {}, code, "-m", "1024")
    remote_pid = host_pid(client.stdout.readline())
    time.sleep(0.5)
    cluster.client.cut()
    cut_at = time.monotonic()
    try:
        cluster.expect_freed(figures, "s from cut to share freed (writing files)", cut_at,
                             remote_pid)  # fmt: skip
        client.wait(timeout=cluster.lease_grace_s * 3 + 15)
    finally:
        cluster.client.restore()
    err = client.stderr.read()
    assert client.returncode == 1 and "Traceback" not in err, err
    assert "the share and its processes have been ended there." in err
    lines = client_left(client_folder)["log.txt"].splitlines()
    assert lines and lines == [f"line {i}" for i in range(len(lines))], "a write lost or torn"
    assert os.listdir(client_folder) == []
    assert wait_for(lambda: not _sshfs_of(client_folder), 10), "its sshfs kept running"


def _sshfs_of(folder: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"sshfs.* {folder}"], capture_output=True, text=True)
    return found.stdout.split()


def test_a_cut_longer_than_the_lease_ends_the_kernel_and_frees_its_share(
    short_lease_cluster, figures
):
    cluster = short_lease_cluster
    fe = cluster.frontend()
    fe.call("start", args=["-m", "1024"])
    remote_pid = host_pid(fe.run_cell(PRINTS_ITS_PID)["stdout"])
    cluster.client.cut()
    cut_at = time.monotonic()
    try:
        cluster.expect_freed(figures, "s from cut to share freed", cut_at, remote_pid)
        # The shim gives up too, so the frontend sees a dead kernel it can restart.
        assert fe.call("wait_dead", timeout=cluster.lease_grace_s * 3 + 15)["dead"]
        figures["s from cut to the frontend seeing a dead kernel"] = round(
            time.monotonic() - cut_at, 2
        )
    finally:
        cluster.client.restore()
    fe.call("restart")
    assert fe.run_cell("print('back')")["stdout"] == "back\n"
    assert len(cluster.shares()) == 1


def test_a_server_cut_off_hides_neither_the_other_nor_its_kernels(cluster):
    fe = cluster.frontend()
    fe.call("start", args=["-m", "1024", "-l", cluster.gateways["gpu1"].address])
    cluster.network.hosts["gpu2"].cut()
    try:
        listed = cluster.bf("list_gpus", timeout=60)
        assert "gpu1" in listed.stdout or cluster.gateways["gpu1"].address in listed.stdout
        assert cluster.gateways["gpu2"].address in listed.stderr, listed
        assert "Traceback" not in listed.stderr
        assert fe.run_cell("print(6 * 7)")["stdout"] == "42\n"
        ran = cluster.bf("run", "-m", "1024", "--", "true", timeout=60)
        assert ran.returncode == 0, ran.stderr
    finally:
        cluster.network.hosts["gpu2"].restore()
    assert wait_for(lambda: cluster.bf("list_gpus").returncode == 0, 20)
