"""``deployd freeze`` and ``unfreeze`` with real daemons: refusals, waits, force, bad input.

A freeze stops new grants of one lock, or of every lock with ``--all``,
until ``unfreeze`` or its ``--until`` time. A frozen acquire exits 75 and
names the freeze; a waiter waits it out; ``--force --reason`` passes it and
the deploy's record notes it. Leases held when the freeze starts go on.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProcess, ShellHolder, Workstation, wait_until
from report_rigs import (
    HOST,
    USER,
    SharedStore,
    deployd_json,
    record_of,
    run_deploy,
    shared_store,  # noqa: F401 - a fixture
)

from deployd_client.display import clock_time
from deployd_client.report_commands import parse_until

BY = f"{USER}@{HOST}"


def one_line(stderr: str) -> str:
    """Return the only line of ``stderr``; fail if there are more or none."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def freezes(workstation: Workstation) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = workstation.status()["freezes"]
    return result


def lock_entry(workstation: Workstation, lock: str) -> dict[str, Any]:
    for entry in workstation.status()["locks"]:
        if entry["lock"] == lock:
            found: dict[str, Any] = entry
            return found
    raise AssertionError(f"{lock} is not in status")


def test_frozen_lock_refuses_and_names_freeze(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    before = time.time()
    frozen = workstation.deployd("freeze", "api", "--reason", "release train")
    after = time.time()

    run = workstation.deployd("run", "api", "--", "true")
    acquire = workstation.deployd("acquire", "api")
    other = run_deploy(workstation, tmp_path / "web", "web")
    status = deployd_json(workstation, "status")
    text = workstation.deployd("status")

    assert frozen.returncode == 0, frozen.stderr
    assert one_line(frozen.stderr).startswith(f"deployd: froze api by {BY} since ")
    assert frozen.stderr.rstrip().endswith(": 'release train'")
    for refused in (run, acquire):
        assert refused.returncode == 75, refused.stderr
        line = one_line(refused.stderr)
        assert line.startswith(f"deployd: api is frozen by {BY} since "), line
        assert ": 'release train'; wait for the freeze to end with --wait DURATION" in line
        assert "--force --reason TEXT" in line
    assert other.returncode == 0, other.stderr

    [freeze] = status["freezes"]
    assert set(freeze) == {"scope", "reason", "by", "at", "until"}
    assert freeze["scope"] == "api"
    assert freeze["reason"] == "release train"
    assert freeze["by"] == BY
    assert before <= freeze["at"] <= after
    assert freeze["until"] is None
    entries = {entry["lock"]: entry for entry in status["locks"]}
    assert entries["api"]["frozen"] == freeze
    assert entries["api"]["held"] is False
    assert entries["api"]["token"] == 0
    assert entries["web"]["frozen"] is None
    assert text.returncode == 0, text.stderr
    assert f"frozen   api by {BY} since " in text.stdout
    api_row = next(line for line in text.stdout.splitlines() if line.startswith("api "))
    assert api_row.split()[:3] == ["api", "frozen", "-"]


def test_freeze_all_until_blocks_every_lock(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    requested = time.time()
    frozen = workstation.deployd("freeze", "--all", "--reason", "incident 42", "--until", "2h")
    refused = workstation.deployd("run", "web", "--", "true")
    status = deployd_json(workstation, "status")
    text = workstation.deployd("status")
    lifted = workstation.deployd("unfreeze", "--all")
    after_unfreeze = run_deploy(workstation, tmp_path / "web", "web")

    assert frozen.returncode == 0, frozen.stderr
    assert one_line(frozen.stderr).startswith(f"deployd: froze all locks by {BY} since ")
    assert " until " in frozen.stderr
    assert refused.returncode == 75, refused.stderr
    line = one_line(refused.stderr)
    assert line.startswith(f"deployd: all locks are frozen by {BY} since "), line
    assert re.search(r" since \d\d:\d\d:\d\d [A-Z]\S* until ", line), line
    assert ": 'incident 42'; wait for the freeze to end" in line
    [freeze] = status["freezes"]
    assert freeze["scope"] == "*"
    assert freeze["reason"] == "incident 42"
    assert requested + 7200 - 1 <= freeze["until"] <= time.time() + 7200
    assert f"frozen   all locks by {BY} since " in text.stdout
    assert lifted.returncode == 0, lifted.stderr
    assert one_line(lifted.stderr).startswith(f"deployd: unfroze all locks by {BY} since ")
    assert after_unfreeze.returncode == 0, after_unfreeze.stderr
    assert freezes(workstation) == []


def test_waiter_outlasts_freeze_until_unfreeze(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    workstation = make_workstation(lease={"ttl": "3s"})
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    waiter = None
    try:
        lease = holder.lease()
        assert workstation.deployd("freeze", "api", "--reason", "hold on").returncode == 0
        # A renewal after the freeze: the held lease goes on.
        wait_until(
            lambda: (
                lock_entry(workstation, "api")["lease"]["renewed_at"] > lease["lease"]["renewed_at"]
            )
        )
        assert lock_entry(workstation, "api")["held"] is True

        waiter = workstation.spawn("run", "api", "--wait", "60s", "--", "true")
        wait_until(lambda: len(workstation.local_queue("api")) == 1)
        holder.kill()
        # Free, but still frozen: the waiter stays in line.
        wait_until(lambda: lock_entry(workstation, "api")["lease"] is None)
        wait_until(lambda: lock_entry(workstation, "api")["waiters"])
        assert waiter.poll() is None
        assert len(workstation.local_queue("api")) == 1

        lifted = workstation.deployd("unfreeze", "api")
        _, stderr = waiter.communicate(timeout=30)
    finally:
        holder.kill()
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.wait(10)

    assert lifted.returncode == 0, lifted.stderr
    assert waiter.returncode == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    assert lines[0].startswith("deployd: waiting for api: ")
    assert lines[1].startswith("deployd: api: got the lock after waiting ")
    [record] = [
        item
        for item in deployd_json(workstation, "history", "api")["deployments"]
        if item["token"] == lease["token"] + 1
    ]
    assert record["waited"] > 0
    assert record["outcome"] == "succeeded"


def test_wait_timeout_names_freeze(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    assert workstation.deployd("freeze", "api", "--reason", "audit").returncode == 0

    result = workstation.deployd("run", "api", "--wait", "1s", "--", "true")

    assert result.returncode == 75, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"deployd: waiting for api: frozen api by {BY} since ")
    assert "'audit'" in lines[0]
    assert lines[-1].startswith("deployd: gave up waiting for api after ")
    assert f"(api is frozen by {BY} since " in lines[-1]
    assert ": 'audit'); retry with a longer --wait" in lines[-1]


def test_freeze_ends_at_until(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    assert (
        workstation.deployd("freeze", "api", "--reason", "brief", "--until", "2s").returncode == 0
    )
    [freeze] = freezes(workstation)

    deployed = run_deploy(workstation, tmp_path / "api", "api", "--wait", "60s")

    assert deployed.returncode == 0, deployed.stderr
    assert deployed.session_id is not None
    record = record_of(workstation, deployed.session_id)
    assert record is not None
    assert record["started_at"] >= freeze["until"]
    assert record["waited"] > 0
    assert freezes(workstation) == []


def test_force_passes_freeze_and_is_recorded(
    shared_store: SharedStore,  # noqa: F811 - the fixture imported above
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """A freeze set through one daemon stops another; --force passes it, and history records it."""
    freezer = shared_store.make()
    deployer = shared_store.make()
    start(freezer)
    start(deployer)
    assert freezer.deployd("freeze", "--all", "--reason", "incident").returncode == 0

    refused = deployer.deployd("run", "api", "--", "true")
    forced = run_deploy(
        deployer, tmp_path / "forced", "api", "--force", "--reason", "hotfix", script="exit 4"
    )

    assert refused.returncode == 75, refused.stderr
    assert "all locks are frozen by" in refused.stderr
    assert forced.returncode == 4, forced.stderr
    assert forced.session_id is not None
    record = record_of(deployer, forced.session_id)
    assert record is not None
    assert record["detail"] == f"passed the freeze of * by {BY} (incident): hotfix"
    assert record["outcome"] == "failed"
    assert record["exit_code"] == 4
    assert record["takeover"] == "free"
    assert record["purpose"]["reason"] == "hotfix"
    assert [freeze["scope"] for freeze in freezes(deployer)] == ["*"]


def test_unfreeze_all_leaves_lock_freeze(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    assert workstation.deployd("freeze", "api", "--reason", "own").returncode == 0
    assert workstation.deployd("freeze", "--all", "--reason", "global").returncode == 0
    both = [freeze["scope"] for freeze in freezes(workstation)]

    lifted = workstation.deployd("unfreeze", "--all")
    again = workstation.deployd("unfreeze", "--all")
    refused = workstation.deployd("run", "api", "--", "true")
    not_frozen = workstation.deployd("unfreeze", "web")

    assert both == ["*", "api"]
    assert lifted.returncode == 0, lifted.stderr
    assert again.returncode == 0, again.stderr
    assert one_line(again.stderr) == (
        "deployd: no freeze of all locks was in force; a freeze of one lock needs 'unfreeze LOCK'"
    )
    assert refused.returncode == 75, refused.stderr
    assert "api is frozen by" in refused.stderr
    assert "'own'" in refused.stderr
    assert not_frozen.returncode == 0, not_frozen.stderr
    assert one_line(not_frozen.stderr) == "deployd: web was not frozen"


FREEZE_USAGE_ERRORS = [
    pytest.param(["freeze", "api"], "freeze needs --reason TEXT", id="no-reason"),
    pytest.param(
        ["freeze", "api", "--reason", ""], "freeze needs --reason TEXT", id="empty-reason"
    ),
    pytest.param(
        ["freeze", "api", "--reason", " \t "],
        "freeze needs --reason TEXT (not blank)",
        id="blank-reason",
    ),
    pytest.param(
        ["freeze", "api", "--all", "--reason", "r"],
        "freeze takes either LOCK or --all, not both",
        id="lock-and-all",
    ),
    pytest.param(
        ["freeze", "--reason", "r"], "name the lock to freeze, or give --all", id="no-scope"
    ),
    pytest.param(
        ["freeze", "api", "--reason", "r", "--until", "2001-01-01"],
        "--until '2001-01-01' is in the past",
        id="until-past-date",
    ),
    pytest.param(
        ["freeze", "api", "--reason", "r", "--until", "0s"],
        "--until '0s' is in the past",
        id="until-now",
    ),
    pytest.param(
        ["freeze", "api", "--reason", "r", "--until", "soon"],
        "invalid --until 'soon': use a duration (2h), HH:MM, or YYYY-MM-DD[THH:MM]",
        id="until-garbage",
    ),
    pytest.param(
        ["freeze", "api", "--reason", "r", "--until", "-1h"],
        "invalid --until '-1h'",
        id="until-negative",
    ),
    pytest.param(
        ["freeze", "api", "--reason", "r", "--until", "25:99"],
        "invalid --until '25:99'",
        id="until-bad-clock",
    ),
    pytest.param(["freeze", "prod/api", "--reason", "r"], "invalid lock name", id="bad-lock"),
    pytest.param(["unfreeze"], "name the lock to unfreeze, or give --all", id="unfreeze-no-scope"),
    pytest.param(
        ["unfreeze", "api", "--all"],
        "unfreeze takes either LOCK or --all, not both",
        id="unfreeze-lock-and-all",
    ),
]


@pytest.mark.parametrize(("arguments", "message"), FREEZE_USAGE_ERRORS)
def test_freeze_usage_error_exits_64(
    workstation: Workstation,
    start: Callable[..., DaemonProcess],
    arguments: list[str],
    message: str,
) -> None:
    start(workstation)

    result = workstation.deployd(*arguments)

    assert result.returncode == 64, result.stderr
    assert message in one_line(result.stderr)
    assert freezes(workstation) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lock": "api"}, "freeze needs a reason"),
        ({"lock": "api", "reason": "   "}, "freeze needs a reason that is not blank"),
        ({"lock": "api", "reason": "r", "until": 1_000_000.0}, "is in the past"),
        ({"lock": "api", "all": True, "reason": "r"}, "give either lock or all, not both"),
        ({"reason": "r"}, "name the lock to freeze"),
        ({"lock": "api", "reason": "r", "until": "tomorrow"}, "until must be a number of seconds"),
    ],
)
def test_freeze_request_rejects_bad_fields(
    workstation: Workstation,
    start: Callable[..., DaemonProcess],
    fields: dict[str, Any],
    message: str,
) -> None:
    """The daemon checks a freeze request itself, for clients other than the command."""
    start(workstation)

    response = workstation.request("freeze", **fields)

    assert response["ok"] is False, json.dumps(response)
    assert response["error"]["code"] == "invalid_argument"
    assert message in response["error"]["message"]


# --- replacing, lifting an ended freeze, times ---


def test_freeze_again_names_replaced_freeze(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    first = workstation.deployd("freeze", "api", "--reason", "release train")
    [old] = freezes(workstation)

    second = workstation.deployd("freeze", "api", "--reason", "incident 7")
    response = workstation.request("freeze", lock="api", reason="incident 8")

    assert first.returncode == 0, first.stderr
    assert "replaces" not in first.stderr
    assert second.returncode == 0, second.stderr
    line = one_line(second.stderr)
    assert line.startswith(f"deployd: froze api by {BY} since "), line
    assert line.endswith(
        f": 'incident 7'; this replaces the freeze by {BY} since {clock_time(old['at'])}: "
        "'release train'"
    ), line
    assert response["ok"], response
    assert response["result"]["replaced"]["reason"] == "incident 7"
    assert response["result"]["frozen"]["reason"] == "incident 8"
    assert [freeze["reason"] for freeze in freezes(workstation)] == ["incident 8"]


def test_freeze_after_ended_one_replaces_nothing(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    assert (
        workstation.deployd("freeze", "api", "--reason", "brief", "--until", "1s").returncode == 0
    )
    wait_until(lambda: freezes(workstation) == [])

    again = workstation.deployd("freeze", "api", "--reason", "next")

    assert again.returncode == 0, again.stderr
    assert "replaces" not in one_line(again.stderr)


def test_unfreeze_after_end_says_it_ended(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    assert (
        workstation.deployd("freeze", "--all", "--reason", "brief", "--until", "1s").returncode == 0
    )
    assert workstation.request("freeze", lock="web", reason="short", until=time.time() + 1)["ok"]
    [everything, web] = freezes(workstation)
    wait_until(lambda: freezes(workstation) == [])

    lifted = workstation.deployd("unfreeze", "--all")
    response = workstation.request("unfreeze", lock="web")

    assert lifted.returncode == 0, lifted.stderr
    assert one_line(lifted.stderr) == (
        f"deployd: the freeze of all locks by {BY} ('brief') had already ended at "
        f"{clock_time(everything['until'])}; removed it"
    )
    assert response["ok"], response
    assert response["result"]["unfrozen"] == web
    assert response["result"]["was_in_force"] is False


def test_unfreeze_in_force_reports_it(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    assert workstation.deployd("freeze", "api", "--reason", "hold", "--until", "1h").returncode == 0

    response = workstation.request("unfreeze", lock="api")

    assert response["ok"], response
    assert response["result"]["unfrozen"]["reason"] == "hold"
    assert response["result"]["was_in_force"] is True


def test_unfreeze_help_names_what_all_lifts(workstation: Workstation) -> None:
    unfreeze = workstation.deployd("unfreeze", "--help")
    freeze = workstation.deployd("freeze", "--help")

    assert unfreeze.returncode == 0, unfreeze.stderr
    text = " ".join(unfreeze.stdout.split())
    assert "--all lift the freeze of all locks that 'freeze --all' set" in text
    assert "freezes of single locks stay until 'unfreeze LOCK'" in text
    assert "tomorrow" in " ".join(freeze.stdout.split())


def local_epoch(day: time.struct_time, hour: int, minute: int, days_ahead: int = 0) -> float:
    """Return the epoch seconds of ``hour:minute`` local time, ``days_ahead`` after ``day``."""
    fields = (day.tm_year, day.tm_mon, day.tm_mday + days_ahead, hour, minute, 0, 0, 0, -1)
    return time.mktime(fields)


@pytest.mark.parametrize(
    ("now_clock", "until", "expected"),
    [
        pytest.param((23, 20), "00:00", (0, 0, 1), id="midnight-tomorrow"),
        pytest.param((19, 5), "18:00", (18, 0, 1), id="passed-today"),
        pytest.param((17, 59), "18:00", (18, 0, 0), id="later-today"),
        pytest.param((18, 0), "18:00", (18, 0, 1), id="this-minute"),
    ],
)
def test_until_clock_time_is_next_one(
    now_clock: tuple[int, int], until: str, expected: tuple[int, int, int]
) -> None:
    today = time.localtime()
    now = local_epoch(today, *now_clock) + 29  # 29 seconds into the minute

    assert parse_until(until, now) == local_epoch(today, *expected)


def test_freeze_until_passed_clock_time_ends_tomorrow(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    now = time.localtime()
    this_minute = f"{now.tm_hour:02d}:{now.tm_min:02d}"

    frozen = workstation.deployd("freeze", "api", "--reason", "night", "--until", this_minute)

    assert frozen.returncode == 0, frozen.stderr
    [freeze] = freezes(workstation)
    assert freeze["until"] == local_epoch(now, now.tm_hour, now.tm_min, days_ahead=1)
    assert f" until {clock_time(freeze['until'])}: 'night'" in one_line(frozen.stderr)


@pytest.fixture
def india_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Set a zone 5h30 east of UTC, named IST, for this process; return the TZ value."""
    zone = "IST-05:30"
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    yield zone
    monkeypatch.undo()
    time.tzset()


def test_freeze_times_share_one_form(
    workstation: Workstation,
    start: Callable[..., DaemonProcess],
    india_time: str,
) -> None:
    """The freeze output, refusal, status and waiting line show one time form, with its zone."""
    workstation.environment["TZ"] = india_time
    start(workstation)

    frozen = workstation.deployd("freeze", "api", "--reason", "audit", "--until", "2h")
    refused = workstation.deployd("run", "api", "--", "true")
    status = workstation.deployd("status")
    waited = workstation.deployd("run", "api", "--wait", "1s", "--", "true")
    [freeze] = freezes(workstation)

    expected = f"since {clock_time(freeze['at'])} until {clock_time(freeze['until'])}: 'audit'"
    assert " IST" in expected
    assert frozen.returncode == 0, frozen.stderr
    assert expected in one_line(frozen.stderr)
    assert refused.returncode == 75, refused.stderr
    assert expected in one_line(refused.stderr)
    assert expected in status.stdout
    assert waited.returncode == 75, waited.stderr
    start_line, error_line = waited.stderr.splitlines()
    assert start_line.startswith("deployd: waiting for api: frozen api by "), start_line
    assert expected in start_line
    assert expected in error_line


def test_unfreeze_lock_under_freeze_of_all(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """Unfreezing one lock while all locks are frozen reports that the lock is still frozen."""
    start(workstation)
    assert workstation.deployd("freeze", "--all", "--reason", "incident").returncode == 0

    result = workstation.deployd("unfreeze", "api")

    assert result.returncode == 0, result.stderr
    assert "api is still frozen (it has no freeze of its own) by the freeze of all locks" in (
        result.stderr
    )
    assert "'incident'" in result.stderr
    assert "'deployd unfreeze --all' lifts that one" in result.stderr
    assert "was not frozen" not in result.stderr
