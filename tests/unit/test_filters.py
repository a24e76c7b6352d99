import pytest

from remoting import filters


def test_parse_and_match():
    f = [filters.parse("device.name=a100"), filters.parse("device.memory>=40GiB")]
    assert f[1] == ["device.memory", ">=", 40960]
    assert filters.matches(f, {"device.name": "NVIDIA A100-SXM4-80GB", "device.memory": 81920})
    assert not filters.matches(f, {"device.name": "Tesla T4", "device.memory": 16384})
    assert filters.check_wire(f) == f


@pytest.mark.parametrize("text", ["gpu=1", "device.name>A", "device.memory=lots", "nothing"])
def test_bad_filters_say_what_is_wrong(text):
    with pytest.raises(filters.FilterError):
        filters.parse(text)
