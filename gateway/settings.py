"""The gateway's settings: one trait per setting on `GatewayApp` (and on
`gateway.police.Police`), each default written once, here; the config files they are read
from (``/etc/bitfusion`` then the state directory); the state directory and the peers file
they name, made ready or read for the gateway and its token commands; and how a bad value is
told, in one sentence naming the file and setting. `gateway.app` puts argparse in front of
them.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import stat
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Enum, Float, Int, TraitError, TraitType, Unicode, default, validate
from traitlets.config import Application, Config, Configurable
from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

from gateway.kernels import CHANNEL_MODES
from gateway.police import Police
from remoting import protocol
from remoting.state_dir import CONFIG as CONFIG_NAME
from remoting.state_dir import default_state_dir
from remoting.util.cli import UsageError

if TYPE_CHECKING:
    from gateway.service import GatewayConfig


SYSTEM_CONFIG_DIR = Path("/etc/bitfusion")


class PathTrait(TraitType[Path, Any]):
    """A file system path: a config file gives a str, argparse a Path; either is a Path here."""

    info_text = "a path"

    def validate(self, obj: Any, value: Any) -> Path:
        if isinstance(value, str | os.PathLike) and os.fspath(value):
            return Path(value)
        self.error(obj, value)


class Refused(TraitError):
    """A value one of the settings' validators refuses. The text is one sentence with
    ``{setting}`` (``--port 0``, or ``c.GatewayApp.port = 0``) and ``{name}`` (``--port``, or
    ``c.GatewayApp.port``) to fill in, so a flag and a config file each say it their way."""


@dataclass(frozen=True)
class Flag:
    """A command-line option that sets a trait."""

    dest: str  # argparse's
    section: str  # the Configurable the trait is on: GatewayApp or Police
    trait: str
    option: str  # as the admin types it, in error sentences


FLAGS = (
    Flag("simulate_gpus", "GatewayApp", "simulate_gpus", "--simulate-gpus"),
    Flag("bind", "GatewayApp", "bind", "--bind"),
    Flag("port", "GatewayApp", "port", "--port"),
    Flag("state_dir", "GatewayApp", "state_dir", "--state-dir"),
    Flag("name", "GatewayApp", "hostname", "--name"),
    Flag("lease_grace", "GatewayApp", "lease_grace_s", "--lease-grace"),
    Flag("police", "Police", "mode", "--police"),
    Flag("police_grace", "Police", "grace_s", "--police-grace"),
    Flag("homes", "GatewayApp", "homes_dir", "--homes"),
    Flag("confine", "GatewayApp", "confine", "--unconfined"),
    Flag("kernel_channels", "GatewayApp", "kernel_channels", "--kernel-channels"),
    Flag("kernels", "GatewayApp", "kernels_file", "--kernels"),
    Flag("web_port", "GatewayApp", "web_port", "--web-port"),
    Flag("peers", "GatewayApp", "peers_file", "--peers"),
    Flag("verbose", "GatewayApp", "verbose", "--verbose"),
)


class GatewayApp(Application):
    """The gateway's settings (see the module docstring for where they come from)."""

    name = "bitfusion-gateway"
    description = "Shares this server's GPUs with Jupyter kernels and commands on other machines."
    classes = [Police]

    simulate_gpus = Unicode(
        None,
        allow_none=True,
        help="serve a simulated pool instead of NVML, e.g. 2x16GiB or 1x80GiB,1x24GiB",
    ).tag(config=True)
    bind = Unicode("0.0.0.0", help="address to listen on, for both ports").tag(config=True)
    port = Int(protocol.DEFAULT_PORT, help="client port").tag(config=True)
    state_dir = PathTrait(
        help="ledger, keys and tokens (default /var/lib/bitfusion as root, else "
        "~/.bitfusion/gateway; BITFUSION_STATE_DIR overrides)"
    ).tag(config=True)
    hostname = Unicode(help="server name shown to clients (default: hostname)").tag(config=True)
    lease_grace_s = Float(30.0, help="free a share this long after its holder stops renewing").tag(
        config=True
    )
    terminate_grace_s = Float(
        5.0, help="how long a share's processes have to end after SIGTERM, before SIGKILL"
    ).tag(config=True)
    homes_dir = PathTrait(
        None,
        allow_none=True,
        help="where users' homes on this server live, one folder per user, each the $HOME "
        "of that user's shares (default: STATE_DIR/homes)",
    ).tag(config=True)
    confine = Bool(
        True,
        help="run each share in its bubblewrap sandbox; False is --unconfined: code in a "
        "share can then read the state directory and every other user's files",
    ).tag(config=True)
    kernel_channels = Enum(
        CHANNEL_MODES,
        default_value="auto",
        help="how kernels' channels are kept from other shares: auto (unix sockets that "
        "Landlock scopes to the share, else CurveZMQ), curve (always TCP with CurveZMQ), or "
        "plain (TCP, unencrypted: any share can listen)",
    ).tag(config=True)
    kernels_file = PathTrait(
        None,
        allow_none=True,
        help="JSON {name: argv} of kernel environments offered besides python3 "
        "(this Python with ipykernel); argv must contain {connection_file}",
    ).tag(config=True)
    web_port = Int(
        protocol.DASHBOARD_PORT, help="port of the cluster dashboard and /metrics (0: none)"
    ).tag(config=True)
    peers_file = PathTrait(
        None,
        allow_none=True,
        help="the cluster's other gateways for the dashboard, servers.conf format "
        "(default STATE_DIR/servers.conf when it exists)",
    ).tag(config=True)
    verbose = Bool(False, help="more logging").tag(config=True)

    @default("state_dir")
    def _state_dir_default(self) -> Path:
        return default_state_dir()

    @default("hostname")
    def _hostname_default(self) -> str:
        return socket.gethostname()

    @validate("port")
    def _valid_port(self, proposal: Any) -> int:
        if not 1 <= proposal.value <= 65535:
            raise Refused("{setting} is not a TCP port; give 1 to 65535.")
        return int(proposal.value)

    @validate("web_port")
    def _valid_web_port(self, proposal: Any) -> int:
        if not 0 <= proposal.value <= 65535:
            raise Refused("{setting} is not a TCP port; give 1 to 65535, or 0.")
        return int(proposal.value)

    @validate("lease_grace_s")
    def _valid_lease_grace(self, proposal: Any) -> float:
        if not proposal.value > 0:
            raise Refused("{name} must be more than 0 seconds.")
        return float(proposal.value)

    @validate("hostname")
    def _valid_hostname(self, proposal: Any) -> str:
        if not proposal.value:  # `--name ""` never gets here: it means the hostname
            raise Refused("{name} is empty; give the server's name, or leave it out.")
        return str(proposal.value)

    @default("log")
    def _log_default(self) -> logging.Logger:
        return logging.getLogger(__name__)

    def _configure_logging(self) -> None:
        """Left alone: _serve sets up the gateway's logging (traitlets would dictConfig it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.police = Police(parent=self)
        # (section, trait) -> the config file that set it last; flags are not recorded here.
        self._set_in: dict[tuple[str, str], Path] = {}

    # -- where the settings come from -------------------------------------------------------

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, state_dir_only: bool = False) -> GatewayApp:
        """The settings: the config files, then the flags given in ``args`` (the options
        default to SUPPRESS, so one not given is absent and hides nothing). With
        ``state_dir_only``, just what finds the state dir (for the token commands)."""
        app = cls()
        given = [f for f in FLAGS if hasattr(args, f.dest)]
        # `--name ""` meant "the hostname" before traits, and still does.
        given = [f for f in given if not (f.dest == "name" and not getattr(args, f.dest))]
        app.load_config_dir(SYSTEM_CONFIG_DIR)
        # The state dir's own config file is found through --state-dir, so that flag first.
        app.apply_flags(args, [f for f in given if f.trait == "state_dir"])
        if state_dir_only:
            return app
        app.load_config_dir(app.state_dir, in_state_dir=True)
        app.apply_flags(args, given)
        return app

    def config_files(self, directory: Path) -> list[Path]:
        """The config files in one directory, in the order they are read (json wins)."""
        return [p for p in (directory / f"{CONFIG_NAME}.{x}" for x in ("py", "json")) if p.exists()]

    def load_config_dir(self, directory: Path, *, in_state_dir: bool = False) -> None:
        for path in self.config_files(directory):
            config = read_config_file(path)
            for section, values in config.items():
                if not isinstance(values, Config):
                    raise UsageError(
                        f"In {path}, c.{section} is not a setting; give c.GatewayApp.NAME or "
                        "c.Police.NAME."
                    )
                for key, value in values.items():
                    if in_state_dir and (section, key) == ("GatewayApp", "state_dir"):
                        raise UsageError(
                            f"In {path}, c.GatewayApp.state_dir cannot be set: that file is "
                            "read from the state dir; set it in "
                            f"{SYSTEM_CONFIG_DIR / CONFIG_NAME}.py or with --state-dir."
                        )
                    self._set(section, key, value, path)
            if str(path) not in self._loaded_config_files:
                self._loaded_config_files.append(str(path))

    def apply_flags(self, args: argparse.Namespace, flags: list[Flag]) -> None:
        for f in flags:
            self._set(f.section, f.trait, getattr(args, f.dest), None, option=f.option)

    def _owner(self, section: str, key: str, where: str) -> Configurable:
        owners: dict[str, Configurable] = {"GatewayApp": self, "Police": self.police}
        owner = owners.get(section)
        if owner is None:
            raise UsageError(
                f"{where}c.{section} is not part of the gateway's settings; give "
                "c.GatewayApp.NAME or c.Police.NAME."
            )
        names = list(type(owner).class_own_traits(config=True))
        if key not in names:
            close = get_close_matches(key, names, n=1)
            hint = f"; did you mean c.{section}.{close[0]}?" if close else "."
            raise UsageError(f"{where}c.{section}.{key} is not a setting of the gateway{hint}")
        return owner

    def _set(
        self, section: str, key: str, value: Any, path: Path | None, option: str | None = None
    ) -> None:
        """Set one trait, saying a refused value in one sentence naming its flag, or its file
        and key."""
        where = f"In {path}, " if path is not None else ""
        owner = self._owner(section, key, where)
        try:
            owner.update_config(Config({section: {key: value}}))
        except TraitError as exc:
            # A flag as typed (`--port 0`; argparse checked its type, so only a Refused gets
            # here), or the file's own line (`c.GatewayApp.port = 0`).
            name = option or f"c.{section}.{key}"
            setting = f"{option} {value}" if option else f"{name} = {value!r}"
            if isinstance(exc, Refused):
                text = where + str(exc).format(setting=setting, name=name)
            else:
                info = type(owner).class_traits()[key].info()
                text = f"{where}{setting} is not valid; give {info}."
            raise UsageError(text) from None
        if path is not None:
            self._set_in[(section, key)] = path
        else:
            self._set_in.pop((section, key), None)

    def blame(self, trait: str, sentence: str) -> str:
        """A sentence about a setting's value (the loaders name it by its flag), plus the
        config file that set it, where one did."""
        path = self._set_in.get(("GatewayApp", trait))
        if path is None:
            return sentence
        return f"{sentence.rstrip('.')} (set by c.GatewayApp.{trait} in {path})."

    @property
    def loaded_files_line(self) -> str:
        return ", ".join(self.loaded_config_files) or (
            f"none ({SYSTEM_CONFIG_DIR}/{CONFIG_NAME}.py and STATE_DIR's are read if there)"
        )

    # -- what the service reads -------------------------------------------------------------

    def service_settings(self) -> dict[str, Any]:
        """The fields of GatewayConfig that are settings, under its names."""
        return {
            "bind": self.bind,
            "port": self.port,
            "hostname": self.hostname,
            "lease_grace_s": self.lease_grace_s,
            "police_mode": self.police.mode,
            "police_grace_s": self.police.grace_s,
            "police_interval_s": self.police.interval_s,
            "terminate_grace_s": self.terminate_grace_s,
            "homes_dir": self.homes_dir.resolve() if self.homes_dir else None,
            "confine": self.confine,
            "kernel_channels": self.kernel_channels,
            "web_port": self.web_port,
        }

    def gateway_config(
        self,
        kernels: dict[str, Any] | None = None,
        peers: list[str] | None = None,
        **overrides: Any,
    ) -> GatewayConfig:
        """The service's view of these settings. ``overrides`` (tests, the fuzzer) replace
        fields; without kernels or peers, python3 and no peers."""
        from gateway.service import GatewayConfig

        fields: dict[str, Any] = {**self.service_settings(), **overrides}
        fields.setdefault("state_dir", self.state_dir)
        extra: dict[str, Any] = {"kernels": kernels} if kernels is not None else {}
        return GatewayConfig(**fields, **extra, peers=peers or [])


def read_config_file(path: Path) -> Config:
    """One config file's Config, or one sentence on why it cannot be used."""
    try:
        info = path.stat()
    except OSError as exc:
        raise UsageError(f"The config file {path} cannot be read ({exc.strerror}).") from None
    # It runs as the gateway (a .py file is code): whoever may change it would be the gateway.
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(
            f"The config file {path} may be changed by other users, and it runs as the "
            f"gateway; make it writable by its owner only (chmod go-w {path})."
        )
    loader_class = PyFileConfigLoader if path.suffix == ".py" else JSONFileConfigLoader
    try:
        return loader_class(path.name, path=str(path.parent)).load_config()
    except Exception as exc:  # the file's own code may raise anything
        raise UsageError(
            f"The config file {path} cannot be read ({type(exc).__name__}: {exc})."
        ) from None


