"""Run a bitfusion program as a peer of the NEXT protocol version would be, for the
mixed-version tests: ``python -m tests.integration.newer_protocol PYTHON -m MODULE ARGS...``.

A later version may add optional fields and new messages (remoting.protocol.PROTOCOL_VERSION);
this peer adds, and sends, an optional field to several messages both versions know. With
``--same-version`` it sends them while claiming today's version: a peer that does so is
refused, as any unknown field is.
"""

from __future__ import annotations

import runpy
import sys
import time

from remoting import protocol

ADDED = {  # message -> (new optional field, its kind, the value this peer sends)
    "hello": ("features", protocol.LIST, ["compression"]),
    "allocate": ("priority", protocol.INT, 5),
    "list_gpus": ("detail", protocol.STR, "full"),
    "renew": ("client_load", protocol.NUM, 0.5),
    "reply": ("trace_id", protocol.STR, "t-1"),
    "out": ("ts", protocol.NUM, None),  # None: the time of sending
    "exit": ("ts", protocol.NUM, None),
}


def become_newer(same_version: bool) -> None:
    if not same_version:
        protocol.PROTOCOL_VERSION += 1
    for name, (field, kind, _) in ADDED.items():
        spec = protocol.MESSAGES[name]
        protocol.MESSAGES[name] = protocol.Spec(
            spec.required,
            {**spec.optional, field: kind},
            spec.request,
            spec.authenticated,
            spec.payloads,
        )
    encode = protocol.encode

    def encode_newer(msg_type: str, payloads=(), **fields):  # type: ignore[no-untyped-def]
        if msg_type in ADDED:
            field, _, value = ADDED[msg_type]
            fields[field] = time.time() if value is None else value
        return encode(msg_type, payloads, **fields)

    protocol.encode = encode_newer  # every module calls it as protocol.encode


def main() -> None:
    args = sys.argv[1:]
    same_version = args[:1] == ["--same-version"]
    args = args[1:] if same_version else args
    if args and args[0] == sys.executable:
        args = args[1:]
    if args[:1] != ["-m"] or len(args) < 2:
        sys.exit("usage: python -m tests.integration.newer_protocol [PYTHON] -m MODULE ARGS...")
    become_newer(same_version)
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
