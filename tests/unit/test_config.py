"""Where the client finds servers: servers.conf, BITFUSION_SERVERS, -l."""

import pytest

from bitfusion_jupyter import config


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("BITFUSION_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("BITFUSION_SERVERS", raising=False)
    monkeypatch.delenv("BITFUSION_TOKEN", raising=False)
    monkeypatch.setattr(config, "SYSTEM_SERVERS_CONF", tmp_path / "system.conf")
    return tmp_path


def test_servers_conf_comments_ports_and_order(cfg):
    (cfg / "system.conf").write_text("# the pool\ngpu1\n")
    (cfg / "servers.conf").write_text("gpu2:6000  # the big one\n\ngpu1\n")
    found = config.servers()
    assert found.servers == ["gpu1:56001", "gpu2:6000"]


def test_env_and_flag_override(cfg, monkeypatch):
    (cfg / "servers.conf").write_text("gpu1\n")
    monkeypatch.setenv("BITFUSION_SERVERS", "a,b:7")
    assert config.servers().servers == ["a:56001", "b:7"]
    assert config.servers("c").servers == ["c:56001"]


def test_a_malformed_line_names_file_and_line(cfg):
    (cfg / "servers.conf").write_text("gpu1\ngpu2:notaport\n")
    with pytest.raises(config.ConfigError, match=r"servers.conf, line 2"):
        config.servers()


def test_no_servers_says_how_to_add_one(cfg):
    with pytest.raises(config.ConfigError, match="No servers are configured"):
        config.servers()


def test_no_token_says_how_to_get_one(cfg):
    with pytest.raises(config.ConfigError, match="bitfusion init"):
        config.token_for("gpu1:56001")


def test_init_says_added_only_for_a_server_new_to_servers_conf(cfg):
    import subprocess
    import sys

    import zmq

    from remoting import tokens

    public, _secret = zmq.curve_keypair()
    token = str(tokens.mint(b"k" * 32, public, "alice"))

    def init() -> str:
        env = {"BITFUSION_CONFIG_DIR": str(cfg), "PATH": "/usr/bin:/bin"}
        argv = [sys.executable, "-m", "bitfusion_jupyter", "init", "--token", token]
        done = subprocess.run(
            [*argv, "--server", "gpu1"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"Added gpu1:56001 to {cfg / 'servers.conf'}." in init()
    assert f"Kept gpu1:56001 in {cfg / 'servers.conf'}." in init()
    assert (cfg / "servers.conf").read_text() == "gpu1:56001\n"
