"""An atheris target: the wire protocol's decoder and the gateway's message handling, in process.

Run by tests/security/test_fuzz.py (``python -m tests.security.fuzz_target -max_total_time=15
...``), since ``atheris.Fuzz()`` never returns. Each input becomes the frames of one message,
raw or shaped like a real one (a real user or admin token, a known share id, fields of the
right kinds with odd values), and goes through ``protocol.decode`` and ``Gateway._handle`` on a
Gateway object over a temporary state dir and a simulated pool. The expected outcomes are a
ProtocolError from ``decode`` and a refusal or an answer from ``_handle``; anything else, an
exception or an "internal error" the gateway logs with a traceback, is a crash.

Messages that start or signal processes (spawn, kernel_start, register_pid) always carry a
refused token: the fuzzer must not run random commands or signal random pids on this machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["remoting", "gateway"]):
    from gateway import cluster_keys
    from gateway.gpus import open_inventory
    from gateway.service import Gateway
    from gateway.settings import GatewayApp
    from remoting import protocol, tokens

RISKY = {"spawn", "kernel_start", "register_pid"}
TYPES = sorted(protocol.MESSAGES)
KINDS = [protocol.STR, protocol.INT, protocol.NUM, protocol.BOOL, protocol.LIST, protocol.DICT]


class Crashes(logging.Handler):
    """Keeps every record the gateway logged with a traceback: each one is a crash."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class Target:
    def __init__(self) -> None:
        state = Path(tempfile.mkdtemp(prefix="bf-atheris-"))
        keys = cluster_keys.load_or_create(state)
        inventory = open_inventory("2x16GiB", state, "fuzzhost")
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.gw = Gateway(
            GatewayApp().gateway_config(state_dir=state, lease_grace_s=5.0), inventory, keys
        )
        mint = tokens.mint
        other = cluster_keys.load_or_create(state / "other-pool")
        self.tokens = [
            str(mint(keys.token_secret, keys.public, "alice")),
            str(mint(keys.token_secret, keys.public, "root", admin=True)),
            str(mint(keys.token_secret, keys.public, "old", expires=int(time.time()) - 1)),
            str(mint(other.token_secret, keys.public, "mallory")),
            "bf1.u.x.y.z",
        ]
        self.refused = self.tokens[3]
        self.crashes = Crashes()
        logging.getLogger("bitfusion.gateway").addHandler(self.crashes)
        self.ids = 0
        self.runs = 0

    # --- values of each kind, odd ones included --------------------------------------
    def value(self, fdp: Any, kind: str, depth: int = 0) -> Any:
        if kind == protocol.STR:
            return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
        if kind == protocol.INT:
            return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 24))  # up to 192-bit ints
        if kind == protocol.NUM:
            return fdp.ConsumeFloat() if fdp.ConsumeBool() else fdp.ConsumeInt(8)
        if kind == protocol.BOOL:
            return fdp.ConsumeBool()
        if depth > 3:
            return None
        kinds = [protocol.STR, protocol.INT, protocol.NUM, protocol.BOOL, protocol.LIST]
        if kind == protocol.LIST:
            n = fdp.ConsumeIntInRange(0, 4)
            return [self.value(fdp, fdp.PickValueInList(kinds), depth + 1) for _ in range(n)]
        n = fdp.ConsumeIntInRange(0, 4)
        return {
            fdp.ConsumeUnicode(8): self.value(fdp, fdp.PickValueInList(kinds), depth + 1)
            for _ in range(n)
        }

    def message(self, fdp: Any) -> list[bytes]:
        msg_type = fdp.PickValueInList(TYPES)
        spec = protocol.MESSAGES[msg_type]
        header: dict[str, Any] = {"type": msg_type}
        for name, kind in {**spec.required, **spec.optional}.items():
            if name in spec.optional and not fdp.ConsumeBool():
                continue
            if fdp.ConsumeProbability() < 0.05:  # the wrong kind now and then
                kind = fdp.PickValueInList(KINDS)
            header[name] = self.value(fdp, kind)
        if spec.authenticated and fdp.ConsumeProbability() < 0.9:
            header["token"] = fdp.PickValueInList(self.tokens)
        if msg_type in RISKY:
            header["token"] = self.refused
        if "id" in header and fdp.ConsumeBool():
            self.ids += 1
            header["id"] = self.ids
        shares = sorted(self.gw.ledger.shares)
        if "share_id" in header and shares and fdp.ConsumeBool():
            header["share_id"] = fdp.PickValueInList(shares)
        low, high = spec.payloads
        n = fdp.ConsumeIntInRange(max(0, low - 1), min(high, 3) + 1)
        payloads = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)) for _ in range(n)]
        return [protocol.MAGIC, json.dumps(header).encode(), *payloads]

    def frames(self, data: bytes) -> list[bytes]:
        fdp = atheris.FuzzedDataProvider(data)
        mode = fdp.ConsumeIntInRange(0, 3)
        if mode == 0:  # anything at all
            n = fdp.ConsumeIntInRange(1, 4)
            return [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 128)) for _ in range(n)]
        if mode == 1:  # the magic, then any header bytes
            return [protocol.MAGIC, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))]
        return self.message(fdp)

    # --- one input -----------------------------------------------------------------------
    def __call__(self, data: bytes) -> None:
        self.runs += 1
        frames = self.frames(data)
        try:
            protocol.decode(frames)
        except protocol.ProtocolError:
            pass
        self.loop.run_until_complete(self.gw.dispatch.handle(b"\x00fuzz", frames))
        if len(self.gw.ledger.shares) > 8:  # keep room in the pool for more grants
            for share in list(self.gw.ledger.shares.values()):
                self.loop.run_until_complete(self.gw.lifecycle.end_share(share, "fuzz cleanup"))
        if self.crashes.records:
            record = self.crashes.records[0]
            text = logging.Formatter().format(record)
            raise RuntimeError(f"the gateway logged an internal error for {frames!r}:\n{text}")


def main() -> None:
    logging.basicConfig(handlers=[logging.NullHandler()])  # refusals are not crashes
    target = Target()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
