"""Who is asking: the bearer token of a request, checked by this gateway itself.

The dashboard keeps no session and sets no cookie: the page sends ``Authorization: Bearer
TOKEN`` with every call (so no other site can make a browser act with it). This gateway
checks the token's signature and revocation when asked ``hello``; the verdict is kept a few
seconds so a page refreshing every two seconds costs one check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from remoting import tokens

VERDICT_S = 5.0
NO_TOKEN = "Log in with a token of this pool (Authorization: Bearer TOKEN); ask your admin for one."
REFUSED = "This gateway does not accept that token; ask your admin for one."
MINTER = (
    "That token only mints users' tokens (a JupyterHub's); log in with a user's or an "
    "admin's token."
)


@dataclass(frozen=True)
class Caller:
    token: tokens.Token

    @property
    def user(self) -> str:
        return self.token.user

    @property
    def admin(self) -> bool:
        return self.token.admin


class Verdicts:
    """Token text -> (Caller or the sentence refusing it, when decided)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Caller | str, float]] = {}

    def get(self, text: str) -> Caller | str | None:
        hit = self._seen.get(text)
        if hit is None or time.monotonic() - hit[1] > VERDICT_S:
            return None
        return hit[0]

    def put(self, text: str, verdict: Caller | str) -> None:
        if len(self._seen) > 1000:  # bounded: a flood of made-up tokens cannot grow it
            self._seen.clear()
        self._seen[text] = (verdict, time.monotonic())


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
