"""Input checks of ``history`` and ``stats`` (--since, --limit) and of reasons, with real daemons.

``history`` and ``stats`` check ``--since`` the same way and quote the value
as it was typed. Reasons that are required (``--force``, ``force-unlock``,
``freeze``) must not be blank, in the command and in the protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProcess, ShellHolder, Workstation
from report_rigs import deployd_json, seed_deploys

from deployd_client.report_commands import since_epoch


def one_line(stderr: str) -> str:
    """Return the only line of ``stderr``; fail if there are more or none."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- --since ---


@pytest.mark.parametrize("command", ["history", "stats"])
@pytest.mark.parametrize(
    ("since", "message"),
    [
        pytest.param("0", "--since '0' is an empty period", id="zero"),
        pytest.param("0s", "--since '0s' is an empty period", id="zero-seconds"),
        pytest.param("-1d", "invalid duration '-1d'", id="negative"),
        pytest.param("soon", "invalid duration 'soon'", id="garbage"),
    ],
)
def test_since_rejected_alike(
    workstation: Workstation,
    start: Callable[..., DaemonProcess],
    command: str,
    since: str,
    message: str,
) -> None:
    start(workstation)

    result = workstation.deployd(command, "--since", since)

    assert result.returncode == 64, result.stderr
    assert message in one_line(result.stderr)


@pytest.mark.parametrize("command", ["history", "stats"])
def test_since_before_1970_covers_everything(
    workstation: Workstation, start: Callable[..., DaemonProcess], command: str
) -> None:
    seed_deploys(workstation.store_file, "api", [(time.time() - 30 * 86400, 60.0)])
    start(workstation)

    result = deployd_json(workstation, command, "--since", "1000000d")

    assert result["since"] == 0.0
    if command == "history":
        assert len(result["deployments"]) == 1
    else:
        assert result["deploys"] == 1


def test_since_period_starts_at_epoch() -> None:
    assert since_epoch("1d", now=1_000_000.0) == 1_000_000.0 - 86400
    assert since_epoch("1000000d", now=1_000_000.0) == 0.0


def test_since_request_outside_epoch_range(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)

    for op in ("history", "stats"):
        response = workstation.request(op, since=-5.0)
        assert response["ok"] is False, response
        assert response["error"]["code"] == "invalid_argument"
        assert response["error"]["message"] == (
            "since must be a time in seconds since the epoch from 0 (1970) to "
            "4102444800 (2100), got -5.0"
        )


# --- --limit ---


@pytest.mark.parametrize(
    ("limit", "json_output"),
    [
        pytest.param("1001", False, id="one-over"),
        pytest.param("100000000000000000000", False, id="huge"),
        pytest.param("1001", True, id="one-over-json"),
        pytest.param("0", False, id="zero"),
        pytest.param("-3", False, id="negative"),
    ],
)
def test_limit_out_of_range_names_bounds(
    workstation: Workstation, start: Callable[..., DaemonProcess], limit: str, json_output: bool
) -> None:
    start(workstation)

    result = workstation.deployd("history", "--limit", limit, *(["--json"] if json_output else []))

    assert result.returncode == 64, result.stderr
    assert one_line(result.stderr) == (
        f"deployd: --limit must be between 1 and 1000, got {int(limit)}"
    )
    assert result.stdout == ""


def test_limit_at_maximum_is_accepted(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)

    result = deployd_json(workstation, "history", "--limit", "1000")

    assert result["limit"] == 1000


# --- blank reasons ---


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(
            ["run", "api", "--force", "--reason", "   ", "--", "true"],
            "--force needs --reason TEXT (not blank)",
            id="run-force",
        ),
        pytest.param(
            ["acquire", "api", "--force", "--reason", " "],
            "--force needs --reason TEXT (not blank)",
            id="acquire-force",
        ),
        pytest.param(
            ["force-unlock", "api", "--reason", "  ", "--yes"],
            "force-unlock needs --reason TEXT (not blank)",
            id="force-unlock",
        ),
        pytest.param(
            ["freeze", "--all", "--reason", "   "],
            "freeze needs --reason TEXT (not blank)",
            id="freeze",
        ),
    ],
)
def test_blank_reason_rejected(
    workstation: Workstation,
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
    arguments: list[str],
    message: str,
) -> None:
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    try:
        lease = holder.lease()
        result = workstation.deployd(*arguments)
        after = workstation.status()
    finally:
        holder.kill()

    assert result.returncode == 64, result.stderr
    assert message in one_line(result.stderr)
    [entry] = after["locks"]
    assert entry["token"] == lease["token"]
    assert after["freezes"] == []


@pytest.mark.parametrize(
    ("op", "fields", "message"),
    [
        pytest.param(
            "acquire",
            {"lock": "api", "force": True, "force_reason": "  "},
            "force needs a force_reason that is not blank",
            id="acquire",
        ),
        pytest.param(
            "force_unlock",
            {"lock": "api", "reason": " "},
            "force_unlock needs a reason that is not blank",
            id="force-unlock",
        ),
        pytest.param(
            "freeze",
            {"all": True, "reason": "   "},
            "freeze needs a reason that is not blank",
            id="freeze",
        ),
    ],
)
def test_blank_reason_request_rejected(
    workstation: Workstation,
    start: Callable[..., DaemonProcess],
    op: str,
    fields: dict[str, Any],
    message: str,
) -> None:
    start(workstation)

    response = workstation.request(op, **fields)

    assert response["ok"] is False, response
    assert response["error"]["code"] == "invalid_argument"
    assert message in response["error"]["message"]
