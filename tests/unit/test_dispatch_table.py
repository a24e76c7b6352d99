"""The gateway answers every message a client may send, from one table, and nothing else."""

import inspect

from gateway.service import Gateway
from gateway.service.dispatch import HANDLERS
from remoting import protocol


def test_every_authenticated_message_has_exactly_one_handler():
    sent_by_clients = {
        name for name, spec in protocol.MESSAGES.items() if spec.authenticated and name != "reply"
    }
    assert set(HANDLERS) == sent_by_clients


def test_each_handler_is_a_coroutine_of_the_gateway_taking_ident_msg_and_token():
    for name, handler in HANDLERS.items():
        assert inspect.iscoroutinefunction(handler), name
        assert getattr(Gateway, handler.__name__) is handler, name  # a part Gateway is made of
        params = list(inspect.signature(handler).parameters)
        assert params == ["self", "ident", "msg", "tok"], (name, params)