def trait_default(section: str, name: str) -> str:
    """A trait's default as --help shows it."""
    owner = Police if section == "Police" else GatewayApp
    value = owner.class_traits()[name].default_value
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_help(section: str, name: str, *, show_default: bool = True) -> str:
    """A flag's --help: its trait's help and default, so neither is written twice."""
    owner = Police if section == "Police" else GatewayApp
    text = str(owner.class_traits()[name].help)
    return f"{text} (default {trait_default(section, name)})" if show_default else text


def prepare_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # 0700 whoever made it: it holds the keys, tokens, the ledger (who runs what) and
        # users' homes. Tighter only: a folder of someone else's is left as it is.
        if state_dir.stat().st_uid == os.geteuid() and state_dir.stat().st_mode & 0o077:
            state_dir.chmod(0o700)
        probe = state_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"The state dir {state_dir} cannot be written ({exc.strerror}); "
            "pick another with --state-dir."
        ) from None


def read_peers(path: Path | None, state_dir: Path, app: GatewayApp | None = None) -> list[str]:
    """The other gateways of the cluster, from a servers.conf of the gateway's own."""
    from remoting.servers_conf import ConfigError, read_servers_conf

    if path is None:
        path = state_dir / "servers.conf"
        if not path.exists():
            return []
    try:
        return [server for server, _ in read_servers_conf(path)]
    except FileNotFoundError:
        said = f"--peers {path} does not exist; give a servers.conf file."
        raise UsageError(app.blame("peers_file", said) if app else said) from None
    except (OSError, ConfigError) as exc:
        raise UsageError(str(exc)) from None
