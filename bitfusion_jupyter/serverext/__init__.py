"""The jupyter_server extension: the pool, this server's kernels and their shares, for the
JupyterLab panel. The browser only talks to its own Jupyter server, behind its auth; the
server asks the gateways (servers.conf / BITFUSION_SERVERS, the user's token).

Enabled as ``bitfusion_jupyter`` (``jupyter-config/jupyter_server_config.d/``, installed with
the package). The contract, under the server's base URL:

``GET /bitfusion/api/pool``
    ``{"configured": bool, "message": str|null, "servers": [{"address": "host:port",
    "state": "ok"|"unreachable"|"unauthorized"|"error", "error": str|null,
    "hostname": str|null, "simulated": bool, "sandbox": {"sandboxed": bool, "refused": bool,
    "line": str}|null, "dashboard_url": "http://HOST:PORT/"|null,
    "gpus": [{"index", "uuid", "name", "memory_total_mib", "memory_granted_mib",
    "memory_free_mib", "memory_used_mib", "utilization_pct", "simulated": bool,
    "shares": int, "mine": [{"share_id", "mib", "used_mib", "kernel_id": str|null}],
    "others_mib": int}]}]}``. With no server configured: ``configured`` false, ``servers``
    empty and ``message`` says to run ``bitfusion init``. A server that does not answer is
    listed with its state and a one-sentence ``error`` (``unauthorized``: the token is
    missing, refused, or of another pool). ``mine`` are the token user's shares on that GPU,
    ``kernel_id`` the kernel of this server holding it; ``others_mib`` the rest granted.

``GET /bitfusion/api/kernels``
    ``{"kernels": [{"kernel_id", "name" (kernelspec), "execution_state", "share": null |
    {"server", "share_id", "kernel", "since", "gpus": [{"index", "name", "uuid", "mib",
    "simulated", "used_mib": int|null}]}}]}``; ``share`` is null for a local kernel,
    ``used_mib`` null while the share's gateway does not answer. ``notice``: null, or
    policing's last word on the kernel, ``{"action": "warn"|"stop"|"kernel_stopped",
    "message", "at" (epoch s), "share_id", "gpu_index", "used_mib", "limit_mib",
    "stop_in_s"}``; a kernel_stopped one stays after the kernel restarts.

``GET /bitfusion/api/presets``
    ``{"presets": [{"name", "display_name", "gpus", "mib": int|null, "fraction":
    float|null, "files": bool}]}``: the installed bitfusion kernelspecs.

``POST /bitfusion/api/kernelspecs`` with ``{"gpus": int, "mib": int|null, "fraction":
float|null, "files": bool (default true: the kernels work in their notebook's folder,
carried to the share; false: in the user's home on the server)}``
    200 ``{"name", "display_name"}``: an installed bitfusion kernelspec for that share,
    else a new user kernelspec. 400 ``{"message": one sentence}`` for a bad request.

``POST /bitfusion/api/kernels/<kernel_id>/shutdown``
    Shuts the kernel down through the server's kernel manager (its shim frees the share):
    200 ``{"shut_down": kernel_id}``; 404 ``{"message"}`` for a kernel this server does not run.

``WS /bitfusion/api/live``
    Pushes ``{"pool": <as GET pool>, "kernels": <as GET kernels>}`` every
    ``push_interval_s`` (a second) while connected.

Gateway answers are shared by all requests for ``survey_ttl_s`` (a second; `survey.Survey`),
asked in a thread with ``gateway_timeout_s`` (2 s) timeouts. These three timings are traits of
`BitfusionExtension`, set like any Jupyter server setting, e.g. in a jupyter_server_config.py:
``c.BitfusionExtension.push_interval_s = 2.0``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, TraitError, validate

from bitfusion_jupyter import pool_model
from bitfusion_jupyter.serverext import kernels
from bitfusion_jupyter.serverext.survey import Survey

# jupyter_server counts every setting named *_last_activity as the server's activity.
ACTIVITY_SETTING = "bitfusion_last_activity"


class BitfusionExtension(ExtensionApp):
    """The extension: its timings as traits, its handlers, and the one `Survey` they share."""

    name = "bitfusion_jupyter"  # also names its own config file, jupyter_bitfusion_jupyter_config
    survey: Survey  # made in initialize_settings, from the traits below

    push_interval_s = Float(
        1.0, help="How often /bitfusion/api/live pushes the pool and kernels, in seconds."
    ).tag(config=True)
    survey_ttl_s = Float(
        1.0,
        help="How long a gateway's answer is shared by every request and tab, in seconds: "
        "the gateways are asked at most this often, however many tabs are open.",
    ).tag(config=True)
    gateway_timeout_s = Float(
        pool_model.TIMEOUT_S,
        help="How long to wait for a gateway's answer before showing it unreachable, in seconds.",
    ).tag(config=True)
    busy_check_s = Float(
        30.0,
        help="How often a kernel busy on a GPU share counts as this server's activity, in "
        "seconds (so a JupyterHub's idle culler does not stop a server whose cell runs on a "
        "GPU for hours without output).",
    ).tag(config=True)

    @validate("push_interval_s", "gateway_timeout_s", "busy_check_s")
    def _positive(self, proposal: Any) -> float:
        if not proposal.value > 0:
            raise TraitError(f"{proposal.trait.name} must be more than 0 seconds.")
        return float(proposal.value)

    @validate("survey_ttl_s")
    def _not_negative(self, proposal: Any) -> float:
        if proposal.value < 0:
            raise TraitError("survey_ttl_s must be 0 seconds or more.")
        return float(proposal.value)

    def initialize_settings(self) -> None:
        """One survey per server: every handler and tab shares its answers."""
        self.survey = Survey(self.survey_ttl_s, self.gateway_timeout_s)
        self.start_busy_check()

    def start_busy_check(self) -> None:
        """Count a kernel busy on a share as activity, every ``busy_check_s``.

        jupyter_server counts kernel messages as activity, and every setting whose name ends
        in ``_last_activity``; a cell computing on a GPU sends nothing for as long as it
        runs, so without this the server looks idle (to JupyterHub's culler) while it works.
        """
        from tornado.ioloop import PeriodicCallback

        app = self.serverapp
        assert app is not None  # set before an extension's initialize_settings

        def check() -> None:
            if kernels.busy_on_a_share(app.kernel_manager):
                app.web_app.settings[ACTIVITY_SETTING] = datetime.now(UTC)

        self._busy_check = PeriodicCallback(check, self.busy_check_s * 1000)
        self._busy_check.start()

    async def stop_extension(self) -> None:
        if getattr(self, "_busy_check", None) is not None:
            self._busy_check.stop()

    def initialize_handlers(self) -> None:
        """The REST and WebSocket handlers above, under the server's base URL."""
        from bitfusion_jupyter.serverext import handlers  # tornado handlers: only when served

        self.handlers.extend(handlers.routes())
        self.log.info("bitfusion: /bitfusion/api is ready")


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "bitfusion_jupyter.serverext", "app": BitfusionExtension}]
