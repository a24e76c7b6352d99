"""The dashboard's tornado application: the page, the JSON API, OpenAPI and /metrics."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

from tornado import web

from gateway.cluster_keys import ClusterKeys
from gateway.web import auth, metrics, openapi, views
from gateway.web.cluster import Reply, ask, ask_each, ask_one, outcomes
from remoting import tokens
from remoting.fanout import TtlCache
from remoting.messages import ErrorCode

STATIC = Path(__file__).parent / "static"
SNAPSHOT_S = 1.0  # one round of questions serves a page's parallel calls


class Context:
    """What every handler shares: the cluster's servers, the keys, the verdict cache."""

    def __init__(self, own_address: str, peers: list[str], keys: ClusterKeys) -> None:
        self.own = own_address
        self.servers = [own_address, *[p for p in peers if p != own_address]]
        self.keys = keys
        self.verdicts = auth.Verdicts()
        # One round per caller's token (each sees what their token may see).
        self._snapshots: TtlCache[str, dict[str, list[Reply]]] = TtlCache(SNAPSHOT_S, 100)

    async def snapshot(self, caller: auth.Caller) -> dict[str, list[Reply]]:
        """list_gpus, list_shares and hello (health) of every server, as this caller may
        see them: ``snap[server] == [gpus, shares, hello]``."""
        questions: list[tuple[str, dict[str, Any]]] = [
            ("list_gpus", {}),
            ("list_shares", {}),
            ("hello", {}),
        ]
        return await self._snapshots.get(
            str(caller.token), lambda: ask_each(self.servers, caller.token, questions)
        )

    def forget_snapshots(self) -> None:
        self._snapshots.clear()  # after an admin action, show its effect at once


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra  # more fields of the error's JSON (e.g. each server's answer)


