"""The %bitfusion magic's move, as the shim reads it: real Jupyter frames (jupyter_client's
Session), no kernel."""

from __future__ import annotations

import pytest
from jupyter_client.session import Session

from bitfusion_jupyter import file_server, jupyter_frames, move

SESSION = Session(key=b"k")


def frames(kind: str, content: dict, parent: dict | None = None, ident: bytes = b"") -> list:
    msg = SESSION.msg(kind, content, parent=parent or {})
    return ([ident] if ident else []) + SESSION.serialize(msg)


def test_the_move_waits_for_both_the_reply_and_the_idle_of_the_asking_cell_in_either_order():
    asking = SESSION.msg("execute_request", {"code": "%bitfusion -m 1024"})
    other = SESSION.msg("execute_request", {"code": "print(1)"})
    reply = frames("execute_reply", {"status": "ok"}, asking["header"], ident=b"front")
    idle = frames("status", {"execution_state": "idle"}, asking["header"])
    for order in ((reply, idle), (idle, reply)):
        pending = move.PendingMove("local")
        pending.after(asking["header"]["msg_id"], {asking["header"]["msg_id"]: (b"f", [])})
        other_idle = frames("status", {"execution_state": "idle"}, other["header"])
        assert not pending.ends_cell("iopub", other_idle)  # another cell's end is not it
        first, second = order
        assert not pending.ends_cell("shell" if first is reply else "iopub", first)
        assert pending.ends_cell("shell" if second is reply else "iopub", second)


def test_cells_sent_after_the_asking_one_are_the_ones_the_new_kernel_runs():
    in_flight = {cell: (b"front", [cell.encode()]) for cell in ("before", "asks", "next", "last")}
    pending = move.PendingMove("local")
    pending.after("asks", in_flight)
    assert list(pending.behind) == ["next", "last"]
    pending.after("not-a-cell", in_flight)  # asked outside a cell the shim saw: none behind
    assert pending.behind == {}


def test_a_request_that_is_not_the_magics_is_refused_not_obeyed():
    with pytest.raises(ValueError):
        move.parse_request(move.SHIM_REQUEST + '["local"]')
    with pytest.raises(ValueError):
        move.parse_request(move.SHIM_REQUEST + "{not json")
    request = move.parse_request(move.SHIM_REQUEST + '{"action": "local"}')
    answer, pending = move.prepare(request, None, file_server.Choice(None, ""), None)
    assert answer == {"ok": False, "error": "this kernel already runs locally."}
    assert pending is None


def test_frames_are_read_after_any_routing_ids_and_nothing_else_is_taken_for_a_message():
    starting = frames("status", {"execution_state": "starting"}, ident=b"kernel.1.status")
    assert jupyter_frames.is_starting(starting)  # ipykernel's topic first, as on iopub
    busy = frames("status", {"execution_state": "busy"}, ident=b"kernel.1.status")
    assert not jupyter_frames.is_starting(busy)
    output = frames("stream", {"name": "stdout", "text": "starting"}, ident=b"kernel.1.stream")
    assert not jupyter_frames.is_starting(output)
    routed = frames("execute_reply", {"status": "ok"}, ident=b"a" * 9)
    assert jupyter_frames.header(routed)["msg_type"] == "execute_reply"
    assert jupyter_frames.jupyter_parts([b"x" * 9, b"not a message"]) is None
    assert jupyter_frames.header([]) == {}
