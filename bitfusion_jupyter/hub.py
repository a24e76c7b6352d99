"""JupyterHub integration: every single-user server the Hub spawns gets a GPU pool token of
its own Hub user, and the pool's servers, in its environment; the token is revoked on every
gateway when the server stops.

In ``jupyterhub_config.py`` (docs/jupyterhub.md)::

    from bitfusion_jupyter.hub import configure
    configure(c, servers=["gpu1:56001", "gpu2:56001"],
              token_file="/etc/jupyterhub/bitfusion-minter.token")

The Hub holds a *minter* token (``bitfusion gateway token create --user jupyterhub
--minter``): it may only mint user tokens and revoke tokens, so the Hub never holds, and no
single-user server ever sees, an admin token. The minter token stays in the Hub's process: it
is read from ``token_file`` at each spawn and stop (so the admin can replace it without a
restart) and is never put in any environment.

Which token each running server was given is kept in ``issued_file`` (beside the Hub's
database by default): its user, nonce and expiry, never the token itself (a nonce lets a
minter revoke a token, nobody use it). So a Hub restarted while servers run (JupyterHub's
``cleanup_servers = False``, an upgrade, a crash) still revokes a server's token when the
server stops. A token whose revocation is missed anyway (the file lost, a gateway down) works
until it expires, ``token_ttl_s`` after it was minted: that expiry is the bound on any token
the Hub lets out.

The gateway calls block (ZMQ), so they run in a worker thread: the Hub's event loop keeps
serving every other user meanwhile.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado import web

from remoting import fanout, tokens
from remoting.json_file import write_json
from remoting.protocol import ProtocolError
from remoting.servers_conf import normalise

if TYPE_CHECKING:
    from jupyterhub.spawner import Spawner
    from traitlets.config import Config

DEFAULT_TTL_S = 7 * 86400
# Beside the Hub's own state (jupyterhub.sqlite, the cookie secret): its working folder.
DEFAULT_ISSUED_FILE = "bitfusion-issued-tokens.json"
# A spawn waits this long for each gateway that is down; a healthy one answers in ms.
TIMEOUT_S = 5.0
MAKE_MINTER = "bitfusion gateway token create --user jupyterhub --minter"

log = logging.getLogger("bitfusion.hub")


class HubSpawnError(web.HTTPError):
    """A spawn that cannot get its pool token. An HTTPError, so the Hub logs it without a
    traceback and shows ``jupyterhub_message`` (one sentence) to the user and the API caller."""

    def __init__(self, status: int, sentence: str) -> None:
        super().__init__(status, sentence)
        self.jupyterhub_message = sentence

    def __str__(self) -> str:
        return self.jupyterhub_message


def _bare(sentence: str) -> str:
    """A sentence without its full stop, to be quoted inside another."""
    return sentence.strip().rstrip(".")


def _servers(servers: str | Iterable[str]) -> list[str]:
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out: list[str] = []
    for item in items:
        if item.strip():
            try:
                out.append(normalise(item))
            except ValueError as exc:
                raise ValueError(f"bitfusion_jupyter.hub.configure: servers: {exc}.") from None
    if not out:
        raise ValueError("bitfusion_jupyter.hub.configure: give at least one server (host:port).")
    return out


def read_minter(token_file: Path, hub_log: Any = log) -> tokens.Token:
    """The Hub's minter token; HubSpawnError (one sentence) when it cannot be read. Warnings
    go to ``hub_log`` (the spawner's, so they are in the Hub's log)."""
    try:
        text = token_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise HubSpawnError(
            503,
            f"The Hub cannot read its GPU pool minter token in {token_file} ({why}); the Hub's "
            f"admin should make one with '{MAKE_MINTER}' and write it there, readable by the Hub "
            "alone.",
        ) from None
    try:
        tok = tokens.parse(text)
    except tokens.TokenError as exc:
        raise HubSpawnError(
            503,
            f"{token_file} does not hold a GPU pool token ({_bare(str(exc))}); the Hub's admin "
            f"should put the output of '{MAKE_MINTER}' there.",
        ) from None
    if tok.admin:
        # It works, but the Hub would hold far more rights than minting needs.
        hub_log.warning(
            "bitfusion: %s holds an admin token; a minter token (%s) has the least rights "
            "that work.",
            token_file,
            MAKE_MINTER,
        )
    return tok


def mint(
    servers: list[str],
    minter: tokens.Token,
    user: str,
    ttl_s: float,
    token_file: Path,
    timeout_s: float = TIMEOUT_S,
) -> tokens.Token:
    """A user token for ``user`` from the first gateway that mints one (blocking)."""
    refused: list[str] = []
    unreachable: list[str] = []
    for server in servers:
        try:
            [reply] = fanout.ask_server(
                server, minter, [("mint", {"user": user, "expires_s": ttl_s})], timeout_s
            )
        except ProtocolError as exc:  # this client's protocol has no `mint`: a stale install
            refused.append(f"{server}: {_bare(str(exc))}")
            continue
        if reply.data is not None:
            try:
                tok = tokens.parse(str(reply.data.get("token", "")))
            except tokens.TokenError:
                tok = None
            if tok is None or tok.user != user or tok.role != "u":
                # Never hand a server anything but a user token of its own user.
                raise HubSpawnError(
                    502, f"The gateway {server} minted a token that is not a user token of {user}."
                )
            return tok
        said = f"{server}: {_bare(reply.error or reply.state)}"
        (unreachable if reply.state == "unreachable" else refused).append(said)
    if refused:
        raise HubSpawnError(
            503,
            f"The GPU pool refused the Hub's minter token ({'; '.join(refused)}); the Hub's "
            f"admin should make a new one with '{MAKE_MINTER}' on a GPU server of this pool and "
            f"write it to {token_file}.",
        )
    raise HubSpawnError(
        503,
        f"No GPU pool gateway answered the Hub ({'; '.join(unreachable)}); the Hub's admin "
        "should start 'bitfusion gateway' there, or fix the servers given to "
        "bitfusion_jupyter.hub.configure in jupyterhub_config.py.",
    )


def revoke(
    servers: list[str], minter: tokens.Token, nonce: str, timeout_s: float = TIMEOUT_S
) -> list[str]:
    """Revoke the token ``nonce`` names on every gateway (each keeps its own list); the
    sentences of those that did not (blocking)."""
    replies = fanout.ask_each(servers, minter, [("revoke", {"nonce": nonce})], timeout_s)
    return [
        f"{server}: {_bare(reply.error or reply.state)}"
        for server, [reply] in replies.items()
        if reply.data is None
    ]


@dataclass(frozen=True)
class Issued:
    """A token a server was given, as much of it as revoking needs (not the token itself)."""

    user: str
    nonce: str
    expires: int | None

    @property
    def expires_text(self) -> str:
        return tokens.expiry_text(self.expires)


class IssuedTokens:
    """Which token each running server (``user/server name``) was given, kept in a JSON file
    (mode 0600, replaced whole at each change) so that a restarted Hub still knows. A file
    that cannot be read or written costs a warning and that memory, never a spawn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.issued: dict[str, Issued] = {}
        try:
            raw = json.loads(path.read_text())
            self.issued = {
                key: Issued(str(v["user"]), str(v["nonce"]), v.get("expires"))
                for key, v in raw.items()
            }
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning(
                "bitfusion: cannot read %s (%s): tokens of servers that ran before this "
                "start are not revoked when they stop; they work until they expire.",
                path,
                exc,
            )

    def put(self, key: str, tok: tokens.Token) -> None:
        self.issued[key] = Issued(tok.user, tok.nonce, tok.expires)
        self._save()

    def pop(self, key: str) -> Issued | None:
        found = self.issued.pop(key, None)
        if found is not None:
            self._save()
        return found

    def _save(self) -> None:
        now = time.time()
        self.issued = {  # an expired token needs no revoking
            k: v for k, v in self.issued.items() if v.expires is None or v.expires > now
        }
        data = {k: vars(v) for k, v in self.issued.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, data, mode=0o600, indent=1)
        except OSError as exc:
            log.warning(
                "bitfusion: cannot write %s (%s): a Hub restarted now would not revoke the "
                "tokens of servers running now when they stop.",
                self.path,
                exc,
            )


