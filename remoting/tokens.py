"""Access tokens: what a user pastes into ``bitfusion init`` and every request carries.

A token is ``bf1.<role>.<user>.<nonce>[.e<expiry>].<mac>.<server key>``:

- role ``u`` (a user), ``a`` (an admin, who sees and touches every share) or ``m`` (a minter,
  such as a JupyterHub's: it may only mint users' tokens and revoke tokens, and sees nothing);
- ``e<expiry>``, optional: the Unix time (whole seconds, UTC) after which gateways refuse the
  token; a token without it never expires (every token made before expiry existed);
- ``mac`` is an HMAC of the parts before it (the expiry included, so it cannot be edited or
  cut off) under the cluster secret, so any gateway that holds that secret checks a token
  without a database, and one token serves a whole pool whose gateways share the cluster
  keys (as Bitfusion's did);
- ``server key`` is the gateways' CurveZMQ public key, so the client can encrypt to the right
  server and refuses an impostor, with nothing else to copy around.

Revocation is a list of nonces kept by the gateway; expiry is checked against the gateway's
own clock, so the servers of a pool should keep theirs in step (NTP).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from zmq.utils import z85

PREFIX = "bf1"
ROLES = {"u": "user", "a": "admin", "m": "minter"}
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,31}$")
EXPIRY_RE = re.compile(r"^e([0-9]{1,12})$")
DURATION_RE = re.compile(r"^([0-9]{1,6})([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIFETIME_S = 10 * 365 * 86400  # beyond ten years, leave the expiry out


class TokenError(ValueError):
    """A token that cannot be read or is not valid here; the text is one sentence."""


def _damaged(part: str) -> str:
    return (
        f"this bitfusion token is damaged (its {part} part is unreadable): copy it again whole, "
        "or ask your admin for a new one."
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def z85_to_token_key(public_z85: bytes) -> str:
    """The CurveZMQ public key as it appears in a token (base64url, shell-safe)."""
    return _b64(z85.decode(public_z85))


@dataclass(frozen=True)
class Token:
    role: str
    user: str
    nonce: str
    mac: str
    server_key: str  # base64url of the 32-byte Curve public key
    expires: int | None = None  # Unix time; None: never

    @property
    def admin(self) -> bool:
        return self.role == "a"

    @property
    def minter(self) -> bool:
        return self.role == "m"

    @property
    def signed_part(self) -> str:
        base = f"{PREFIX}.{self.role}.{self.user}.{self.nonce}"
        return base if self.expires is None else f"{base}.e{self.expires}"

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and self.expires <= (time.time() if now is None else now)

    @property
    def expires_text(self) -> str:
        return expiry_text(self.expires)

    @property
    def server_public_z85(self) -> bytes:
        return z85.encode(_unb64(self.server_key))

    def __str__(self) -> str:
        return f"{self.signed_part}.{self.mac}.{self.server_key}"


def expiry_text(expires: int | None) -> str:
    """An expiry as people read it, in UTC so every server and client says the same."""
    if expires is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))


def _mac(secret: bytes, signed_part: str) -> str:
    return _b64(hmac.new(secret, signed_part.encode(), hashlib.sha256).digest()[:18])


def parse_duration(text: str) -> int:
    """'90m', '8h', '30d' (or '45s') -> seconds; raises TokenError with one sentence."""
    m = DURATION_RE.match(text.strip().lower())
    seconds = int(m.group(1)) * UNIT_S[m.group(2)] if m else 0
    if not 0 < seconds <= MAX_LIFETIME_S:
        raise TokenError(
            f"{text!r} is not a lifetime; give a whole number with s, m, h or d "
            "(e.g. 90m, 8h or 30d), at most 3650d."
        )
    return seconds


def mint(
    secret: bytes,
    server_public_z85: bytes,
    user: str,
    admin: bool = False,
    expires: int | None = None,
    *,
    minter: bool = False,
) -> Token:
    """A new token for ``user``, signed with the cluster secret; ``expires``: Unix time;
    ``minter``: a token that may only mint users' tokens and revoke tokens."""
    if not USER_RE.match(user):
        raise TokenError(
            f"user name {user!r} is not allowed; use 1 to 32 letters, digits, '_' or '-'."
        )
    if admin and minter:
        raise TokenError("a token is an admin's or a minter's, not both.")
    role = "a" if admin else "m" if minter else "u"
    nonce = _b64(secrets.token_bytes(12))
    unsigned = Token(role, user, nonce, "", z85_to_token_key(server_public_z85), expires)
    return Token(
        role, user, nonce, _mac(secret, unsigned.signed_part), unsigned.server_key, expires
    )


def parse(text: str) -> Token:
    """Read a token's parts; raises TokenError when it is not a bitfusion token."""
    parts = text.strip().split(".")
    if len(parts) not in (6, 7) or parts[0] != PREFIX:
        raise TokenError(
            "this is not a bitfusion token (it should start with 'bf1.' and have six or seven "
            "parts); ask your admin for one made by 'bitfusion gateway token create'."
        )
    _, role, user, nonce, *expiry, mac, server_key = parts
    if role not in ROLES or not USER_RE.match(user):
        raise TokenError(_damaged("role or user"))
    expires = None
    if expiry:
        m = EXPIRY_RE.match(expiry[0])
        if m is None:
            raise TokenError(_damaged("expiry"))
        expires = int(m.group(1))
    try:
        if len(_unb64(server_key)) != 32:
            raise ValueError
    except ValueError:
        raise TokenError(_damaged("server key")) from None
    return Token(role, user, nonce, mac, server_key, expires)


def verify(secret: bytes, token: Token) -> bool:
    """True when the token was signed with this cluster secret."""
    return hmac.compare_digest(_mac(secret, token.signed_part), token.mac)
