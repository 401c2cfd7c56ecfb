"""Durations (``30s``, ``1h30m``) and the lock-name rule, shared by the client and the daemon."""

from __future__ import annotations

import re

import pytest

from deployd.sessions import new_session_id, random_suffix
from deployd_client.durations import format_duration, parse_duration
from deployd_client.names import LOCK_NAME_RULE, MAX_LOCK_NAME_LENGTH, lock_name_problem

# --- parse_duration ---

VALID_DURATIONS = [
    ("45", 45.0),
    ("0.5", 0.5),
    ("0", 0.0),
    ("500ms", 0.5),
    ("30s", 30.0),
    ("10m", 600.0),
    ("2h", 7200.0),
    ("2d", 172800.0),
    ("1h30m", 5400.0),
    ("1m30s", 90.0),
    ("1.5s", 1.5),
    ("1.5m", 90.0),
    ("1s500ms", 1.5),
    (" 30s ", 30.0),
    ("-5", -5.0),
]


@pytest.mark.parametrize(("text", "seconds"), VALID_DURATIONS)
def test_parse_valid_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


INVALID_DURATIONS = [
    "",
    "   ",
    "s",
    "ms",
    "abc",
    "10x",
    "10 m",
    "1h 30m",
    "5.s",
    ".5s",
    "1..2s",
    "1.2.3s",
    "-5s",
    "+5s",
    "0x10",
    "1_0s",
    "10S",
    "\u00b2s",  # superscript two: str.isdigit() accepts it, float() does not
    "\u0661\u0662s",  # Arabic-Indic digits
    "inf",
    "-inf",
    "infinity",
    "nan",
    "NaN",
    "1e400",
    "9" * 400 + "d",
]


@pytest.mark.parametrize("text", INVALID_DURATIONS)
def test_parse_invalid_duration(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as caught:
        parse_duration(text)
    assert repr(text) in str(caught.value)
    assert "500ms, 30s, 10m, 1h30m, 2d" in str(caught.value)


# --- format_duration ---

FORMATTED = [
    (0.0, "0ms"),
    (0.85, "850ms"),
    (0.0004, "0ms"),
    (1.0, "1s"),
    (1.5, "1.5s"),
    (5.0, "5s"),
    (9.94, "9.9s"),
    (10.0, "10s"),
    (42.0, "42s"),
    (60.0, "1m00s"),
    (192.0, "3m12s"),
    (3599.0, "59m59s"),
    (3600.0, "1h00m"),
    (7500.0, "2h05m"),
    (86399.0, "23h59m"),
    (86400.0, "1d00h"),
    (90000.0, "1d01h"),
    (-42.0, "-42s"),
    (-0.5, "-500ms"),
]


@pytest.mark.parametrize(("seconds", "text"), FORMATTED)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.5, 1.0, 30.0, 600.0, 5400.0])
def test_format_then_parse_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# --- lock names ---

VALID_NAMES = [
    "a",
    "A",
    "0",
    "api",
    "prod:api",
    "prod:eu-west-1:api",
    "api.v2",
    "api_worker",
    "9lives",
    "a-",
    "a:",
    "a" * MAX_LOCK_NAME_LENGTH,
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_lock_name(name: str) -> None:
    assert lock_name_problem(name) is None


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_match_rule(name: str) -> None:
    assert re.fullmatch(LOCK_NAME_RULE, name)


INVALID_NAMES = [
    "prod/api",
    "..",
    ".api",
    "-api",
    "_api",
    ":api",
    "my api",
    " api",
    "api ",
    "api\n",
    "api\x00",
    "api\t",
    "api;rm",
    "api'",
    'api"',
    "api*",
    "a$b",
    "api/../etc",
    "\u00e1pi",
    "ap\u00ed",
    "\u0661api",  # Arabic-Indic digit one
    "\uff41pi",  # fullwidth a
]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_lock_name(name: str) -> None:
    problem = lock_name_problem(name)
    assert problem is not None
    assert repr(name) in problem
    assert LOCK_NAME_RULE in problem


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_fail_rule(name: str) -> None:
    assert re.fullmatch(LOCK_NAME_RULE, name, flags=re.ASCII) is None


def test_empty_lock_name() -> None:
    problem = lock_name_problem("")
    assert problem is not None
    assert "''" in problem
    assert "empty" in problem
    assert LOCK_NAME_RULE in problem


@pytest.mark.parametrize("length", [MAX_LOCK_NAME_LENGTH + 1, 200, 10_000])
def test_too_long_lock_name(length: int) -> None:
    name = "a" * length
    problem = lock_name_problem(name)
    assert problem is not None
    assert f"{length} characters" in problem
    assert f"maximum is {MAX_LOCK_NAME_LENGTH}" in problem
    assert LOCK_NAME_RULE in problem
    assert len(problem) < 300, "the message should quote a prefix, not the whole name"


@pytest.mark.parametrize("value", [None, 5, 1.5, True, ["api"], {"lock": "api"}, b"api"])
def test_non_string_lock_name(value: object) -> None:
    problem = lock_name_problem(value)
    assert problem is not None
    assert "must be a string" in problem
    assert type(value).__name__ in problem


def test_rule_and_maximum_agree() -> None:
    assert re.fullmatch(LOCK_NAME_RULE, "a" * MAX_LOCK_NAME_LENGTH)
    assert re.fullmatch(LOCK_NAME_RULE, "a" * (MAX_LOCK_NAME_LENGTH + 1)) is None


# --- session ids ---


@pytest.mark.parametrize("length", [1, 6, 8])
def test_random_suffix_characters(length: int) -> None:
    suffixes = {random_suffix(length) for _ in range(200)}
    assert all(re.fullmatch(f"[a-z0-9]{{{length}}}", suffix) for suffix in suffixes)
    if length > 1:
        assert len(suffixes) > 190


def test_session_id_cleans_user_name() -> None:
    session = new_session_id("ana b/ü", "build-7", now=1_770_000_000.0)
    assert re.fullmatch(r"ana-b--@build-7_20260202T024000Z_[a-z0-9]{6}", session)
