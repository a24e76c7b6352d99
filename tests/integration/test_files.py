"""Files follow you: `bitfusion run`, a bitfusion kernel and a `%bitfusion` move work in the
client's folder (the current one, the notebook's, or --files DIR), live, at the same path on
the GPU server, carried as its own stream on the one connection (issue #19)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.security.test_files_mount import pytestmark as needs_files  # noqa: F401

pytestmark = needs_files

PY = sys.executable


@pytest.fixture
def project(tmp_path):
    """A client's project, outside every tree the test gateway offers its shares."""
    top = Path("/var/tmp") / f"bf-run-files-{os.getpid()}-{tmp_path.name}"
    folder = top / "project"
    folder.mkdir(parents=True)
    (top / "secret.txt").write_text("beside the project")
    (folder / "helper.py").write_text("def hi():\n    return 'hi from helper'\n")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / "up").symlink_to("../secret.txt")
    yield folder
    shutil.rmtree(top, ignore_errors=True)


def test_a_command_works_in_the_clients_folder_and_writes_back(gateway, project):
    code = (
        "import os, helper; print(os.getcwd()); print(helper.hi());"
        "print(open('data.csv').read().split());"
        "open('model.txt', 'w').write('trained on the server')"
    )
    r = gateway.bf("run", "-m", "1024", "--files", str(project), "--", PY, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(project), "hi from helper", "['a,b', '1,2']"]
    assert f"the command runs on {gateway.address}, in your folder {project}." in r.stderr
    assert (project / "model.txt").read_text() == "trained on the server"
    assert gateway.no_shares_within(10)


def test_nothing_beside_the_folder_is_reachable_through_it(gateway, project):
    code = (
        "import os\n"
        "for p in ('up', '../secret.txt', os.path.abspath('../secret.txt')):\n"
        "    try: print(p, open(p).read())\n"
        "    except OSError as e: print(p, type(e).__name__)\n"
    )
    r = gateway.bf("run", "-m", "1024", "--files", str(project), "--", PY, "-c", code)
    assert r.returncode == 0, r.stderr
    assert "beside the project" not in r.stdout
    assert r.stdout.count("Error") == 3, r.stdout


