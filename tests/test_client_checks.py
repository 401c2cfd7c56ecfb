"""Client-side behaviour around a lease: early checks, release inside run, groups, JSON errors.

Values the daemon would reject (a wait over a week, a TTL out of range, a
reason longer than the daemon keeps) fail with exit 64 and a message that
names the option. A ``deployd release`` inside ``deployd run`` leaves the
run's lease alone, because the run ends it when its command exits. A run
keeps the lock while the command's background processes live, and a failed
``acquire --format json`` prints the error as JSON.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import DEPLOYD, DaemonProcess, Workstation, wait_until

DEPLOYD_COMMAND = " ".join(shlex.quote(part) for part in DEPLOYD)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--wait", "99999999d"], "--wait must be at most 7d00h, got 99999999d00h"),
        (["--ttl", "100d"], "--ttl must be between 1s and 1d00h, got 100d00h"),
        (["--ttl", "500ms"], "--ttl must be between 1s and 1d00h, got 500ms"),
        (["--reason", "r" * 100_000], "--reason is 100000 characters long; the maximum is 1000"),
        (["--commit", "c" * 201], "--commit is 201 characters long; the maximum is 200"),
    ],
)
def test_out_of_range_option_fails_early(
    workstation: Workstation, options: list[str], message: str
) -> None:
    """No daemon runs here: the client must reject the value before it connects."""
    for command in (["run", "api", *options, "--", "true"], ["acquire", "api", *options]):
        result = workstation.deployd(*command)

        assert result.returncode == 64, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_release_inside_run_keeps_lease(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    report = tmp_path / "holder.txt"
    script = (
        f"{DEPLOYD_COMMAND} release && {DEPLOYD_COMMAND} release api && "
        f"{DEPLOYD_COMMAND} status --json > {shlex.quote(str(report))}"
    )

    result = workstation.deployd("run", "api", "--", "sh", "-c", script, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stderr.count("belongs to the 'deployd run' that this runs under") == 2
    status = report.read_text()
    assert '"health": "healthy"' in status
    records = workstation.request("history", limit=10)["result"]["deployments"]
    assert [record["outcome"] for record in records] == ["succeeded"]


def test_acquired_lease_inside_run_releases(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """A lease the command took itself with ``acquire --format env`` is its own to release."""
    start(workstation)
    script = (
        f'eval "$({DEPLOYD_COMMAND} acquire web --format env)" && '
        f'{DEPLOYD_COMMAND} release "$DEPLOYD_LEASE_ID"'
    )

    result = workstation.deployd("run", "api", "--", "sh", "-c", script, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "released web" in result.stderr
    records = workstation.request("history", lock="web", limit=10)["result"]["deployments"]
    assert [record["outcome"] for record in records] == ["released"]


def test_run_waits_for_rest_of_group(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """A command that leaves a background process behind keeps the lock until that one exits."""
    start(workstation)

    result = workstation.deployd("run", "api", "--", "sh", "-c", "sleep 1 & exit 3", timeout=60)

    assert result.returncode == 3, result.stderr
    assert "the command exited with 3; holding api until the other processes" in result.stderr
    assert "To stop them: kill -- -" in result.stderr


def test_busy_acquire_prints_json_error(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    holder = workstation.spawn("run", "api", "--reason", "schema change", "--", "sleep", "60")
    try:
        wait_until(lambda: holder_of(workstation, "api") is not None)

        result = workstation.deployd("acquire", "api", "--format", "json")

        assert result.returncode == 75, result.stderr
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "lock_busy"
        assert error["exit_code"] == 75
        assert error["message"] in result.stderr
        state = error["details"]["lock_state"]
        assert state["lock"] == "api"
        assert state["held"] is True
        assert state["lease"]["purpose"]["reason"] == "schema change"
    finally:
        holder.terminate()
        holder.communicate(timeout=30)


def holder_of(workstation: Workstation, lock: str) -> dict[str, object] | None:
    """Return the lease that holds ``lock``, or None when it is free."""
    for entry in workstation.status()["locks"]:
        if entry["lock"] == lock and entry.get("lease"):
            lease: dict[str, object] = entry["lease"]
            return lease
    return None


def test_sigchld_does_not_end_wait(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """SIGCHLD, as from a daemon this client started and that lost the start race, is no stop."""
    start(workstation)
    holder = workstation.spawn("run", "api", "--", "sleep", "60")
    waiter = None
    try:
        wait_until(lambda: holder_of(workstation, "api") is not None)
        waiter = workstation.spawn("run", "api", "--wait", "60s", "--", "true")
        wait_until(lambda: len(workstation.local_queue("api")) == 1)

        for _ in range(3):
            os.kill(waiter.pid, signal.SIGCHLD)
        holder.terminate()

        _, stderr = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, stderr
    finally:
        holder.kill()
        holder.communicate(timeout=30)
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.communicate(timeout=30)
