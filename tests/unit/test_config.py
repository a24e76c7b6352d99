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
