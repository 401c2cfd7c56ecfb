"""The ``deployd`` command against a real daemon: exit codes, output formats, release, run.

Exit codes follow sysexits: 64 usage, 69 no daemon, 75 busy, 77 not the
holder. ``run`` passes the command's exit code through, reports a command
killed by signal N as 128+N, and forwards SIGINT, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    DEPLOYD,
    DaemonProcess,
    Workstation,
    process_running,
    stop_started_daemon,
    terminate,
    wait_until,
)

import deployd_client

DEPLOYD_COMMAND = f"{sys.executable} -m deployd_client"


@pytest.fixture
def shell() -> Iterator[subprocess.Popen[bytes]]:
    """Return a stand-in for the calling shell that leases bind to; it exits when stdin closes."""
    process = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(30)
        finally:
            terminate(process)


def held_lease(workstation: Workstation, lock: str) -> dict[str, Any] | None:
    """Return the live lease on ``lock`` from ``status``, or None when it is free."""
    response = workstation.request("status")
    assert response["ok"], response
    for state in response["result"]["locks"]:
        if state["lock"] == lock and state["held"]:
            lease: dict[str, Any] = state["lease"]
            return lease
    return None


def is_free(workstation: Workstation, lock: str) -> bool:
    return held_lease(workstation, lock) is None


def one_line(stderr: str) -> str:
    """Return the only line of ``stderr``; fail if there are more or none."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- usage errors (64): rejected before any daemon is asked ---

USAGE_ERRORS = [
    pytest.param(["run", "api"], "after '--'", id="run-without-command"),
    pytest.param(["run", "api", "--"], "after '--'", id="run-with-empty-command"),
    pytest.param(
        ["run", "api", "echo", "hi"], "put the command after '--'", id="run-without-dashes"
    ),
    pytest.param(["status", "--bogus"], "unknown option --bogus", id="unknown-option"),
    pytest.param(
        ["acquire", "api", "--bogus"],
        "unknown option --bogus",
        id="unknown-acquire-option",
    ),
    pytest.param(["launch"], "unknown command 'launch'", id="unknown-command"),
    pytest.param([], "missing COMMAND", id="no-command"),
    pytest.param(
        ["run", "api", "--force", "--", "true"],
        "--force needs --reason",
        id="run-force-without-reason",
    ),
    pytest.param(
        ["acquire", "api", "--force"], "--force needs --reason", id="acquire-force-without-reason"
    ),
    pytest.param(
        ["acquire", "api", "--", "true"], "only go with 'deployd run'", id="acquire-with-command"
    ),
    pytest.param(
        ["acquire", "api", "--format", "yaml"],
        "must be one of text, json, env",
        id="unknown-format",
    ),
    pytest.param(
        ["acquire", "api", "--wait", "-1"], "--wait must not be negative", id="negative-wait"
    ),
    pytest.param(
        ["acquire", "api", "--wait", "soon"], "invalid duration 'soon'", id="unparsable-wait"
    ),
    pytest.param(["acquire", "api", "--pid", "0"], "--pid must name the process", id="pid-zero"),
    pytest.param(["acquire", "api", "--pid", "1"], "greater than 1", id="pid-init"),
    pytest.param(["acquire", "api", "--pid", "1_0"], "must be a whole number", id="pid-underscore"),
    pytest.param(["run", "api", "--grace", "-3", "--", "true"], "--grace", id="negative-grace"),
    pytest.param(
        ["release", "api", "--exit-code", "300"],
        "--exit-code must be between 0 and 255",
        id="exit-code-too-big",
    ),
    pytest.param(["release"], "set DEPLOYD_LEASE_ID", id="release-without-target"),
    pytest.param(["release", "prod/api"], "invalid lock name 'prod/api'", id="release-bad-name"),
    pytest.param(
        ["run", "api", "--on-lost", "ignore", "--", "true"],
        "must be one of terminate, interrupt, warn",
        id="unknown-on-lost",
    ),
]


