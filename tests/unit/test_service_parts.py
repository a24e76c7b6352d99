"""The gateway's service parts are handed only what they use (REDESIGN §4.4): every field of
each part is read by that part, and no part reaches into the gateway that built it."""

import ast
import dataclasses
import inspect
import textwrap

import pytest

from gateway.service.access import Access
from gateway.service.admin import Admin
from gateway.service.dispatch import Dispatch
from gateway.service.grants import Grants
from gateway.service.housekeeping import Housekeeping
from gateway.service.inventory import Inventory
from gateway.service.kernel_sessions import KernelSessions
from gateway.service.lifecycle import Lifecycle
from gateway.service.processes import Processes
from gateway.service.queue import AllocationQueue

PARTS = [
    Access, Admin, Dispatch, Grants, Housekeeping, Inventory, KernelSessions, Lifecycle,
    Processes, AllocationQueue,
]  # fmt: skip


def _self_attributes(cls: type) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.__name__)
def test_each_part_uses_every_thing_it_is_handed(part):
    used = _self_attributes(part)
    unused = [f.name for f in dataclasses.fields(part) if f.name not in used]
    assert unused == [], f"{part.__name__} is handed {unused} and never uses them"


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.__name__)
def test_each_part_reads_only_what_it_is_handed_or_defines(part):
    own = {f.name for f in dataclasses.fields(part)} | {
        name for name, _ in inspect.getmembers(part)
    }
    strays = sorted(_self_attributes(part) - own)
    assert strays == [], f"{part.__name__} reads {strays}, which nothing hands it"
