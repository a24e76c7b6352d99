"""The client's folder in a share (issue #19), its two ends over local pipes: the client's
sftp-server, confined to the folder by bubblewrap (bitfusion_jupyter.file_server), and the
share's sandbox, which mounts it with sshfs at the same path before the command starts
(gateway.sandbox, files_prelude.sh). Real bwrap, sftp-server and sshfs mounts; a hostile
tenant's paths and a hostile server's requests both stay inside the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitfusion_jupyter import file_server
from gateway import sandbox

pytestmark = pytest.mark.skipif(
    sandbox.check(True).refuse
    or shutil.which("sshfs") is None
    or not os.path.exists("/dev/fuse")
    or not any(os.access(p, os.X_OK) for p in file_server.SFTP_SERVER_PATHS),
    reason="needs bubblewrap, sshfs, OpenSSH's sftp-server and /dev/fuse",
)

# What the share's command tries: the project's own files, then everything beside them.
PROBE = r"""
import json, os, sys
import helper
out = {"cwd": os.getcwd(), "helper": helper.hi(), "data": open("data.csv").read()}
open("model.txt", "w").write("trained on the GPU server")
reached = {}
for path in sys.argv[1:]:
    try:
        reached[path] = open(path).read()
    except OSError as e:
        reached[path] = e.strerror
out["reached"] = reached
out["listed_up"] = sorted(os.listdir(".."))
out["caps"] = open("/proc/self/status").read().split("CapEff:")[1].split()[0]
out["umount"] = os.system("umount " + os.getcwd() + " 2>/dev/null")
print(json.dumps(out))
"""


@pytest.fixture
def client_folder(tmp_path_factory):
    """A project folder with a secret beside it and links planted to reach it."""
    top = Path("/var/tmp") / f"bf-files-{os.getpid()}"  # not in a tree the gateway offers
    project = top / "alice" / "project"
    project.mkdir(parents=True)
    (top / "alice" / "secret.txt").write_text("the client's secret")
    (project / "data.csv").write_text("a,b\n1,2\n")
    (project / "helper.py").write_text("def hi():\n    return 'hi from helper'\n")
    (project / "up").symlink_to("../secret.txt")
    (project / "passwd").symlink_to("/etc/passwd")
    yield project
    shutil.rmtree(top, ignore_errors=True)


def _run_in_share(tmp_path: Path, folder: Path, *paths: str) -> subprocess.CompletedProcess:
    server = file_server.start(folder)
    try:
        layout = sandbox.Layout.for_gateway(tmp_path / "state", tmp_path / "homes")
        fds = (server.stdout.fileno(), server.stdin.fileno())  # type: ignore[union-attr]
        argv = layout.argv(
            [sys.executable, "-c", PROBE, *paths],
            user="alice",
            files=sandbox.FilesMount(str(folder), 3, 4),
        )

        def at_3_and_4() -> None:  # where the supervisor puts them too
            os.dup2(fds[0], 3)
            os.dup2(fds[1], 4)

        return subprocess.run(
            argv, pass_fds=(3, 4), preexec_fn=at_3_and_4, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.stdout.close()  # type: ignore[union-attr]
        server.wait(10)


def test_the_folder_is_the_working_directory_at_its_own_path(tmp_path, client_folder):
    r = _run_in_share(tmp_path, client_folder)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cwd"] == str(client_folder)
    assert out["helper"] == "hi from helper" and out["data"] == "a,b\n1,2\n"
    # What the command wrote is on the client when it returns.
    assert (client_folder / "model.txt").read_text() == "trained on the GPU server"


def test_nothing_beside_the_folder_is_reachable(tmp_path, client_folder):
    secret = str(client_folder.parent / "secret.txt")
    r = _run_in_share(tmp_path, client_folder, "up", "passwd", "../secret.txt", secret)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # Links planted on the client, and paths out of the folder, reach nothing of the client.
    for path in ("up", "passwd"):
        assert out["reached"][path] in ("Permission denied", "Operation not permitted"), out
    for path in ("../secret.txt", secret):
        assert out["reached"][path] == "No such file or directory", out
    assert out["listed_up"] == ["project"]  # on the server, the folder's parent is empty
    # The command holds no capability: it cannot unmount the folder or remount it.
    assert out["caps"] == "0000000000000000" and out["umount"] != 0


def test_a_hostile_server_reaches_nothing_beyond_the_folder(client_folder, tmp_path):
    """The client's sftp-server, driven by a modified gateway that asks for paths outside
    the folder on purpose (OpenSSH's sftp client, -D: straight to the local server)."""
    if shutil.which("sftp") is None:
        pytest.skip("needs OpenSSH's sftp client")
    command, passwd = file_server.argv(client_folder, 3)
    wrapper = client_folder.parent / "serve.sh"
    wrapper.write_text(
        "#!/bin/sh\nexec 3<<EOF\n" + passwd.decode() + "EOF\nexec " + " ".join(command) + "\n"
    )
    wrapper.chmod(0o755)
    batch = "\n".join(
        [
            # "-": go on after a refusal, as a hostile server would
            f"-get {client_folder.parent}/secret.txt {tmp_path}/1",
            f"-get ../secret.txt {tmp_path}/2",
            f"-get /etc/hostname {tmp_path}/3",
            f"-get up {tmp_path}/4",
            "-ls -la ..",
            f"get data.csv {tmp_path}/data.csv",
        ]
    )
    r = subprocess.run(
        ["sftp", "-b", "-", "-D", str(wrapper)],
        input=batch, capture_output=True, text=True, timeout=30, cwd=client_folder,
    )  # fmt: skip
    assert 'File "/etc/hostname" not found' in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]  # and nothing else
    assert (tmp_path / "data.csv").read_text() == "a,b\n1,2\n"


def test_a_folder_that_holds_the_home_is_not_carried_unless_named(tmp_path):
    home = tmp_path / "home" / "alice"
    (home / "project").mkdir(parents=True)
    for cwd in ("/", home, tmp_path / "home"):
        choice = file_server.choose(cwd, None, False, home=home)
        assert choice.folder is None and "whole home directory" in choice.note
    assert file_server.choose(home / "project", None, False, home=home).folder == home / "project"
    assert file_server.choose("/", str(home), False, home=home).folder == home  # on purpose
    # "." is the current folder (a kernelspec's notebook folder), under the same rule.
    assert file_server.choose(home, ".", False, home=home).folder is None
    assert file_server.choose(home / "project", ".", False, home=home).folder == home / "project"
    assert file_server.choose(home / "project", None, True, home=home).folder is None
    with pytest.raises(file_server.FilesError, match="no such folder"):
        file_server.choose("/", str(tmp_path / "nope"), False, home=home)
    with pytest.raises(file_server.FilesError, match="whole disk"):
        file_server.choose(home, "/", False, home=home)
