"""The gateway's settings: traits with one default each, config files, and the flags on top."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from traitlets import Undefined

from gateway import settings as gateway_settings
from gateway.app import FLAGS, GatewayApp, UsageError, add_arguments, main
from gateway.police import Police
from gateway.service.config import GatewayConfig
from remoting import protocol

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


@pytest.fixture(autouse=True)
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch /etc/bitfusion, so no test reads the machine's."""
    path = tmp_path / "etc-bitfusion"
    path.mkdir()
    monkeypatch.setattr(gateway_settings, "SYSTEM_CONFIG_DIR", path)
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def settings(*argv: str) -> GatewayApp:
    return GatewayApp.from_args(parse(*argv))


def write(directory: Path, text: str, suffix: str = "py") -> Path:
    path = directory / f"bitfusion_gateway_config.{suffix}"
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_a_config_file_sets_a_value(state: Path) -> None:
    path = write(state, 'c.GatewayApp.port = 56123\nc.Police.mode = "warn"\n')
    app = settings("--state-dir", str(state))
    assert app.port == 56123 and app.police.mode == "warn"
    assert app.loaded_config_files == [str(path)]
    cfg = app.gateway_config({}, [])
    assert (cfg.port, cfg.police_mode, cfg.state_dir) == (56123, "warn", state)


def test_a_flag_overrides_the_file_and_leaves_its_other_settings(state: Path) -> None:
    write(state, "c.GatewayApp.port = 56123\nc.GatewayApp.lease_grace_s = 60\n")
    app = settings("--state-dir", str(state), "--port", "56124", "--police", "warn")
    assert (app.port, app.lease_grace_s, app.police.mode) == (56124, 60.0, "warn")


def test_unconfined_and_verbose_flags_reach_their_traits(state: Path) -> None:
    write(state, "c.GatewayApp.confine = True\n")
    app = settings("--state-dir", str(state), "--unconfined", "-v")
    assert app.confine is False and app.verbose is True


def test_etc_then_state_dir_then_json(etc: Path, state: Path) -> None:
    write(etc, f'c.GatewayApp.state_dir = "{state}"\nc.GatewayApp.port = 1000\n')
    write(etc, '{"GatewayApp": {"bind": "127.0.0.1"}}', "json")
    write(state, "c.GatewayApp.port = 2000\nc.GatewayApp.web_port = 3000\n")
    write(state, '{"GatewayApp": {"web_port": 0}, "Police": {"interval_s": 2.5}}', "json")
    app = settings()  # no --state-dir: /etc's file names it
    assert app.state_dir == state
    assert (app.bind, app.port, app.web_port, app.police.interval_s) == (
        "127.0.0.1",
        2000,
        0,
        2.5,
    )
    assert len(app.loaded_config_files) == 4


def test_no_flag_given_hides_nothing_of_a_file(state: Path) -> None:
    """The options default to SUPPRESS: an option not given must not reset a file's value."""
    args = parse("--state-dir", str(state))
    assert vars(args) == {"state_dir": state, "gateway_command": None}