@pytest.mark.parametrize(("arguments", "message"), USAGE_ERRORS)
def test_usage_error_exits_64(workstation: Workstation, arguments: list[str], message: str) -> None:
    # No daemon runs: a command that got as far as connecting would exit 69.
    result = workstation.deployd(*arguments)
    assert result.returncode == 64, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("deployd: ")
    assert message in line


@pytest.mark.parametrize(
    ("arguments", "help_command"),
    [
        pytest.param(["--bogus"], "'deployd --help'", id="top-level"),
        pytest.param(
            ["acquire", "api", "--ttl", "soon"], "'deployd acquire --help'", id="subcommand"
        ),
    ],
)
def test_usage_error_names_help(
    workstation: Workstation, arguments: list[str], help_command: str
) -> None:
    """Regression: top-level errors used to point at 'deployd deployd --help'."""
    result = workstation.deployd(*arguments)
    assert result.returncode == 64, result.stderr
    assert f"(see {help_command})" in result.stderr


def test_version_printed(workstation: Workstation) -> None:
    result = workstation.deployd("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"deployd {deployd_client.__version__}"


# --- no daemon (69) ---


def test_no_daemon_exits_69(workstation: Workstation) -> None:
    result = workstation.deployd("status")
    assert result.returncode == 69, result.stderr
    line = one_line(result.stderr)
    assert str(workstation.socket) in line
    assert "DEPLOYD_NO_AUTOSTART is set" in line
    assert "deployd serve" in line
    assert not workstation.socket.exists(), "a daemon was started despite DEPLOYD_NO_AUTOSTART"


def test_run_without_daemon_skips_command(workstation: Workstation, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = workstation.deployd("run", "api", "--", "touch", str(marker))
    assert result.returncode == 69, result.stderr
    assert not marker.exists(), "the command ran without the lock"


# --- busy (75) ---


def test_busy_lock_names_holder(
    workstation: Workstation, daemon: DaemonProcess, shell: subprocess.Popen[bytes]
) -> None:
    acquired = workstation.deployd(
        "acquire", "api", "--reason", "hotfix 12", "--commit", "abc1234", "--pid", str(shell.pid)
    )
    assert acquired.returncode == 0, acquired.stderr
    lease = held_lease(workstation, "api")
    assert lease is not None

    result = workstation.deployd("acquire", "api")

    assert result.returncode == 75, result.stderr
    line = one_line(result.stderr)
    assert f"locked by {lease['owner']['user']} on {lease['owner']['host']}" in line
    assert " since " in line
    assert "'hotfix 12'" in line
    assert "abc1234" in line
    assert lease["session_id"] in line
    assert "--wait" in line, "the message should say what to do next"


def test_busy_run_skips_command(
    workstation: Workstation,
    daemon: DaemonProcess,
    shell: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    acquired = workstation.deployd("acquire", "api", "--pid", str(shell.pid))
    assert acquired.returncode == 0, acquired.stderr
    marker = tmp_path / "ran"

    result = workstation.deployd("run", "api", "--", "touch", str(marker))

    assert result.returncode == 75, result.stderr
    assert "api is locked by" in result.stderr
    assert not marker.exists(), "the command ran while another holder had the lock"


# --- acquire output formats ---


def test_acquire_prints_text(
    workstation: Workstation, daemon: DaemonProcess, shell: subprocess.Popen[bytes]
) -> None:
    result = workstation.deployd("acquire", "api", "--pid", str(shell.pid))
    assert result.returncode == 0, result.stderr
    lease = held_lease(workstation, "api")
    assert lease is not None
    # The lease id handed to the holder is the session id, "+" and a secret key.
    text = result.stdout.strip()
    assert text.startswith(f"acquired api: lease {lease['session_id']}+"), text
    assert text.endswith(f", fencing token {lease['token']}, TTL 30s"), text


def test_acquire_prints_json(
    workstation: Workstation, daemon: DaemonProcess, shell: subprocess.Popen[bytes]
) -> None:
    result = workstation.deployd(
        "acquire", "prod:api", "--pid", str(shell.pid), "--ttl", "45s", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    lease = held_lease(workstation, "prod:api")
    assert lease is not None
    assert printed["lock"] == "prod:api"
    assert printed["session_id"] == lease["session_id"]
    assert printed["token"] == lease["token"]
    assert printed["timings"]["ttl"] == 45
    assert printed["lease"]["owner"]["pid"] == shell.pid


def test_acquire_env_output_evaluates(
    workstation: Workstation, daemon: DaemonProcess, tmp_path: Path
) -> None:
    seen = tmp_path / "seen.json"
    script = f"""
set -euo pipefail
eval "$({DEPLOYD_COMMAND} acquire prod:api --format env)"
{DEPLOYD_COMMAND} status --json > {seen}
printf '%s\\n' "$DEPLOYD_LEASE_ID" "$DEPLOYD_LOCK" "$DEPLOYD_FENCING_TOKEN"
"""
    result = subprocess.run(
        ["bash", "-c", script],
        env=workstation.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    lease_id, lock, token = result.stdout.splitlines()
    status = json.loads(seen.read_text())
    leases = [state["lease"] for state in status["locks"] if state["held"]]
    assert len(leases) == 1, leases
    # DEPLOYD_LEASE_ID is the session id, "+" and the key that only the holder gets.
    session_id, _, key = lease_id.rpartition("+")
    assert session_id == leases[0]["session_id"]
    assert key
    assert lock == "prod:api"
    assert token == str(leases[0]["token"])
    # The lease was bound to the bash that evaluated the output, which has exited.
    wait_until(lambda: is_free(workstation, "prod:api"))


# --- release ---


def test_release_by_lease_id(
    workstation: Workstation, daemon: DaemonProcess, shell: subprocess.Popen[bytes]
) -> None:
    acquired = workstation.deployd("acquire", "api", "--pid", str(shell.pid), "--format", "json")
    assert acquired.returncode == 0, acquired.stderr
    lease_id = json.loads(acquired.stdout)["lease_id"]

    result = workstation.deployd("release", lease_id, "--exit-code", "0")

    assert result.returncode == 0, result.stderr
    assert "released api" in result.stderr
    assert is_free(workstation, "api")


def test_release_by_env_lease_id(
    workstation: Workstation, daemon: DaemonProcess, shell: subprocess.Popen[bytes]
) -> None:
    acquired = workstation.deployd("acquire", "api", "--pid", str(shell.pid), "--format", "json")
    assert acquired.returncode == 0, acquired.stderr
    lease_id = json.loads(acquired.stdout)["lease_id"]

    result = workstation.deployd("release", env=workstation.env(DEPLOYD_LEASE_ID=lease_id))

    assert result.returncode == 0, result.stderr
    assert "released api" in result.stderr
    assert is_free(workstation, "api")


@pytest.mark.parametrize(
    "acquire_line",
    [
        pytest.param(f'eval "$({DEPLOYD_COMMAND} acquire api --format env)"', id="with-env"),
        pytest.param(f"{DEPLOYD_COMMAND} acquire api > /dev/null", id="by-process-lineage"),
    ],
)
def test_release_by_lock_from_same_shell(
    workstation: Workstation, daemon: DaemonProcess, tmp_path: Path, acquire_line: str
) -> None:
    after_release = tmp_path / "after-release.json"
    script = f"""
set -euo pipefail
{acquire_line}
{DEPLOYD_COMMAND} release api
{DEPLOYD_COMMAND} status --json > {after_release}
"""
    result = subprocess.run(
        ["bash", "-c", script],
        env=workstation.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "released api" in result.stderr
    status = json.loads(after_release.read_text())
    assert [state["lock"] for state in status["locks"] if state["held"]] == []


def test_release_of_free_lock_succeeds(workstation: Workstation, daemon: DaemonProcess) -> None:
    result = workstation.deployd("release", "api")
    assert result.returncode == 0, result.stderr
    assert one_line(result.stderr) == "deployd: api was not held; nothing to release"


def test_release_of_ended_lease_succeeds(
    workstation: Workstation, daemon: DaemonProcess, tmp_path: Path
) -> None:
    lease_file = tmp_path / "lease-id"
    script = f'echo "$DEPLOYD_LEASE_ID" > {lease_file}'
    acquired = workstation.deployd("run", "api", "--", "sh", "-c", script)
    assert acquired.returncode == 0, acquired.stderr
    ended = lease_file.read_text().strip()

    result = workstation.deployd("release", ended)

    assert result.returncode == 0, result.stderr
    session_id = ended.rpartition("+")[0]
    assert f"lease {session_id} on api had already ended" in result.stderr


def test_release_of_unknown_lease_exits_77(workstation: Workstation, daemon: DaemonProcess) -> None:
    lease_id = "someone@elsewhere_20260101T000000Z_abcdef"
    result = workstation.deployd("release", lease_id)
    assert result.returncode == 77, result.stderr
    assert lease_id in one_line(result.stderr)


def test_release_by_other_process_exits_77(
    workstation: Workstation, daemon: DaemonProcess, shell: subprocess.Popen[bytes]
) -> None:
    acquired = workstation.deployd("acquire", "api", "--pid", str(shell.pid))
    assert acquired.returncode == 0, acquired.stderr
    lease = held_lease(workstation, "api")
    assert lease is not None

    result = workstation.deployd("release", "api")

    assert result.returncode == 77, result.stderr
    line = one_line(result.stderr)
    assert f"api is held by {lease['owner']['user']} on {lease['owner']['host']}" in line
    assert f"pid {shell.pid}" in line
    untouched = held_lease(workstation, "api")
    assert untouched is not None, "the rejected release freed the lock"
    assert untouched["session_id"] == lease["session_id"]
    assert untouched["token"] == lease["token"]


# --- run ---


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_run_passes_exit_code(workstation: Workstation, daemon: DaemonProcess, code: int) -> None:
    result = workstation.deployd("run", "api", "--", "sh", "-c", f"exit {code}")
    assert result.returncode == code, result.stderr
    assert is_free(workstation, "api")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_run_reports_signal_death(
    workstation: Workstation, daemon: DaemonProcess, signum: signal.Signals
) -> None:
    result = workstation.deployd("run", "api", "--", "sh", "-c", f"kill -{signum.name[3:]} $$")
    assert result.returncode == 128 + signum, result.stderr
    assert is_free(workstation, "api")


def test_run_command_not_found(workstation: Workstation, daemon: DaemonProcess) -> None:
    result = workstation.deployd("run", "api", "--", "no-such-command-for-deployd")
    assert result.returncode == 127, result.stderr
    assert "command not found: no-such-command-for-deployd" in result.stderr
    assert is_free(workstation, "api")


def test_run_command_not_executable(
    workstation: Workstation, daemon: DaemonProcess, tmp_path: Path
) -> None:
    script = tmp_path / "deploy.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = workstation.deployd("run", "api", "--", str(script))
    assert result.returncode == 126, result.stderr
    assert str(script) in result.stderr
    assert is_free(workstation, "api")


def test_run_sets_lease_environment(
    workstation: Workstation, daemon: DaemonProcess, tmp_path: Path
) -> None:
    seen = tmp_path / "env"
    status_file = tmp_path / "status.json"
    script = (
        f'printf "%s\\n" "$DEPLOYD_LEASE_ID" "$DEPLOYD_LOCK" "$DEPLOYD_FENCING_TOKEN" > {seen}'
        f" && {DEPLOYD_COMMAND} status --json > {status_file}"
    )
    result = workstation.deployd("run", "api", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lease_id, lock, token = seen.read_text().splitlines()
    [state] = json.loads(status_file.read_text())["locks"]
    assert lease_id.rpartition("+")[0] == state["lease"]["session_id"]
    assert lock == "api"
    assert token == str(state["lease"]["token"])


FORWARDED = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
# Runs the command in argv[1:] with SIGINT and SIGQUIT at their default action.
# pytest started as a background job of a script inherits both ignored, and
# `deployd run` passes ignored signals on to its command, as a shell does.
WITH_DEFAULT_SIGNALS = [
    sys.executable,
    "-c",
    "import os, signal, sys\n"
    "for signum in (signal.SIGINT, signal.SIGQUIT):\n"
    "    signal.signal(signum, signal.SIG_DFL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])",
]


@pytest.mark.parametrize("signum", FORWARDED, ids=[signum.name for signum in FORWARDED])
def test_run_forwards_signal(
    workstation: Workstation, daemon: DaemonProcess, tmp_path: Path, signum: signal.Signals
) -> None:
    ready = tmp_path / "ready"
    marker = tmp_path / "caught"
    # A background job of a non-interactive shell ignores SIGINT, so the trap
    # stops the sleep itself.
    script = f"""
caught() {{ echo "$1" > {marker}; kill "$sleeper" 2>/dev/null; exit 42; }}
trap 'caught TERM' TERM
trap 'caught INT' INT
trap 'caught HUP' HUP
sleep 600 &
sleeper=$!
touch {ready}
wait "$sleeper"
"""
    client = subprocess.Popen(
        [*WITH_DEFAULT_SIGNALS, *DEPLOYD, "run", "api", "--", "bash", "-c", script],
        env=workstation.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(ready.exists)
        client.send_signal(signum)
        _, stderr = client.communicate(timeout=30)
    finally:
        terminate(client)

    assert client.returncode == 42, stderr
    assert marker.read_text().strip() == signum.name[3:]
    assert is_free(workstation, "api")


# --- autostart ---


def test_autostart_starts_daemon(workstation: Workstation) -> None:
    env = workstation.env()
    del env["DEPLOYD_NO_AUTOSTART"]
    daemon_pid = None
    try:
        first = workstation.deployd("status", "--json", env=env)
        assert first.returncode == 0, first.stderr
        daemon_pid = json.loads(first.stdout)["daemon"]["pid"]
        assert process_running(daemon_pid)
        assert workstation.socket.exists()
        assert (workstation.state_dir / "deployd.log").exists()

        second = workstation.deployd("status", "--json", env=env)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["daemon"]["pid"] == daemon_pid, "a second daemon started"
    finally:
        stop_started_daemon(workstation, daemon_pid)
    assert not workstation.socket.exists(), "the stopped daemon left its socket file"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")
def test_autostart_drops_lease_variables(workstation: Workstation) -> None:
    """A daemon started from inside a deploy does not inherit that deploy's lease."""
    env = workstation.env()
    del env["DEPLOYD_NO_AUTOSTART"]
    env.update(
        DEPLOYD_LEASE_ID="dpl_x+k",
        DEPLOYD_FENCING_TOKEN="7",
        DEPLOYD_LEASE_DEPTH="1",
        DEPLOYD_LOCK="api",
        DEPLOYD_KEEP_ME="yes",
    )
    daemon_pid = None
    try:
        result = workstation.deployd("status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        daemon_pid = json.loads(result.stdout)["daemon"]["pid"]
        raw = Path(f"/proc/{daemon_pid}/environ").read_bytes()
        names = {entry.split(b"=", 1)[0].decode() for entry in raw.split(b"\0") if entry}
    finally:
        stop_started_daemon(workstation, daemon_pid)
    assert "DEPLOYD_LEASE_ID" not in names
    assert "DEPLOYD_FENCING_TOKEN" not in names
    assert "DEPLOYD_LEASE_DEPTH" not in names
    assert "DEPLOYD_LOCK" not in names
    assert "DEPLOYD_KEEP_ME" in names
