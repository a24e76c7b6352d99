"""The state directory's contract (remoting.state_dir): the tools that read it and the gateway
that writes it name the same files."""

from __future__ import annotations

import os

from gateway import state_lock
from remoting import state_dir


def test_the_state_dir_is_the_variables_then_roots_then_the_users(monkeypatch, tmp_path):
    monkeypatch.setenv("BITFUSION_STATE_DIR", str(tmp_path / "elsewhere"))
    assert state_dir.default_state_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("BITFUSION_STATE_DIR")
    expected = (
        "/var/lib/bitfusion" if os.geteuid() == 0 else os.path.expanduser("~/.bitfusion/gateway")
    )
    assert str(state_dir.default_state_dir()) == expected


def test_the_lock_the_gateway_holds_names_it_once_it_listens(tmp_path):
    handle = state_lock.hold(tmp_path)
    try:
        assert (tmp_path / state_dir.LOCK).exists()
        assert state_dir.listening_pid(tmp_path) is None  # held, not yet listening
        state_lock.mark_listening(handle)
        assert state_dir.listening_pid(tmp_path) == os.getpid()
    finally:
        handle.close()