@pytest.mark.parametrize(
    "text, said",
    [
        ("c.GatewayApp.port = 0\n", "c.GatewayApp.port = 0 is not a TCP port; give 1 to 65535."),
        ("c.GatewayApp.port = 'x'\n", "c.GatewayApp.port = 'x' is not valid; give an int."),
        ("c.GatewayApp.web_port = -1\n", "c.GatewayApp.web_port = -1 is not a TCP port"),
        ("c.GatewayApp.lease_grace_s = 0\n", "c.GatewayApp.lease_grace_s must be more than 0"),
        ("c.Police.mode = 'kill'\n", "c.Police.mode = 'kill' is not valid; give any of"),
        ("c.GatewayApp.kernel_channels = 'tls'\n", "c.GatewayApp.kernel_channels = 'tls'"),
        ("c.GatewayApp.prot = 1\n", "c.GatewayApp.prot is not a setting of the gateway; did you"),
        ("c.Gateway.port = 1\n", "c.Gateway is not part of the gateway's settings"),
        ("c.GatewayApp.state_dir = '/tmp'\n", "c.GatewayApp.state_dir cannot be set"),
    ],
)
def test_a_bad_config_value_is_one_sentence_naming_file_and_setting(
    state: Path, capsys: pytest.CaptureFixture[str], text: str, said: str
) -> None:
    path = write(state, text)
    assert main(["--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"bitfusion gateway: In {path}, {said}"), err


def test_a_broken_or_open_config_file_is_refused(state: Path) -> None:
    path = write(state, "c.GatewayApp.port = \n")
    with pytest.raises(UsageError, match=rf"The config file {path} cannot be read \(SyntaxError"):
        settings("--state-dir", str(state))
    write(state, "c.GatewayApp.port = 1\n").chmod(0o666)
    with pytest.raises(UsageError, match="writable by its owner only"):
        settings("--state-dir", str(state))


def test_a_value_a_loader_refuses_names_the_file_that_set_it(state: Path) -> None:
    path = write(state, f"c.GatewayApp.peers_file = '{state / 'nope.conf'}'\n")
    with pytest.raises(UsageError) as caught:
        gateway_settings.read_peers(state / "nope.conf", state, settings("--state-dir", str(state)))
    assert str(caught.value).endswith(f"(set by c.GatewayApp.peers_file in {path}).")


def test_the_gateway_says_a_bad_file_in_one_line_and_exits_2(state: Path) -> None:
    path = write(state, "c.GatewayApp.lease_grace_s = -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == (
        f"bitfusion gateway: In {path}, c.GatewayApp.lease_grace_s must be more than 0 seconds.\n"
    )


def test_flag_sentences_stay_as_they_were(state: Path) -> None:
    for argv, said in [
        (["--port", "0"], "--port 0 is not a TCP port; give 1 to 65535."),
        (["--web-port", "70000"], "--web-port 70000 is not a TCP port; give 1 to 65535, or 0."),
        (["--lease-grace", "0"], "--lease-grace must be more than 0 seconds."),
    ]:
        with pytest.raises(UsageError) as caught:
            settings("--state-dir", str(state), *argv)
        assert str(caught.value) == said


def test_the_token_commands_find_the_state_dir_in_etc(
    etc: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What lets a systemd unit drop --state-dir: `token create` then finds the same dir."""
    write(etc, f'c.GatewayApp.state_dir = "{state}"\n')
    assert main(["token", "create", "--user", "carol"]) == 0
    assert capsys.readouterr().out.startswith("bf1.u.carol.")
    assert (state / "keys").is_dir()


def test_one_default_per_setting() -> None:
    """GatewayConfig spells no default: the app makes it, with its traits' defaults."""
    with pytest.raises(TypeError):
        GatewayConfig(state_dir=Path("/nowhere"))  # type: ignore[call-arg]
    app = GatewayApp()
    cfg = app.gateway_config(state_dir=Path("/nowhere"))
    assert cfg.state_dir == Path("/nowhere") and cfg.peers == [] and "python3" in cfg.kernels
    assert cfg.web_port == protocol.DASHBOARD_PORT == app.web_port  # was 0 in the dataclass
    for name, value in app.service_settings().items():
        assert getattr(cfg, name) == value, name
    with pytest.raises(FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    assert Police().mode == app.police.mode == cfg.police_mode


def _doc_rows(heading: str) -> list[list[str]]:
    text = REFERENCE.read_text()
    part = text[text.index(heading) :]
    rows = []
    for line in part.splitlines()[1:]:
        if re.match(r"#{2,3} ", line):
            break
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_docs_list_every_setting_with_its_default() -> None:
    rows = _doc_rows("### Config file")
    documented = {row[0].strip("`") for row in rows}
    traits = {f"c.GatewayApp.{n}" for n in GatewayApp.class_own_traits(config=True)}
    traits |= {f"c.Police.{n}" for n in Police.class_own_traits(config=True)}
    assert documented == traits
    checked = 0
    for key, _option, said in rows:
        section, name = key.strip("`").split(".")[1:]
        owner = Police if section == "Police" else GatewayApp
        value = owner.class_traits()[name].default_value
        if value in (None, "", Undefined):
            continue  # none, or computed at start (the hostname, the state dir)
        assert re.match(rf"`?{re.escape(_shown(value))}`?(:|$)", said), (key, said, value)
        checked += 1
    assert checked >= 10


def test_the_options_table_shows_the_traits_defaults() -> None:
    by_option = {f.option: f for f in FLAGS}
    checked = 0
    for row in _doc_rows("## Gateway commands"):
        option = row[0].strip("`").split(" ")[0].split(",")[0]
        m = re.search(r"\(default `?([\w.]+)`?[;)]", row[1])
        if option not in by_option or m is None:
            continue
        f = by_option[option]
        owner = Police if f.section == "Police" else GatewayApp
        assert m.group(1) == _shown(owner.class_traits()[f.trait].default_value), option
        checked += 1
    assert checked >= 5


def test_help_lists_every_option_with_the_traits_defaults() -> None:
    parser = argparse.ArgumentParser(prog="bitfusion gateway")
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for f in FLAGS:
        assert f.option in text, f.option
    assert "--port PORT client port (default 56001)" in text
    assert "(default 54000; 0: none)" in text
    assert "bitfusion_gateway_config.py" in text  # the epilog says where the files are
