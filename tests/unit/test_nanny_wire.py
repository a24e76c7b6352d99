"""Both ends of the gateway-nanny wire name their message types through one NannyMsg.

Read from the source, so a type that one end sends and the other does not know is caught here
rather than as a message the nanny logs and ignores.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from gateway.nanny.wire import FrameDecoder, NannyMsg, encode_frame

ROOT = Path(__file__).resolve().parents[2]
NANNY = ROOT / "gateway" / "nanny"
NANNY_SIDE = [NANNY / "process.py", NANNY / "buffers.py"]  # what the nanny process runs
# The gateway end: the relay, and the service parts that tell a nanny what to do.
GATEWAY_SIDE = [
    NANNY / "relay.py",
    NANNY / "link.py",
    *sorted((ROOT / "gateway" / "service").glob("*.py")),
]

TO_NANNY = {
    NannyMsg.ATTACH,
    NannyMsg.ACK,
    NannyMsg.STDIN,
    NannyMsg.STDIN_CLOSE,
    NannyMsg.SIGNAL,
    NannyMsg.TERMINATE,
}
FROM_NANNY = {NannyMsg.ATTACHED, NannyMsg.STDIN_SEQ, NannyMsg.OUT, NannyMsg.EXIT}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _sent_types(paths: list[Path]) -> list[ast.expr]:
    """The value of every ``"type"`` key in a dict literal: the headers these files build."""
    values = []
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Dict):
                values += [
                    value
                    for key, value in zip(node.keys, node.values, strict=True)
                    if isinstance(key, ast.Constant) and key.value == "type"
                ]
    return values


def _member(value: ast.expr) -> NannyMsg:
    assert isinstance(value, ast.Attribute), ast.unparse(value)
    assert isinstance(value.value, ast.Name) and value.value.id == "NannyMsg", ast.unparse(value)
    assert value.attr in NannyMsg.__members__, ast.unparse(value)
    return NannyMsg[value.attr]


def _named(paths: list[Path]) -> set[NannyMsg]:
    """Every NannyMsg member these files name (sent or handled)."""
    return {
        NannyMsg[node.attr]
        for path in paths
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "NannyMsg"
    }


def test_every_member_has_one_direction() -> None:
    assert set(NannyMsg) == TO_NANNY | FROM_NANNY
    assert not TO_NANNY & FROM_NANNY


def test_the_nanny_sends_only_nanny_msg_members_and_all_of_its_direction() -> None:
    sent = [_member(value) for value in _sent_types(NANNY_SIDE)]
    assert set(sent) == FROM_NANNY


def test_the_relay_sends_only_nanny_msg_members_to_the_nanny() -> None:
    sent = [_member(value) for value in _sent_types(GATEWAY_SIDE)]
    assert sent and set(sent) <= TO_NANNY


def test_each_end_handles_every_type_the_other_sends() -> None:
    assert _named(NANNY_SIDE) >= TO_NANNY
    assert _named([NANNY / "relay.py"]) >= FROM_NANNY


def test_no_type_literals_on_either_end() -> None:
    for path in [*GATEWAY_SIDE, *NANNY_SIDE]:
        assert '"type": "' not in path.read_text(), path


def test_a_member_goes_on_the_wire_as_its_plain_string() -> None:
    frame = encode_frame({"type": NannyMsg.STDIN_SEQ, "seq": 3})
    assert b'"type":"stdin_seq"' in frame
    [(header, payload)] = FrameDecoder().feed(frame)
    assert header["type"] == NannyMsg.STDIN_SEQ and payload == b""
    assert NannyMsg(header["type"]) is NannyMsg.STDIN_SEQ
    assert json.loads(json.dumps({"type": NannyMsg.OUT})) == {"type": "out"}


def test_the_nanny_package_imports_only_what_the_nanny_needs() -> None:
    """``from gateway.nanny import main`` runs under ``-I -S`` at every launch: no asyncio,
    no typing, none of the gateway's side of the package."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from gateway.nanny import main; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert {"gateway.nanny.process", "gateway.nanny.wire"} <= loaded
    gateway_side = {"gateway.nanny.link", "gateway.nanny.launcher", "gateway.nanny.relay"}
    assert not loaded & ({"asyncio", "typing", "zmq"} | gateway_side)