def test_a_symlink_the_share_plants_leads_nowhere_on_the_client(gateway, project):
    """The share makes links in the folder to the client's files beside and above it; they
    are made (they are the user's own folder), and read through the share they find nothing."""
    secret = project.parent / "secret.txt"
    code = (
        "import os\n"
        f"os.symlink('../secret.txt', 'rel'); os.symlink({str(secret)!r}, 'abs')\n"
        "os.symlink('/etc/hostname', 'host')\n"
        "for p in ('rel', 'abs', 'host'):\n"
        "    try: print(p, open(p).read())\n"
        "    except OSError as e: print(p, 'refused')\n"
    )
    r = gateway.bf("run", "-m", "1024", "--files", str(project), "--", PY, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["rel", "refused", "abs", "refused", "host", "refused"]
    assert os.readlink(project / "rel") == "../secret.txt"  # made, in the user's own folder


def test_the_command_cannot_take_over_the_sshfs_that_holds_its_folder(gateway, project):
    """sshfs keeps its capabilities in the share's namespace; the command, with none, can
    neither trace it nor read its memory (and so cannot borrow them)."""
    code = (
        "import ctypes, os\n"
        "pid = next(p for p in os.listdir('/proc') if p.isdigit()"
        " and open(f'/proc/{p}/comm').read().strip() == 'sshfs')\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('attach', libc.ptrace(16, int(pid), 0, 0), ctypes.get_errno())\n"
        "try: open(f'/proc/{pid}/mem', 'rb').read(1); print('mem read')\n"
        "except OSError as e: print('mem', e.errno)\n"
    )
    r = gateway.bf("run", "-m", "1024", "--files", str(project), "--", PY, "-c", code)
    assert r.returncode == 0, r.stderr
    attach, mem = r.stdout.splitlines()
    assert attach.split()[1] == "-1" and int(attach.split()[2]) in (1, 13), r.stdout  # EPERM
    assert mem.startswith("mem ") and mem != "mem read", r.stdout


def test_a_big_file_and_stdin_travel_at_once_whole(gateway, project):
    """24 MiB read through the mount while stdin streams to the same command: the files
    stream has its own window, so neither holds the other up, and not a byte is lost."""
    blob = os.urandom(24 * 1024 * 1024)
    (project / "blob.bin").write_bytes(blob)
    lines = "".join(f"line {i}\n" for i in range(5000))
    code = (
        "import hashlib, sys\n"
        "h = hashlib.sha256(open('blob.bin', 'rb').read()).hexdigest()\n"
        "n = sum(1 for _ in sys.stdin)\n"
        "open('copy.bin', 'wb').write(open('blob.bin', 'rb').read()[:4 * 1024 * 1024])\n"
        "print(h, n)\n"
    )
    r = gateway.bf(
        "run", "-m", "1024", "--files", str(project), "--", PY, "-c", code, input=lines,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [hashlib.sha256(blob).hexdigest(), "5000"]
    assert (project / "copy.bin").read_bytes() == blob[: 4 * 1024 * 1024]


@pytest.mark.parametrize(
    "folder, words",
    [
        ("/usr/share", "cannot appear at the same path"),
        ("/nonexistent/folder", "no such folder on this machine"),
        ("/", "the whole disk is not carried"),
    ],
)
def test_a_folder_that_cannot_go_is_one_sentence_and_nothing_left(gateway, folder, words):
    r = gateway.bf("run", "-m", "1024", "--files", folder, "--", "true")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert words in r.stderr.strip().splitlines()[-1], r.stderr
    assert gateway.no_shares_within(10)


def test_two_users_each_see_only_their_own_folder(gateway, tmp_path):
    folders = {}
    for user in ("alice", "bob"):
        folders[user] = Path("/var/tmp") / f"bf-two-{os.getpid()}-{user}"
        folders[user].mkdir(parents=True, exist_ok=True)
        (folders[user] / "mine.txt").write_text(user)
    try:
        code = "import os, sys; print(open('mine.txt').read(), os.path.exists(sys.argv[1]))"
        for user, other in (("alice", "bob"), ("bob", "alice")):
            r = gateway.bf(
                "run", "-m", "1024", "--files", str(folders[user]), "--", PY, "-c", code,
                str(folders[other] / "mine.txt"), user=user,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [user, "False"]
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


def test_run_carries_the_folder_it_is_run_from(gateway, project):
    """No option: the current folder is the one that goes, and the user is told where."""
    code = "import os, helper; print(os.getcwd(), helper.hi())"
    r = gateway.bf("run", "-m", "1024", "--", PY, "-c", code, cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(project), "hi", "from", "helper"]
    assert f"in your folder {project}." in r.stderr


def test_with_no_files_the_command_runs_in_its_server_home(gateway, project):
    r = gateway.bf("run", "-m", "1024", "--no-files", "--", PY, "-c",
                   "import os; print(os.getcwd())", cwd=project)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/home/alice" and "your folder" not in r.stderr


def test_a_folder_the_server_cannot_show_is_said_and_the_command_still_runs(gateway):
    """Run from a folder that is the server's own (/usr/share): not named, so not an error;
    the one sentence says why it stayed behind, and the command works in the server home."""
    r = gateway.bf("run", "-m", "1024", "--", PY, "-c", "import os; print(os.getcwd())",
                   cwd=Path("/usr/share"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/home/alice"
    note = [line for line in r.stderr.splitlines() if "/usr/share" in line]
    assert len(note) == 1 and "cannot appear at the same path" in note[0], r.stderr
    assert "It runs without it." in note[0]
    assert gateway.no_shares_within(10)


def test_run_from_the_home_directory_carries_nothing_and_says_so(gateway):
    home = Path(gateway.env()["HOME"])
    r = gateway.bf("run", "-m", "1024", "--", PY, "-c", "import os; print(os.getcwd())",
                   cwd=home)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/home/alice"
    assert f"not carrying {home.resolve()} to the share: it holds your whole home" in r.stderr


def run_notebook(sources: list[str], folder: Path | str, tmp_path, monkeypatch):
    """``sources`` as a notebook in ``folder``, run by nbclient on a kernelspec as
    `kernelspec install` writes it (no folder option); returns its cells."""
    import nbformat
    from nbclient import NotebookClient

    from tests.support.kernels import install_shim_kernelspec

    install_shim_kernelspec(
        tmp_path / "share" / "jupyter", "-m", "1024", name="bf-files", carry=True
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    NotebookClient(
        nb, kernel_name="bf-files", timeout=60, resources={"metadata": {"path": str(folder)}}
    ).execute()
    return nb.cells


def test_a_notebook_on_a_bitfusion_kernel_works_in_its_folder(client_env, project, tmp_path,
                                                              monkeypatch):  # fmt: skip
    """The kernel works in its notebook's folder, and keeps it after a %bitfusion move."""
    cells = run_notebook(
        [
            "import os, helper\n"
            "print(os.getcwd(), helper.hi(), open('data.csv').read().split())\n"
            "open('model.txt', 'w').write('saved from the notebook')",
            "%bitfusion -m 2048",
            "import os\nprint(os.environ['BITFUSION_MEMORY_MIB'], os.getcwd(), "
            "open('model.txt').read())",
        ],
        project, tmp_path, monkeypatch,
    )  # fmt: skip

    def out(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")

    assert out(cells[0]).split() == [str(project), "hi", "from", "helper", "['a,b',", "'1,2']"]
    assert (project / "model.txt").read_text() == "saved from the notebook"
    assert not (project / "__pycache__").exists()  # the kernel kept helper's bytecode
    assert out(cells[2]).split() == ["2048", str(project), "saved", "from", "the", "notebook"]
    assert client_env.no_shares_within(15)


def test_a_notebook_whose_folder_cannot_go_is_told_in_its_first_cell(client_env, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """A notebook in a folder the server cannot show at its path: the kernel still starts,
    in the user's server home, and the first cell that runs says why, where they look."""
    [cell] = run_notebook(["import os; print(os.getcwd())"], "/usr/share", tmp_path, monkeypatch)
    streams = {o["name"]: o["text"] for o in cell.outputs if o["output_type"] == "stream"}
    assert streams["stdout"] == "/home/alice\n"
    assert "Your folder /usr/share cannot appear at the same path" in streams["stderr"]
    assert "It runs without it." in streams["stderr"]
    assert client_env.no_shares_within(15)


def test_the_magic_takes_a_local_kernel_onto_a_share_with_its_folder(client_env, project):
    from tests.support.kernels import ready, run_cell, start_local_kernel, stream_text, until

    with ready(start_local_kernel(cwd=project)) as (km, kc):
        run_cell(kc, "%load_ext bitfusion_jupyter")
        reply, outputs = run_cell(kc, "%bitfusion -m 1024")  # its folder, by default
        text = stream_text(outputs)
        assert reply["status"] == "ok" and "moves to" in text, text
        assert f"It works in your folder {project} there." in text
        until(kc, "import os; print(os.getcwd())", f"{project}\n")
        until(kc, "print(open('data.csv').read().split())", "['a,b', '1,2']\n")
        # From the share to another, keeping the folder; then without it.
        reply, outputs = run_cell(kc, "%bitfusion -m 2048")
        assert f"It works in your folder {project} there." in stream_text(outputs)
        until(kc, "import os; print(os.environ['BITFUSION_MEMORY_MIB'], os.getcwd())",
              f"2048 {project}\n")  # fmt: skip
        run_cell(kc, "%bitfusion -m 1024 --no-files")
        until(kc, "import os; print(os.getcwd())", "/home/alice\n")


def test_a_folder_whose_server_is_gone_fails_its_operations_and_writes_nowhere(gateway, project):
    """When the client's side of the folder ends (its sftp-server killed), file operations in
    the share fail with an error; nothing is written into the empty folder under the mount."""
    import signal
    import subprocess
    import time

    code = (
        "import os, time\n"
        "print('ready', flush=True)\n"
        "for _ in range(200):\n"
        "    try: open('data.csv').read()\n"
        "    except OSError as e: print('read', os.strerror(e.errno), flush=True); break\n"
        "    time.sleep(0.05)\n"
        "try: open('after.txt', 'w').write('x'); print('wrote')\n"
        "except OSError as e: print('write', os.strerror(e.errno))\n"
    )
    client = gateway.bf_background("run", "-m", "1024", "--files", str(project), "--", PY, "-c",
                                   code)  # fmt: skip
    assert client.stdout.readline() == "ready\n"
    found = subprocess.run(["pgrep", "-f", f"sftp-server -d {project}"], capture_output=True,
                           text=True).stdout.split()  # fmt: skip
    assert found, "the confined sftp-server is not running"
    for pid in found:  # bwrap and the sftp-server in it both match: one kill may end both
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    out, err = client.communicate(timeout=60)
    lines = out.splitlines()
    assert lines[0].startswith("read ") and lines[1].startswith("write "), (out, err)
    assert "wrote" not in out and not (project / "after.txt").exists()
    time.sleep(0.1)
    assert gateway.no_shares_within(15)


def test_the_folders_modules_keep_their_bytecode_on_the_server_not_in_the_folder(gateway, project):
    """Importing from the folder leaves no __pycache__ of the server's Python in it: the
    bytecode is kept in the user's server home (each read of it would be a round trip to the
    client), and a module the user changes on the client is compiled anew."""
    code = "import helper; print(helper.hi())"
    r = gateway.bf("run", "-m", "1024", "--files", str(project), "--", PY, "-c", code)
    assert r.returncode == 0 and r.stdout == "hi from helper\n", r.stderr
    assert not (project / "__pycache__").exists()
    cache = gateway.state_dir / "homes" / "alice" / ".cache" / "bitfusion" / "pycache"
    assert list(cache.rglob(f"{project.relative_to('/')}/helper.*.pyc")), "no bytecode kept"
    (project / "helper.py").write_text("def hi():\n    return 'changed on the client'\n")
    r = gateway.bf("run", "-m", "1024", "--files", str(project), "--", PY, "-c", code)
    assert r.returncode == 0 and r.stdout == "changed on the client\n", r.stderr
    assert not (project / "__pycache__").exists()