class BaseHandler(web.RequestHandler):
    ctx: Context

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        extra: dict[str, Any] = {}
        if isinstance(exc, ApiError):
            message, extra = str(exc), exc.extra
        elif status_code == 404:
            message = (
                "No such page or API route here; the API is described at /api/v1/openapi.json."
            )
        elif status_code == 405:
            message = "That method is not allowed on this route; see /api/v1/openapi.json."
        else:
            message = "The dashboard failed on this request; the gateway's log says why."
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message, **extra}))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ApiError):
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
        else:
            super()._handle_request_exception(e)

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, allow_nan=False))  # NaN is not JSON

    async def caller(self, admin: bool = False) -> auth.Caller:
        text = auth.bearer(self.request.headers.get("Authorization"))
        if text is None:
            raise ApiError(401, auth.NO_TOKEN)
        verdict = self.ctx.verdicts.get(text)
        if verdict is None:
            verdict = await self._check(text)
            self.ctx.verdicts.put(text, verdict)
        if isinstance(verdict, str):
            raise ApiError(401, verdict)
        if admin and not verdict.admin:
            raise ApiError(403, "Only an admin token may do this; ask your admin.")
        return verdict

    async def _check(self, text: str) -> auth.Caller | str:
        try:
            tok = tokens.parse(text)
        except tokens.TokenError:
            return auth.REFUSED
        reply = await asyncio.to_thread(ask_one, self.ctx.own, tok, "hello")
        if reply.data is None and reply.state != "unauthorized":
            # A busy gateway is not a verdict on the token: say so, log no one out, cache nothing.
            raise ApiError(502, "This gateway did not answer in time; try again in a moment.")
        if reply.data is not None and tok.minter:
            return auth.MINTER
        if reply.data is not None:
            return auth.Caller(tok)
        # The gateway's own sentence: expired (and when), revoked, or not of this pool.
        return reply.error or auth.REFUSED

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}", parse_constant=_not_json)
        except ValueError:
            raise ApiError(400, "The request body is not JSON; send a JSON object.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return data

    def server_arg(self, server: str) -> str:
        if server not in self.ctx.servers:
            raise ApiError(404, f"{server} is not a gateway of this cluster.")
        return server


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; JSON has none


def _everywhere(replies: dict[str, list[Reply]], done: str, again: str) -> dict[str, str]:
    """Each server's answer to an action sent to all; a 502 naming those that did not take it,
    since an admin must not believe a token revoked (or a timeout set) where it is not."""
    said = outcomes(replies)
    missed = [f"{s} ({text.rstrip('.')})" for s, text in said.items() if text != "ok"]
    if missed:
        n = len(said) - len(missed)
        raise ApiError(
            502,
            f"{done} on {n} of {len(said)} servers, not on {', '.join(missed)}; {again}.",
            servers=said,
        )
    return said


def _failed(reply: Reply) -> ApiError:
    http: dict[str, int] = {
        ErrorCode.DENIED: 403,
        ErrorCode.NOT_FOUND: 404,
        ErrorCode.BAD_REQUEST: 400,
    }
    status = http.get(reply.code or "", 502)  # a StrEnum member is found by its string
    return ApiError(status, reply.error or "The gateway did not answer.")


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise ApiError(404, "No such page or API route here; the API is at /api/v1/openapi.json.")


class PageHandler(BaseHandler):
    async def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish((STATIC / "index.html").read_bytes())


class OpenApiHandler(BaseHandler):
    async def get(self) -> None:
        self.reply(openapi.DOCUMENT)


class MeHandler(BaseHandler):
    async def get(self) -> None:
        c = await self.caller()
        self.reply({"user": c.user, "admin": c.admin, "servers": self.ctx.servers})


class ClusterHandler(BaseHandler):
    async def get(self) -> None:
        c = await self.caller()
        snap = await self.ctx.snapshot(c)
        self.reply(
            {
                "user": c.user,
                "admin": c.admin,
                "servers": [views.server_view(s, *snap[s]) for s in self.ctx.servers],
            }
        )


class SharesHandler(BaseHandler):
    async def get(self) -> None:
        c = await self.caller()
        snap = await self.ctx.snapshot(c)
        self.reply({"shares": views.shares_view({s: r[1] for s, r in snap.items()})})


class EventsHandler(BaseHandler):
    async def get(self) -> None:
        c = await self.caller()
        snap = await self.ctx.snapshot(c)
        self.reply({"events": views.events_view({s: r[1] for s, r in snap.items()})})


class HistoryHandler(BaseHandler):
    async def get(self) -> None:
        c = await self.caller()
        name = self.get_query_argument("range", "hour")
        if name not in ("hour", "day"):
            raise ApiError(400, f"No history range {name!r}; ask for hour or day.")
        replies = await ask(self.ctx.servers, c.token, ("history", {"range": name}))
        self.reply(
            {
                "range": name,
                "servers": [
                    {
                        "address": s,
                        "state": r.state,
                        "error": r.error,
                        "step_s": (r.data or {}).get("step_s"),
                        "samples": (r.data or {}).get("samples", []),
                    }
                    for s, [r] in replies.items()
                ],
            }
        )


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        c = await self.caller()
        snap = await self.ctx.snapshot(c)
        servers = [views.server_view(s, *snap[s]) for s in self.ctx.servers]
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(metrics.render(servers, admin=c.admin))


class ReleaseHandler(BaseHandler):
    async def post(self, server: str, share_id: str) -> None:
        c = await self.caller(admin=True)
        [reply] = (
            await ask([self.server_arg(server)], c.token, ("release", {"share_id": share_id}))
        )[server]
        if reply.data is None:
            raise _failed(reply)
        self.ctx.forget_snapshots()
        self.reply({"server": server, "released": share_id})


class DrainHandler(BaseHandler):
    async def post(self, server: str, index: str) -> None:
        c = await self.caller(admin=True)
        drain = self.body().get("drain", True)
        if not isinstance(drain, bool):
            raise ApiError(400, '"drain" is true (drain the GPU) or false (undrain it).')
        fields = {"index": int(index), "drain": drain}
        [reply] = (await ask([self.server_arg(server)], c.token, ("drain", fields)))[server]
        if reply.data is None:
            raise _failed(reply)
        self.ctx.forget_snapshots()
        self.reply({"server": server, **reply.data})


class IdleTimeoutHandler(BaseHandler):
    async def put(self) -> None:
        c = await self.caller(admin=True)
        seconds = self.body().get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ApiError(400, '"seconds" is a number, 0 or more (0 turns the timeout off).')
        replies = await ask(self.ctx.servers, c.token, ("set_idle_timeout", {"seconds": seconds}))
        self.ctx.forget_snapshots()
        said = _everywhere(replies, "Set", "set it again when they answer")
        self.reply({"idle_timeout_s": seconds or None, "servers": said})


class TokensHandler(BaseHandler):
    async def post(self) -> None:
        await self.caller(admin=True)
        data = self.body()
        user, admin = data.get("user"), data.get("admin", False)
        if not isinstance(user, str) or not isinstance(admin, bool):
            raise ApiError(400, 'Give {"user": NAME} and, for an admin token, "admin": true.')
        try:
            tok = tokens.mint(self.ctx.keys.token_secret, self.ctx.keys.public, user, admin)
        except tokens.TokenError as exc:
            raise ApiError(400, str(exc)) from None
        self.reply({"token": str(tok), "user": tok.user, "admin": tok.admin})


class RevokeHandler(BaseHandler):
    async def post(self) -> None:
        c = await self.caller(admin=True)
        text = self.body().get("token")
        try:
            tok = tokens.parse(text if isinstance(text, str) else "")
        except tokens.TokenError as exc:
            raise ApiError(400, f"That is not a token of this pool ({exc}).") from None
        replies = await ask(self.ctx.servers, c.token, ("revoke", {"nonce": tok.nonce}))
        self.ctx.verdicts = auth.Verdicts()  # the revoked token must stop working here at once
        said = _everywhere(replies, "Revoked", "revoke it again when they answer")
        self.reply({"revoked": tok.user, "servers": said})


def make_app(
    *, own_address: str, peers: list[str], keys: ClusterKeys, state_dir: Path
) -> web.Application:
    ctx = Context(own_address, peers, keys)
    server = r"([^/]+)"
    routes: list[tuple[str, type[BaseHandler]]] = [
        (r"/", PageHandler),
        (r"/api/v1/openapi.json", OpenApiHandler),
        (r"/api/v1/me", MeHandler),
        (r"/api/v1/cluster", ClusterHandler),
        (r"/api/v1/shares", SharesHandler),
        (r"/api/v1/events", EventsHandler),
        (r"/api/v1/history", HistoryHandler),
        (rf"/api/v1/shares/{server}/([^/]+)/release", ReleaseHandler),
        (rf"/api/v1/gpus/{server}/([0-9]{{1,6}})/drain", DrainHandler),  # int() of any size
        (r"/api/v1/settings/idle-timeout", IdleTimeoutHandler),
        (r"/api/v1/tokens", TokensHandler),
        (r"/api/v1/tokens/revoke", RevokeHandler),
        (r"/metrics", MetricsHandler),
    ]
    return web.Application(
        [(path, handler, {"ctx": ctx}) for path, handler in routes]
        + [(r"/static/(.*)", web.StaticFileHandler, {"path": str(STATIC)})],
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
    )
