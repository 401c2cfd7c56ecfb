"""Compact JSON for one protocol line, without importing the ``json`` package.

``json`` imports ``re`` and compiles patterns at import time, which costs a
client call more than the whole exchange with the daemon. This module uses
the C scanner and string quoting that ``json`` itself is built on (the
``_json`` module).
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

_quote = _json.encode_basestring_ascii


class _ScannerSettings:
    """The attributes the C scanner reads: strict JSON, plain dicts, no NaN or Infinity."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: ClassVar[dict[str, str]] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not valid JSON")


# The scanner reads its settings from any object with these attributes.
_scan = _json.make_scanner(_ScannerSettings())  # type: ignore[arg-type]
_WHITESPACE = " \t\r\n"


def loads(text: str) -> Any:
    """Parse one JSON value; raise ValueError when ``text`` is not exactly that."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON at character {exc.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return value


def dumps(value: Any) -> str:
    """Return ``value`` as compact JSON; only dicts with string keys, lists and scalars."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts)


def _encode(value: Any, parts: list[str]) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(_quote(value))
    elif isinstance(value, int):
        parts.append(int.__repr__(value))
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value} cannot be sent as JSON")
        parts.append(float.__repr__(value))
    elif isinstance(value, dict):
        parts.append("{")
        for index, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, got {type(key).__name__}")
            if index:
                parts.append(",")
            parts.append(_quote(key))
            parts.append(":")
            _encode(item, parts)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _encode(item, parts)
        parts.append("]")
    else:
        raise TypeError(f"cannot send a {type(value).__name__} as JSON")