def _key(spawner: Spawner) -> str:
    """A server the same across Hub restarts: its user and its name ('' for the default)."""
    return f"{spawner.user.name}/{getattr(spawner, 'name', '') or ''}"


async def _chained(hook: Callable[[Any], Any] | None, spawner: Spawner) -> None:
    """Run a hook the config set before ours (sync or async)."""
    if hook is not None:
        result = hook(spawner)
        if inspect.isawaitable(result):
            await result


def configure(
    c: Config,
    servers: str | Iterable[str],
    token_file: str | Path,
    token_ttl_s: float = DEFAULT_TTL_S,
    timeout_s: float = TIMEOUT_S,
    issued_file: str | Path = DEFAULT_ISSUED_FILE,
) -> None:
    """Give every single-user server a pool token of its Hub user (``BITFUSION_TOKEN``) and the
    pool's servers (``BITFUSION_SERVERS``); revoke that token pool-wide when it stops.

    ``servers``: the gateways, a list or ``"gpu1:56001,gpu2"``; ``token_file``: the minter
    token's file; ``token_ttl_s``: each user token's lifetime, the bound on a token whose
    revocation was missed; ``timeout_s``: how long to wait for each gateway (they are
    asked in turn at spawn, all at once at stop); ``issued_file``: where the Hub keeps which
    token each running server has (relative: to the Hub's working folder). Hooks already in
    ``c.Spawner`` still run (theirs before ours at spawn, after ours at stop)."""
    pool = _servers(servers)
    path = Path(token_file)
    if not 0 < token_ttl_s <= tokens.MAX_LIFETIME_S:
        raise ValueError(
            "bitfusion_jupyter.hub.configure: token_ttl_s is a number of seconds, more than 0 "
            f"and at most {tokens.MAX_LIFETIME_S}."
        )
    # A section the config has not set reads as a lazy value, not None: look before reading.
    earlier_pre = c.Spawner.pre_spawn_hook if "pre_spawn_hook" in c.Spawner else None
    earlier_post = c.Spawner.post_stop_hook if "post_stop_hook" in c.Spawner else None
    # Per server, the token it was given: kept across Hub restarts (see the module's doc).
    issued = IssuedTokens(Path(issued_file).absolute())

    async def pre_spawn(spawner: Spawner) -> None:
        await _chained(earlier_pre, spawner)
        user = spawner.user.name
        if not tokens.USER_RE.match(user):
            raise HubSpawnError(
                400,
                f"The Hub user name {user!r} cannot be a GPU pool user name (1 to 32 letters, "
                "digits, '_' or '-'), so this server cannot have GPUs; the Hub's admin should "
                "map it to one (c.Authenticator.username_map).",
            )
        minter = read_minter(path, spawner.log)
        stale = issued.pop(_key(spawner))
        if stale is not None:  # a start without a stop in between: that token goes first
            await asyncio.to_thread(revoke, pool, minter, stale.nonce, timeout_s)
        tok = await asyncio.to_thread(mint, pool, minter, user, token_ttl_s, path, timeout_s)
        issued.put(_key(spawner), tok)
        # A new dict: the trait's value may be the one the config gave every spawner.
        spawner.environment = {
            **spawner.environment,
            "BITFUSION_TOKEN": str(tok),
            "BITFUSION_SERVERS": ",".join(pool),
        }
        spawner.log.info("bitfusion: a GPU pool token for %s, expires %s", user, tok.expires_text)

    async def post_stop(spawner: Spawner) -> None:
        try:
            tok = issued.pop(_key(spawner))
            if tok is None:
                spawner.log.info(
                    "bitfusion: no GPU pool token recorded for %s in %s (none was minted, or "
                    "the file was lost); any it had stops working at its expiry.",
                    spawner.user.name,
                    issued.path,
                )
                return
            try:
                minter = read_minter(path, spawner.log)
            except HubSpawnError as exc:
                missed = [str(exc)]
            else:
                missed = await asyncio.to_thread(revoke, pool, minter, tok.nonce, timeout_s)
            if missed:
                spawner.log.warning(
                    "bitfusion: could not revoke the GPU pool token of %s on %s; it works there "
                    "until it expires, %s.",
                    tok.user,
                    "; ".join(missed),
                    tok.expires_text,
                )
            else:
                spawner.log.info("bitfusion: revoked the GPU pool token of %s", tok.user)
        finally:
            await _chained(earlier_post, spawner)

    c.Spawner.pre_spawn_hook = pre_spawn
    c.Spawner.post_stop_hook = post_stop
