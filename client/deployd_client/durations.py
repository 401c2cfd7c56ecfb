"""Parsing and printing of durations such as ``30s``, ``10m`` or ``1h30m``."""

_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Return the number of seconds in ``text``.

    Accepts a plain number of seconds (``45``, ``0.5``) or unit parts written
    together (``500ms``, ``30s``, ``10m``, ``1h30m``, ``2d``). Raises ValueError
    with the value and the accepted forms when ``text`` is neither.
    """
    stripped = text.strip()
    try:
        total: float | None = float(stripped)
    except ValueError:
        total = _sum_unit_parts(stripped)
    if total is None or total != total or total in (float("inf"), float("-inf")):
        raise ValueError(
            f"invalid duration {text!r}: use a number of seconds or units such as "
            "500ms, 30s, 10m, 1h30m, 2d"
        )
    return total


def _sum_unit_parts(text: str) -> float | None:
    """Add up parts like ``1h`` ``30m``; return None unless all of ``text`` is such parts."""
    total = 0.0
    position = 0
    while position < len(text):
        number_end = position
        # ASCII digits only: str.isdigit() also accepts characters such as "²" that float() rejects.
        while number_end < len(text) and text[number_end] in "0123456789.":
            number_end += 1
        unit_end = number_end
        while unit_end < len(text) and text[unit_end].isalpha():
            unit_end += 1
        number, unit = text[position:number_end], text[number_end:unit_end]
        if unit not in _SECONDS_PER_UNIT or not number or number.count(".") > 1:
            return None
        if number.startswith(".") or number.endswith("."):
            return None
        total += float(number) * _SECONDS_PER_UNIT[unit]
        position = unit_end
    return total if text else None


def format_duration(seconds: float) -> str:
    """Format ``seconds`` compactly for people: ``850ms``, ``42s``, ``3m12s``, ``2h05m``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s".replace(".0s", "s")
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
