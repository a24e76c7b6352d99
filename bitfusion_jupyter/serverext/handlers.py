"""The extension's REST and WebSocket handlers (the contract is in the package docstring).

Every handler sits behind the Jupyter server's own authentication and authorizer. Gateway
calls go through the extension's one `Survey` (a worker thread, short timeouts, answers kept
``survey_ttl_s``), so the event loop never blocks on a gateway and many tabs cost the gateways
one round per TTL. The handlers read the extension's traits through ``self.extensionapp``
(`ExtensionHandlerMixin`), never module globals, so a jupyter_server_config sets them.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, cast

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import url_path_join
from tornado import web, websocket
from tornado.iostream import StreamClosedError

from bitfusion_jupyter import pool_model
from bitfusion_jupyter.serverext import kernels, specs
from bitfusion_jupyter.serverext.survey import Survey

if TYPE_CHECKING:
    from bitfusion_jupyter.serverext import BitfusionExtension

try:  # jupyter_server >= 2.13 marks websocket handlers as authenticated with this
    from jupyter_server.auth.decorator import ws_authenticated
except ImportError:  # older servers: LiveHandler.get checks current_user itself

    def ws_authenticated(method: Any) -> Any:  # type: ignore[misc]  # the same, unchecked
        return method


KERNELS = "kernels"  # authorizer resources: shares belong to kernels; presets are kernelspecs
KERNELSPECS = "kernelspecs"


async def pool_json(survey: Survey, kernel_manager: Any) -> dict[str, Any]:
    servers, message = pool_model.configured()
    answers = await survey.answers(servers)
    holders = kernels.kernel_of(kernels.running(kernel_manager))
    return pool_model.pool_view(message, [answers[s] for s in servers], holders)


async def kernels_json(survey: Survey, kernel_manager: Any) -> dict[str, Any]:
    running = kernels.running(kernel_manager)
    return kernels.kernels_view(running, await survey.answers(kernels.servers_of(running)))


async def live_json(survey: Survey, kernel_manager: Any) -> dict[str, Any]:
    """Pool and kernels from one survey round (the kernels' servers are usually the pool's)."""
    servers, message = pool_model.configured()
    running = kernels.running(kernel_manager)
    answers = await survey.answers(servers + kernels.servers_of(running))
    return {
        "pool": pool_model.pool_view(
            message, [answers[s] for s in servers], kernels.kernel_of(running)
        ),
        "kernels": kernels.kernels_view(running, answers),
    }


class _Extension(ExtensionHandlerMixin):
    """The extension's app, typed: its traits and its one survey."""

    @property
    def bitfusion(self) -> BitfusionExtension:
        return cast("BitfusionExtension", self.extensionapp)

    @property
    def survey(self) -> Survey:
        return self.bitfusion.survey


class _Handler(_Extension, APIHandler):
    def reply(self, data: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))


class PoolHandler(_Handler):
    auth_resource = KERNELS

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await pool_json(self.survey, self.kernel_manager))


class KernelsHandler(_Handler):
    auth_resource = KERNELS

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await kernels_json(self.survey, self.kernel_manager))


class PresetsHandler(_Handler):
    auth_resource = KERNELSPECS

    @web.authenticated
    @authorized
    async def get(self) -> None:
        found = await asyncio.get_running_loop().run_in_executor(None, specs.presets)
        self.reply({"presets": found})


class KernelspecsHandler(_Handler):
    auth_resource = KERNELSPECS

    @web.authenticated
    @authorized
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError:
            body = None
        try:
            request, files = specs.read_request(body), specs.read_files(body)
            made = await asyncio.get_running_loop().run_in_executor(
                None, specs.ensure, request, files
            )
        except specs.SpecError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.reply(made)


class ShutdownHandler(_Handler):
    auth_resource = KERNELS

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        if kernel_id not in self.kernel_manager:
            raise web.HTTPError(
                404, f"No kernel {kernel_id} runs on this server; it may have ended already."
            )
        # The kernel's shim gives its share back as the kernel ends.
        await ensure_async(self.kernel_manager.shutdown_kernel(kernel_id))
        self.reply({"shut_down": kernel_id})


class LiveHandler(_Extension, JupyterHandler, websocket.WebSocketHandler):
    """Pushes {"pool": ..., "kernels": ...} every ``push_interval_s`` while connected."""

    auth_resource = KERNELS
    _pusher: asyncio.Task | None = None

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.current_user is None:
            raise web.HTTPError(403)
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "read", KERNELS)
        )
        if not allowed:
            raise web.HTTPError(403)
        res = super().get(*args, **kwargs)
        if res is not None:
            await res

    def open(self, *args: Any, **kwargs: Any) -> None:
        self._pusher = asyncio.ensure_future(self._push())

    async def _push(self) -> None:
        survey, interval = self.survey, self.bitfusion.push_interval_s
        while True:
            started = asyncio.get_running_loop().time()
            try:
                payload = json.dumps(await live_json(survey, self.kernel_manager))
            except Exception:
                self.log.exception("bitfusion: building the live update failed")
                payload = None  # skip this beat; the next may succeed
            if payload is not None:
                try:
                    await self.write_message(payload)
                except (websocket.WebSocketClosedError, StreamClosedError):
                    return
            await asyncio.sleep(max(0.1, interval - (asyncio.get_running_loop().time() - started)))

    def on_message(self, message: str | bytes) -> None:
        pass  # the browser only listens

    def on_close(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()


def routes() -> list[tuple[str, type[Any]]]:
    """The extension's URL patterns, under the server's base URL (the app prefixes it)."""
    api = url_path_join("bitfusion", "api")
    return [
        (url_path_join(api, "pool"), PoolHandler),
        (url_path_join(api, "kernels"), KernelsHandler),
        (url_path_join(api, "presets"), PresetsHandler),
        (url_path_join(api, "kernelspecs"), KernelspecsHandler),
        (url_path_join(api, "kernels", r"(?P<kernel_id>[^/]+)", "shutdown"), ShutdownHandler),
        (url_path_join(api, "live"), LiveHandler),
    ]
