"""The gateway answers every message a client may send, from one table, and nothing else."""

import inspect

from gateway.service.admin import Admin
from gateway.service.dispatch import handlers
from gateway.service.inventory import Inventory
from gateway.service.kernel_sessions import KernelSessions
from gateway.service.lifecycle import Lifecycle
from gateway.service.processes import Processes
from gateway.service.queue import AllocationQueue
from remoting import protocol

# The table read from the parts' classes: each entry is then the method a part defines.
TABLE = handlers(Inventory, AllocationQueue, Lifecycle, Processes, KernelSessions, Admin)  # type: ignore[arg-type]


def test_every_authenticated_message_has_exactly_one_handler():
    sent_by_clients = {
        name for name, spec in protocol.MESSAGES.items() if spec.authenticated and name != "reply"
    }
    assert set(TABLE) == sent_by_clients


def test_each_handler_is_a_coroutine_of_a_part_taking_ident_msg_and_token():
    parts = (Inventory, AllocationQueue, Lifecycle, Processes, KernelSessions, Admin)
    for name, handler in TABLE.items():
        assert inspect.iscoroutinefunction(handler), name
        owner = next(p for p in parts if p.__dict__.get(handler.__name__) is handler)
        assert handler.__name__.startswith("on_"), (name, owner)
        params = list(inspect.signature(handler).parameters)
        assert params == ["self", "ident", "msg", "tok"], (name, params)
