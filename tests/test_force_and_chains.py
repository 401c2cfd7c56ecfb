"""Taking a lock with ``--force``, nesting through another lock, and commands that cannot run.

``run/acquire --force`` prompts for confirmation before it takes a lock from
a live holder on a terminal, and needs ``--yes`` elsewhere. A deploy under ``api`` that
runs a deploy under ``web``, which runs ``deployd run api`` again, joins the
outer ``api`` lease instead of waiting for itself. ``deployd run`` with a
command that cannot be found or run exits as a shell would, before it takes
the lock.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import DEPLOYD, DaemonProcess, Workstation, wait_until
from report_rigs import terminal_command

DEPLOYD_COMMAND = " ".join(shlex.quote(part) for part in DEPLOYD)


def read_terminal(controller: int, process: subprocess.Popen[bytes]) -> str:
    """Return what ``process`` wrote to its terminal until it closed it."""
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=60)
    os.close(controller)
    return b"".join(chunks).decode(errors="replace")


def lease_token(workstation: Workstation, lock: str) -> int | None:
    for entry in workstation.status()["locks"]:
        if entry["lock"] == lock and entry.get("lease"):
            token: int = entry["lease"]["token"]
            return token
    return None


@contextmanager
def held(workstation: Workstation, lock: str) -> Iterator[subprocess.Popen[str]]:
    """Hold ``lock`` with ``deployd run LOCK -- sleep`` until the block ends."""
    holder = workstation.spawn("run", lock, "--", "sleep", "60")
    try:
        wait_until(lambda: lease_token(workstation, lock) is not None, timeout=30)
        yield holder
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.communicate(timeout=30)


def test_force_without_yes_off_terminal_fails(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    with held(workstation, "api"):
        token = lease_token(workstation, "api")

        result = workstation.deployd(
            "run", "api", "--force", "--reason", "hotfix", "--", "true", stdin=subprocess.DEVNULL
        )

        assert result.returncode == 64, result.stderr
        assert "not on a terminal, so add --yes" in result.stderr
        assert "api is held by" in result.stderr
        assert lease_token(workstation, "api") == token


def test_force_with_yes_takes_lock(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    with held(workstation, "api"):
        token = lease_token(workstation, "api")
        assert token is not None

        result = workstation.deployd(
            "acquire",
            "api",
            "--force",
            "--yes",
            "--reason",
            "hotfix",
            "--pid",
            str(os.getpid()),
            "--format",
            "json",
            stdin=subprocess.DEVNULL,
        )

        assert result.returncode == 0, result.stderr
        assert lease_token(workstation, "api") == token + 1


def test_force_of_free_lock_skips_prompt(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)

    result = workstation.deployd(
        "run", "api", "--force", "--reason", "hotfix", "--", "true", stdin=subprocess.DEVNULL
    )

    assert result.returncode == 0, result.stderr


def test_force_on_terminal_prompts_first(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """On a terminal the holder is shown; 'n' leaves the lock alone, 'y' takes it."""
    start(workstation)
    with held(workstation, "api"):
        token = lease_token(workstation, "api")
        assert token is not None
        argv = [*DEPLOYD, "run", "api", "--force", "--reason", "hotfix", "--", "true"]

        declined, controller = terminal_command(argv, workstation.env())
        wait_until(lambda: b"[y/N]" in os.read(controller, 4096), timeout=30)
        os.write(controller, b"n\n")
        declined_output = read_terminal(controller, declined)
        assert declined.returncode == 75, declined_output
        assert "not forced" in declined_output
        assert lease_token(workstation, "api") == token

        accepted, controller = terminal_command(argv, workstation.env())
        wait_until(lambda: b"[y/N]" in os.read(controller, 4096), timeout=30)
        os.write(controller, b"y\n")
        accepted_output = read_terminal(controller, accepted)
        assert accepted.returncode == 0, accepted_output


def test_nested_through_other_lock_joins(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """``run api -- run web -- run api`` joins the outer api lease instead of waiting for it."""
    start(workstation)
    report = tmp_path / "inner.txt"
    inner = (
        'printf "%s %s %s %s\\n" "$DEPLOYD_LOCK" "$DEPLOYD_FENCING_TOKEN" '
        '"$DEPLOYD_LEASE_DEPTH" "$DEPLOYD_OUTER_LEASES" > "$0"'
    )
    argv = [
        "run", "api", "--", *DEPLOYD,
        "run", "web", "--", *DEPLOYD,
        "run", "api", "--", "sh", "-c", inner, str(report),
    ]  # fmt: skip

    result = workstation.deployd(*argv, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "joined the lease on api of the deploy this runs under" in result.stderr
    lock, token, depth, outer = report.read_text().split()
    assert lock == "api"
    assert token == "1"
    assert depth == "2"
    assert outer.startswith("web=")
    records = workstation.request("history", limit=10)["result"]["deployments"]
    assert sorted(record["lock"] for record in records) == ["api", "web"]


def test_acquire_env_names_outer_leases(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """``acquire --format env`` under a deploy of another lock keeps that lock in the chain."""
    start(workstation)
    report = tmp_path / "outer.txt"
    script = (
        f'eval "$({DEPLOYD_COMMAND} acquire web --format env)"; '
        f'printf "%s\\n" "$DEPLOYD_OUTER_LEASES" > {shlex.quote(str(report))}; '
        f'{DEPLOYD_COMMAND} release "$DEPLOYD_LEASE_ID"'
    )

    result = workstation.deployd("run", "api", "--", "sh", "-c", script, timeout=60)

    assert result.returncode == 0, result.stderr
    assert report.read_text().startswith("api=")


def test_missing_command_fails_before_lock(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\n")
    cases = [
        ("/nonexistent/deploy", 127, "command not found: /nonexistent/deploy"),
        ("no-such-deploy-command", 127, "command not found: no-such-deploy-command"),
        (str(tmp_path), 126, "it is a directory"),
        (str(not_executable), 126, "permission denied"),
    ]
    for command, exit_code, message in cases:
        result = workstation.deployd("run", "api", "--", command)

        assert result.returncode == exit_code, (command, result.stderr)
        assert message in result.stderr
        assert "the lock was not taken" in result.stderr
    assert workstation.request("history", limit=10)["result"]["deployments"] == []
    assert lease_token(workstation, "api") is None


def test_refused_force_keeps_holder_running(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """A force refused for want of --yes sends nothing to the holder: its deploy keeps running."""
    start(workstation)
    with held(workstation, "api") as holder:
        result = workstation.deployd(
            "run", "api", "--force", "--reason", "hotfix", "--", "true", stdin=subprocess.DEVNULL
        )

        assert result.returncode == 64
        assert holder.poll() is None
