"""The OpenAPI 3 description of the dashboard's JSON API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from remoting.protocol import VERSION


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
NULL_STR = {"type": "string", "nullable": True}
NULL_INT = {"type": "integer", "nullable": True}
NULL_NUM = {"type": "number", "nullable": True}
STATE = {"type": "string", "enum": ["ok", "unreachable", "unauthorized", "error"]}

SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        {
            "message": STR,
            # An action sent to every server that some did not take: each one's answer.
            "servers": {"type": "object", "additionalProperties": STR},
        },
        required=["message"],
    ),
    "ShareOnGpu": _obj({"share_id": STR, "owner": STR, "mib": INT, "used_mib": INT}),
    "Gpu": _obj(
        {
            "index": INT,
            "uuid": STR,
            "name": STR,
            "simulated": BOOL,
            "draining": BOOL,
            "memory_total_mib": INT,
            "memory_used_mib": NULL_INT,
            "memory_granted_mib": INT,
            "memory_free_mib": INT,
            "utilization_pct": NULL_INT,
            "share_sizes_mib": {"type": "array", "items": INT},
            "shares": {"type": "array", "items": {"$ref": "#/components/schemas/ShareOnGpu"}},
        }
    ),
    "Server": _obj(
        {
            "address": STR,
            "state": STATE,
            "error": NULL_STR,
            "reachable": BOOL,
            "rtt_ms": NULL_NUM,
            "uptime_s": NULL_NUM,
            "hostname": NULL_STR,
            "version": NULL_STR,
            "simulated": BOOL,
            # How the server walls shares off; null while it cannot be asked.
            "sandbox": {
                "oneOf": [
                    {"type": "null"},
                    _obj({"sandboxed": BOOL, "refused": BOOL, "line": STR}),
                ]
            },
            "idle_timeout_s": NULL_NUM,
            "queued": INT,
            "counters": {"type": "object", "additionalProperties": INT},
            "gpus": {"type": "array", "items": {"$ref": "#/components/schemas/Gpu"}},
        }
    ),
    "Cluster": _obj(
        {
            "user": STR,
            "admin": BOOL,
            "servers": {"type": "array", "items": {"$ref": "#/components/schemas/Server"}},
        }
    ),
    "Share": _obj(
        {
            "server": STR,
            "hostname": NULL_STR,
            "share_id": STR,
            "owner": STR,
            "client_host": STR,
            "runs": STR,
            "age_s": NUM,
            "idle_s": NUM,
            "gpus": {
                "type": "array",
                "items": _obj(
                    {"index": INT, "name": STR, "mib": INT, "used_mib": INT, "simulated": BOOL}
                ),
            },
        }
    ),
    "Event": _obj(
        {
            "server": STR,
            "ts": NUM,
            "kind": STR,
            "user": NULL_STR,
            "share_id": NULL_STR,
            "detail": STR,
        }
    ),
    "History": _obj(
        {
            "range": {"type": "string", "enum": ["hour", "day"]},
            "servers": {
                "type": "array",
                "items": _obj(
                    {
                        "address": STR,
                        "state": STATE,
                        "error": NULL_STR,
                        "step_s": NULL_INT,
                        "samples": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "t": NUM,
                                    "gpus": {
                                        "type": "array",
                                        "items": _obj(
                                            {
                                                "index": INT,
                                                "used_mib": NULL_INT,
                                                "granted_mib": INT,
                                                "utilization_pct": NULL_INT,
                                            }
                                        ),
                                    },
                                }
                            ),
                        },
                    }
                ),
            },
        }
    ),
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": _json(_ref("Error"), "Bad input, said in one sentence."),
    "401": _json(_ref("Error"), "No token, or one this pool does not accept."),
    "403": _json(_ref("Error"), "An admin action with a plain user's token."),
    "404": _json(_ref("Error"), "No such server, GPU or share."),
    "502": _json(_ref("Error"), "A gateway asked did not answer (or did not take it)."),
}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[str, ...] = ("401",),
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        # Any route may answer 502: checking the token asks this gateway, which may be busy.
        "responses": {"200": ok, **{code: ERRORS[code] for code in (*errors, "502")}},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


ADMIN = ("400", "401", "403", "404", "502")

DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "bitfusion-jupyter cluster dashboard API",
        "version": VERSION,
        "description": "Every route needs `Authorization: Bearer TOKEN` (a token of this "
        "pool). A plain user's token sees the cluster and the details of their own shares; "
        "admin actions need an admin token.",
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"token": []}],
    "paths": {
        "/api/v1/me": {
            "get": _op(
                "Who the token belongs to, and the cluster's servers.",
                _json(
                    _obj({"user": STR, "admin": BOOL, "servers": {"type": "array", "items": STR}}),
                    "The caller.",
                ),
            )
        },
        "/api/v1/cluster": {
            "get": _op(
                "Every server's health and GPU memory map.", _json(_ref("Cluster"), "The cluster.")
            )
        },
        "/api/v1/shares": {
            "get": _op(
                "Active shares the token may see: owner, client host, what runs, age, idle.",
                _json(_obj({"shares": {"type": "array", "items": _ref("Share")}}), "Shares."),
            )
        },
        "/api/v1/events": {
            "get": _op(
                "Recent events: grants, refusals, policing, lease expiries, releases, drains.",
                _json(_obj({"events": {"type": "array", "items": _ref("Event")}}), "Events."),
            )
        },
        "/api/v1/history": {
            "get": _op(
                "GPU memory and utilisation over the last hour (10 s) or day (5 min).",
                _json(_ref("History"), "Samples per server."),
                params=[
                    {
                        "name": "range",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["hour", "day"]},
                    }
                ],
                errors=("400", "401"),
            )
        },
        "/api/v1/shares/{server}/{share_id}/release": {
            "post": _op(
                "Release a share (admin): its processes stop, its memory is free.",
                _json(_obj({"server": STR, "released": STR}), "Released."),
                params=[_path_param("server", STR), _path_param("share_id", STR)],
                errors=ADMIN,
            )
        },
        "/api/v1/gpus/{server}/{index}/drain": {
            "post": _op(
                "Drain a GPU (admin): no new share; existing ones finish. false undrains.",
                _json(_obj({"server": STR, "index": INT, "draining": BOOL}), "Its state."),
                body=_obj({"drain": BOOL}),
                params=[
                    _path_param("server", STR),
                    _path_param("index", {"type": "integer", "minimum": 0, "maximum": 999999}),
                ],
                errors=ADMIN,
            )
        },
        "/api/v1/settings/idle-timeout": {
            "put": _op(
                "Set the idle timeout on every server (admin); 0 turns it off.",
                _json(
                    _obj(
                        {
                            "idle_timeout_s": NULL_NUM,
                            "servers": {"type": "object", "additionalProperties": NULL_STR},
                        }
                    ),
                    "The timeout, and each server's answer.",
                ),
                body=_obj({"seconds": {"type": "number", "minimum": 0}}),
                errors=("400", "401", "403", "502"),
            )
        },
        "/api/v1/tokens": {
            "post": _op(
                "Create a token (admin); shown once.",
                _json(_obj({"token": STR, "user": STR, "admin": BOOL}), "The new token."),
                body=_obj({"user": STR, "admin": BOOL}, required=["user"]),
                errors=("400", "401", "403"),
            )
        },
        "/api/v1/tokens/revoke": {
            "post": _op(
                "Revoke a token on every server of the cluster (admin).",
                _json(
                    _obj(
                        {
                            "revoked": STR,
                            "servers": {"type": "object", "additionalProperties": NULL_STR},
                        }
                    ),
                    "Whose token, and each server's answer.",
                ),
                body=_obj({"token": STR}),
                errors=("400", "401", "403", "502"),
            )
        },
        "/metrics": {
            "get": _op(
                "The cluster in Prometheus text format.",
                {"description": "Metrics.", "content": {"text/plain": {"schema": STR}}},
            )
        },
    },
}
