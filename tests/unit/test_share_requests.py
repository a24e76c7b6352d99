"""One share model, one check: the CLI, the REST API and the gateway take and refuse the same
requests (tests/data/share_requests.json), each in its own words for the fields."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bitfusion_jupyter import share_request
from bitfusion_jupyter.serverext import specs
from remoting.shares import FIELDS, Want, WantError

CASES = json.loads((Path(__file__).parents[1] / "data" / "share_requests.json").read_text())
IDS = [json.dumps(c["ask"]) for c in CASES["cases"]]


def _cli(ask: dict) -> Want:
    parser = argparse.ArgumentParser()
    share_request.add_arguments(parser)
    argv = ["-n", str(ask["gpus"])]
    argv += ["-m", str(ask["mib"])] if "mib" in ask else []
    argv += ["-p", str(ask["fraction"])] if "fraction" in ask else []
    argv += ["--wait", str(ask["wait_s"])] if "wait_s" in ask else []
    return share_request.from_args(parser.parse_args(argv))


def _wire(ask: dict) -> Want:
    return Want.from_wire(ask).validate()


def _rest(ask: dict) -> Want:
    return specs.read_request({k: v for k, v in ask.items() if k != "wait_s"})


@pytest.mark.parametrize("case", CASES["cases"], ids=IDS)
def test_every_way_in_takes_and_refuses_the_same_requests(case):
    ask, refused = case["ask"], case["refused"]
    if refused is None:
        want = _wire(ask)
        assert _cli(ask) == want
        if "wait_s" not in ask:  # the REST API has no queueing
            assert _rest(ask) == want
        return
    with pytest.raises(share_request.UsageError) as cli:
        _cli(ask)
    assert str(cli.value) == refused
    with pytest.raises(WantError) as wire:
        _wire(ask)
    assert str(wire.value) == refused  # the gateway says it as the CLI does
    if "wait_s" not in ask:
        with pytest.raises(specs.SpecError) as rest:
            _rest(ask)
        # the same sentence, naming JSON fields where the CLI names its options
        with pytest.raises(WantError) as fields:
            Want.from_wire(ask).validate(FIELDS)
        assert str(rest.value) == str(fields.value)


HUGE = 10**5000  # JSON allows it; Python will not even print it


@pytest.mark.parametrize(
    "fields",
    [
        {"gpus": -HUGE},
        {"gpus": 1, "mib": -HUGE},
        {"gpus": 1, "fraction": HUGE},
        {"gpus": 1, "fraction": -HUGE},
        {"gpus": 1, "fraction": float("nan")},
        {"gpus": 1, "fraction": float("inf")},
        {"gpus": 1, "wait_s": HUGE},
        {"gpus": 1, "wait_s": float("nan")},
    ],
    ids=lambda f: ",".join(f),
)
def test_any_number_a_hostile_client_sends_is_refused_in_one_short_sentence(fields):
    with pytest.raises(WantError) as refused:
        Want.from_wire(fields).validate()
    said = str(refused.value)
    assert said.endswith(".") and len(said) < 160 and "\n" not in said
