"""The client's JSON line codec against the standard json module."""

import json

import pytest

from deployd_client import jsonline

VALUES = [
    {},
    {"v": 1, "id": 7, "op": "hold", "lock": "prod:api", "wait": 0.5, "force": False, "x": None},
    {
        "reason": '-rollback "quoted" é ✓ \\ \n tab\t',
        "nested": {"list": [1, [2, [3]], {"a": True}]},
    },
    [1.5, -2, 10**20, "", []],
]


@pytest.mark.parametrize("value", VALUES)
def test_round_trip_matches_json(value: object) -> None:
    encoded = jsonline.dumps(value)
    assert json.loads(encoded) == value
    assert jsonline.loads(encoded) == value
    assert jsonline.loads(json.dumps(value, indent=2)) == value


@pytest.mark.parametrize(
    "text", ["", "{", '{"a": 1} x', '{"a": NaN}', '{"a": Infinity}', "[1,]", "{'a': 1}"]
)
def test_invalid_text_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        jsonline.loads(text)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1: "x"}, {"a": object()}, b"bytes"])
def test_unencodable_value_raises(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        jsonline.dumps(value)


def test_surrounding_whitespace_accepted() -> None:
    assert jsonline.loads('  {"ok": true}\r\n') == {"ok": True}
