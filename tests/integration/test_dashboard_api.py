"""The dashboard's API against its own OpenAPI document (schemathesis): every route, with
examples generated from the document, answers as the document says (status, content type,
schema) and never with a server error. Runs against a real gateway, as an admin and as a
plain user."""

from __future__ import annotations

import signal

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.gateways import start_web_gateway, stop_leftovers  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    gw, base = start_web_gateway(
        tmp_path_factory.mktemp("dashboard-api"), "--simulate-gpus", "2x16GiB"
    )
    # A share, so that views have something in them.
    holder = gw.bf_background("run", "-m", "2048", "--", "sleep", "120")
    yield gw, base
    holder.kill()
    gw.kill(signal.SIGTERM)
    stop_leftovers(gw.state_dir)


SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _check_every_operation(served, admin: bool) -> None:
    """Each operation of the served document, with examples made from it, answered and
    checked against it. Driven through hypothesis directly rather than schemathesis's
    pytest plugin, whose lazy loading breaks with newer pytest releases."""
    gw, base = served
    token = gw.token("root", admin=True) if admin else gw.token("alice")
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11  # every route of the API is in the document

    for operation in operations:

        @given(case=operation.as_strategy())
        @SETTINGS
        def check(case) -> None:
            case.call_and_validate(
                base_url=base, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS
            )

        check()


def test_the_api_answers_an_admin_as_its_document_says(served):
    _check_every_operation(served, admin=True)


def test_the_api_answers_a_plain_user_as_its_document_says(served):
    _check_every_operation(served, admin=False)
