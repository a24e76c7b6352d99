"""The view a share's sandbox gives, built by the gateway's Layout and run by real bubblewrap:
what is hidden stays hidden wherever it lies, and what is offered stays there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gateway import sandbox

pytestmark = pytest.mark.skipif(
    sandbox.check(True).refuse, reason="bubblewrap cannot make a sandbox on this machine"
)


PACKAGE = str(sandbox.PACKAGE_ROOT)  # every layout offers it: the prelude and share_site


def _in_sandbox(layout: sandbox.Layout, script: str) -> str:
    argv = layout.argv(["sh", "-c", script], user="tester")
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ["PATH"], "HOME": "/home/tester"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_state_dir_inside_an_offered_tree_is_still_hidden(tmp_path):
    offered = tmp_path / "checkout"  # as when the gateway runs from a checkout that holds it
    state = offered / "state"
    (state / "keys").mkdir(parents=True)
    (state / "admin.token").write_text("bf1.a.secret")
    (offered / "package.py").write_text("print('offered')")
    layout = sandbox.Layout(state, state / "homes", [str(offered), PACKAGE], [str(state)])
    out = _in_sandbox(
        layout, f"cat {offered}/package.py; ls -A {state}; cat {state}/admin.token || true"
    )
    assert out.splitlines() == ["print('offered')"]


def test_an_offered_tree_inside_the_state_dir_is_shown_and_nothing_beside_it(tmp_path):
    # The service user's home is the state dir, and its Python may live there.
    state = tmp_path / "state"
    venv = state / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("interpreter")
    (state / "admin.token").write_text("bf1.a.secret")
    layout = sandbox.Layout(state, state / "homes", [str(venv), PACKAGE], [str(state)])
    out = _in_sandbox(layout, f"cat {venv}/bin/python; echo; ls -A {state}")
    assert out.split() == ["interpreter", ".venv"]


def test_the_users_home_and_tmp_are_writable_and_the_rest_is_not(tmp_path):
    state = tmp_path / "state"
    layout = sandbox.Layout(state, state / "homes", [PACKAGE])
    out = _in_sandbox(
        layout,
        "echo kept > ~/file && echo gone > /tmp/file && echo $HOME; pwd; "
        "for p in /usr/x /etc/x /x /run/x; do touch $p 2>/dev/null && echo WROTE $p; done; "
        "ls -A /home",
    )
    assert out.split() == ["/home/tester", "/home/tester", "tester"]
    assert (state / "homes" / "tester" / "file").read_text() == "kept\n"
    assert oct((state / "homes" / "tester").stat().st_mode & 0o777) == "0o700"


@pytest.mark.skipif(not Path("/etc/shadow").exists(), reason="no /etc/shadow here")
def test_host_secrets_in_the_system_tree_are_masked(tmp_path):
    layout = sandbox.Layout(tmp_path / "state", tmp_path / "homes", [PACKAGE])
    out = _in_sandbox(layout, "cat /etc/shadow 2>/dev/null | wc -c; ls /etc/passwd")
    assert out.split() == ["0", "/etc/passwd"]


def test_a_clients_folder_goes_only_where_it_hides_nothing_of_the_share(tmp_path):
    """The path a client sends for its folder (issue #19) is checked on the gateway: it
    must be plain, outside the system and the gateway's trees, and cover none of the places
    the sandbox makes; under the user's server home, through no link of theirs."""
    import os

    layout = sandbox.Layout.for_gateway(tmp_path / "state", tmp_path / "homes")
    os.symlink("/run/bitfusion", layout.home_of("alice") / "linked")
    allowed = ["/home/alice/project", "/tmp/x", "/var/tmp/p/q", "/srv/data/project"]
    refused = {
        "/home/alice": "cover the share's /home/alice",
        "/home/alice/linked/x": "is a link there",
        "/tmp": "top of the file system",
        "/usr/share/x": "inside the server's /usr",
        "/run/user/1/x": "inside the server's /run",
        "/a/../b": "not a plain absolute path",
        "relative/x": "not a plain absolute path",
        str(tmp_path / "state" / "x"): "inside the server's",
    }
    for path in allowed:
        assert layout.files_refusal(path, "alice") is None, path
    for path, words in refused.items():
        assert words in (layout.files_refusal(path, "alice") or ""), path
