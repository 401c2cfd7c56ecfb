"""Bad input to a real daemon, over the raw protocol and through the ``deployd`` command.

Every test keeps a second connection (the bystander) open across the bad input
and checks afterwards that it still gets responses and that a new connection
can say ``hello``: bad input gets an error response and never affects other clients.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProcess, RawConnection, Workstation, raw_connection, wait_until

from deployd_client.names import LOCK_NAME_RULE

MAX_LINE = 64 * 1024
# The daemon's limit on requests in flight on one connection (server.Limits).
MAX_REQUESTS_IN_FLIGHT = 32
# Lines and lengths for the memory check of an over-long line, in bytes.
LONG_LINE_BYTES = 32 * 1024 * 1024
LONG_LINE_CHUNK = 1024 * 1024


@pytest.fixture
def bystander(workstation: Workstation, daemon: DaemonProcess) -> Iterator[RawConnection]:
    """Return a connection that is open before the bad input and stays open across it."""
    with raw_connection(workstation.socket) as connection:
        assert connection.call("hello")["ok"]
        yield connection


def assert_still_serves(workstation: Workstation, bystander: RawConnection) -> None:
    """Check that the bystander still gets responses and that a new client can say hello."""
    assert bystander.call("hello")["ok"], "the open bystander connection got no answer"
    assert workstation.request("hello")["ok"], "a new connection got no answer"


def lock_states(workstation: Workstation) -> list[dict[str, Any]]:
    """Return the ``locks`` of ``status``."""
    response = workstation.request("status")
    assert response["ok"], response
    locks: list[dict[str, Any]] = response["result"]["locks"]
    return locks


def held_lease(workstation: Workstation, lock: str) -> dict[str, Any] | None:
    """Return the live lease on ``lock`` from ``status``, or None when it is free."""
    for state in lock_states(workstation):
        if state["lock"] == lock and state["held"]:
            lease: dict[str, Any] = state["lease"]
            return lease
    return None


def error_of(response: dict[str, Any]) -> dict[str, Any]:
    """Return the error object of an error response; fail on a success."""
    assert response["ok"] is False, response
    error: dict[str, Any] = response["error"]
    return error


# --- the envelope: JSON, shape, version, op ---

BAD_LINES = [
    pytest.param(b"{not json\n", "bad_request", "malformed JSON", id="malformed-json"),
    pytest.param(
        b'{"v": 1, "id": 5, "op": "hello"\n', "bad_request", "malformed JSON", id="unclosed-object"
    ),
    pytest.param(b"[]\n", "bad_request", "must be a JSON object", id="array"),
    pytest.param(b'"x"\n', "bad_request", "must be a JSON object", id="string"),
    pytest.param(b"42\n", "bad_request", "must be a JSON object", id="number"),
    pytest.param(b"null\n", "bad_request", "must be a JSON object", id="null"),
    pytest.param(
        b'{"v": 1, "id": 5, "op": "hello", "reason": "\xc3\x28"}\n',
        "bad_request",
        "malformed JSON",
        id="invalid-utf8-in-string",
    ),
    pytest.param(b"\xff\xfe\xfd\n", "bad_request", "malformed JSON", id="invalid-utf8-bytes"),
    pytest.param(
        b'{"id": 5, "op": "hello"}\n', "unsupported_version", "v=None", id="missing-version"
    ),
    pytest.param(
        b'{"v": 2, "id": 5, "op": "hello"}\n', "unsupported_version", "v=2", id="version-2"
    ),
    pytest.param(
        b'{"v": "1", "id": 5, "op": "hello"}\n',
        "unsupported_version",
        "v='1'",
        id="version-as-string",
    ),
    pytest.param(
        b'{"v": true, "id": 5, "op": "hello"}\n',
        "unsupported_version",
        "v=True",
        id="version-as-boolean",
    ),
    pytest.param(b'{"v": 1, "id": 5}\n', "bad_request", "op must be", id="missing-op"),
    pytest.param(b'{"v": 1, "id": 5, "op": 7}\n', "bad_request", "op must be", id="op-as-number"),
    pytest.param(
        b'{"v": 1, "id": [5], "op": "hello"}\n', "bad_request", "id must be", id="id-as-array"
    ),
]


@pytest.mark.parametrize(("line", "code", "message"), BAD_LINES)
def test_bad_line_gets_error(
    workstation: Workstation, bystander: RawConnection, line: bytes, code: str, message: str
) -> None:
    with raw_connection(workstation.socket) as connection:
        connection.send_bytes(line)
        error = error_of(connection.read())
        assert error["code"] == code
        assert message in error["message"]

        # The same connection still takes the next proper line.
        follow_up = connection.call("hello")
        assert follow_up["ok"], follow_up

    assert_still_serves(workstation, bystander)


def test_error_echoes_request_id(workstation: Workstation, bystander: RawConnection) -> None:
    with raw_connection(workstation.socket) as connection:
        connection.send_bytes(b'{"v": 9, "id": "req-17", "op": "hello"}\n')
        response = connection.read()
    assert response["id"] == "req-17"
    assert error_of(response)["code"] == "unsupported_version"
    assert_still_serves(workstation, bystander)


def test_unknown_op_gets_error(workstation: Workstation, bystander: RawConnection) -> None:
    with raw_connection(workstation.socket) as connection:
        request_id = connection.send("launch_missiles", lock="api")
        response = connection.response(request_id)
        error = error_of(response)
        assert error["code"] == "unknown_op"
        assert "'launch_missiles'" in error["message"]
        assert "hello" in error["message"], "the error should list the known ops"
        assert connection.call("hello")["ok"]
    assert_still_serves(workstation, bystander)


def test_blank_lines_are_ignored(workstation: Workstation, bystander: RawConnection) -> None:
    with raw_connection(workstation.socket) as connection:
        connection.send_bytes(b"\n  \n\r\n")
        response = connection.call("hello")
    assert response["ok"], response
    assert response["id"] == 1, "a blank line got a response of its own"
    assert_still_serves(workstation, bystander)


# --- the line limit ---


def test_one_mebibyte_line_is_skipped(workstation: Workstation, bystander: RawConnection) -> None:
    padding = "x" * (1024 * 1024)
    line = json.dumps({"v": 1, "id": 1, "op": "hello", "padding": padding}).encode() + b"\n"
    with raw_connection(workstation.socket) as connection:
        connection.send_bytes(line)
        error = error_of(connection.read())
        assert error["code"] == "line_too_long"
        assert str(MAX_LINE) in error["message"]

        # The same connection takes the next proper line and responds to it alone.
        connection.next_id = 1
        follow_up = connection.call("hello")
        assert follow_up["ok"], follow_up
        assert follow_up["id"] == 2

    assert_still_serves(workstation, bystander)


def test_line_at_limit_is_accepted(workstation: Workstation, bystander: RawConnection) -> None:
    prefix = b'{"v": 1, "id": 1, "op": "hello", "padding": "'
    suffix = b'"}'
    line = prefix + b"x" * (MAX_LINE - len(prefix) - len(suffix)) + suffix
    assert len(line) == MAX_LINE
    with raw_connection(workstation.socket) as connection:
        connection.send_bytes(line + b"\n")
        response = connection.read()
    assert response["ok"], response
    assert_still_serves(workstation, bystander)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_long_line_is_not_buffered(
    workstation: Workstation, daemon: DaemonProcess, bystander: RawConnection
) -> None:
    """Regression: the rest of an over-long line used to pile up in memory until its newline."""
    peak_before = peak_memory_bytes(daemon.pid)
    chunk = b"x" * LONG_LINE_CHUNK
    with raw_connection(workstation.socket) as connection:
        for _ in range(LONG_LINE_BYTES // LONG_LINE_CHUNK):
            connection.send_bytes(chunk)
        connection.send_bytes(b"\n")
        assert error_of(connection.read())["code"] == "line_too_long"
        assert connection.call("hello")["ok"]
    growth = peak_memory_bytes(daemon.pid) - peak_before
    assert growth < LONG_LINE_BYTES // 2, f"peak memory grew by {growth} bytes"
    assert_still_serves(workstation, bystander)


def peak_memory_bytes(pid: int) -> int:
    """Return the peak resident set size (VmHWM) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            kibibytes = int(line.split()[1])
            return kibibytes * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_half_line_is_closed_after_timeout(
    make_workstation: Callable[..., Workstation], start: Callable[..., DaemonProcess]
) -> None:
    workstation = make_workstation(server={"half_line_timeout": "0.3s"})
    start(workstation)
    with (
        raw_connection(workstation.socket) as bystander,
        raw_connection(workstation.socket) as stalled,
    ):
        assert bystander.call("hello")["ok"]
        stalled.send_bytes(b'{"v": 1, "id": 1, "op": "hel')

        error = error_of(stalled.read())
        assert error["code"] == "bad_request"
        assert "without a newline" in error["message"]
        with pytest.raises(EOFError):
            stalled.read()

        assert_still_serves(workstation, bystander)


def test_half_line_timeout_is_validated(make_workstation: Callable[..., Workstation]) -> None:
    workstation = make_workstation(server={"half_line_timeout": "0s"})
    result = workstation.deployd("serve", timeout=30)
    assert result.returncode == 78, result.stderr
    assert "server.half_line_timeout" in result.stderr


# --- field types and values ---

WRONG_FIELDS = [
    pytest.param(
        "acquire", {"lock": 5, "pid": 1}, "lock name must be a string", id="lock-as-number"
    ),
    pytest.param(
        "acquire", {"lock": ["api"], "pid": 1}, "lock name must be a string", id="lock-as-list"
    ),
    pytest.param("acquire", {"pid": 1}, "missing field 'lock'", id="lock-missing"),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "ttl": "30s"},
        "ttl must be a number",
        id="ttl-as-string",
    ),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "ttl": True},
        "ttl must be a number",
        id="ttl-as-boolean",
    ),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "wait": [1]},
        "wait must be a number",
        id="wait-as-list",
    ),
    pytest.param(
        "acquire", {"lock": "api", "pid": 1, "wait": -1}, "wait must be between", id="wait-negative"
    ),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "force": "yes"},
        "force must be true or false",
        id="force-as-string",
    ),
    pytest.param(
        "acquire", {"lock": "api", "pid": 1.5}, "pid must be an integer", id="pid-as-float"
    ),
    pytest.param(
        "acquire", {"lock": "api", "pid": "1"}, "pid must be an integer", id="pid-as-string"
    ),
    pytest.param("acquire", {"lock": "api", "pid": 0}, "pid must be at least 1", id="pid-zero"),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "reason": 7},
        "reason must be a string",
        id="reason-as-number",
    ),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "reason": "a\nb"},
        "control characters",
        id="reason-with-newline",
    ),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "commit": {}},
        "commit must be a string",
        id="commit-as-object",
    ),
    pytest.param(
        "acquire",
        {"lock": "api", "pid": 1, "force": True},
        "force_reason",
        id="force-without-reason",
    ),
    pytest.param("hold", {"lock": "api", "ttl": 0}, "ttl must be between", id="hold-ttl-zero"),
    pytest.param(
        "acquire", {"lock": "api", "pid": 1, "ttl": 0}, "ttl must be between", id="ttl-zero"
    ),
    pytest.param(
        "acquire", {"lock": "api", "pid": 1, "ttl": -5}, "ttl must be between", id="ttl-negative"
    ),
    pytest.param("release", {"lock": 5}, "lock name must be a string", id="release-lock-as-number"),
    pytest.param(
        "release", {"lease_id": 5}, "lease_id must be a string", id="release-lease-as-number"
    ),
    pytest.param("release", {}, "give lease_id or lock", id="release-without-target"),
    pytest.param(
        "release",
        {"lock": "api", "exit_code": "0"},
        "exit_code must be an integer",
        id="exit-code-as-string",
    ),
    pytest.param(
        "release",
        {"lock": "api", "exit_code": 256},
        "exit_code must be at most 255",
        id="exit-code-too-big",
    ),
]


@pytest.mark.parametrize(("op", "fields", "message"), WRONG_FIELDS)
def test_wrong_field_is_rejected(
    workstation: Workstation,
    bystander: RawConnection,
    op: str,
    fields: dict[str, Any],
    message: str,
) -> None:
    with raw_connection(workstation.socket) as connection:
        error = error_of(connection.call(op, **fields))
    assert error["code"] == "invalid_argument"
    assert message in error["message"]
    assert held_lease(workstation, "api") is None, "a rejected request took the lock"
    assert_still_serves(workstation, bystander)


# --- lock names ---

BAD_LOCK_NAMES = [
    pytest.param("prod/api", id="slash"),
    pytest.param("..", id="dot-dot"),
    pytest.param("../etc", id="parent-path"),
    pytest.param("my api", id="space"),
    pytest.param("", id="empty"),
    pytest.param("api;drop", id="semicolon"),
]
# On the command line a leading dash makes the name an option, so only the
# protocol test can send it.
LEADING_DASH_NAME = pytest.param("-api", id="leading-dash")
TOO_LONG_NAME = "a" * 200


@pytest.mark.parametrize("name", [*BAD_LOCK_NAMES, LEADING_DASH_NAME])
def test_bad_lock_name_rejected_by_daemon(
    workstation: Workstation, bystander: RawConnection, name: str
) -> None:
    with raw_connection(workstation.socket) as connection:
        error = error_of(connection.call("acquire", lock=name, pid=1))
    assert error["code"] == "invalid_argument"
    assert repr(name) in error["message"]
    assert LOCK_NAME_RULE in error["message"]
    assert lock_states(workstation) == [], "a rejected name reached the store"
    assert_still_serves(workstation, bystander)


def test_long_lock_name_rejected_by_daemon(
    workstation: Workstation, bystander: RawConnection
) -> None:
    with raw_connection(workstation.socket) as connection:
        error = error_of(connection.call("acquire", lock=TOO_LONG_NAME, pid=1))
    assert error["code"] == "invalid_argument"
    assert TOO_LONG_NAME[:20] in error["message"]
    assert "200 characters" in error["message"]
    assert LOCK_NAME_RULE in error["message"]
    assert lock_states(workstation) == []
    assert_still_serves(workstation, bystander)


@pytest.mark.parametrize("command", ["acquire", "run"])
@pytest.mark.parametrize("name", BAD_LOCK_NAMES)
def test_bad_lock_name_rejected_by_cli(
    workstation: Workstation, bystander: RawConnection, command: str, name: str
) -> None:
    trailer = ["--", "true"] if command == "run" else []
    result = workstation.deployd(command, name, *trailer)
    assert result.returncode == 64, result.stderr
    assert repr(name) in result.stderr
    assert LOCK_NAME_RULE in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert_still_serves(workstation, bystander)


def test_long_lock_name_rejected_by_cli(workstation: Workstation, bystander: RawConnection) -> None:
    result = workstation.deployd("acquire", TOO_LONG_NAME)
    assert result.returncode == 64, result.stderr
    assert TOO_LONG_NAME[:20] in result.stderr
    assert LOCK_NAME_RULE in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert_still_serves(workstation, bystander)


# --- TTL and reason on the command line ---


@pytest.mark.parametrize("ttl", ["0", "0s", "-5", "-5s", "-1m"])
def test_bad_ttl_rejected_by_cli(
    workstation: Workstation, bystander: RawConnection, ttl: str
) -> None:
    result = workstation.deployd("acquire", "api", f"--ttl={ttl}")
    assert result.returncode == 64, result.stderr
    assert "--ttl" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert held_lease(workstation, "api") is None
    assert_still_serves(workstation, bystander)


def test_bad_ttl_as_separate_word(workstation: Workstation, bystander: RawConnection) -> None:
    result = workstation.deployd("run", "api", "--ttl", "-5", "--", "true")
    assert result.returncode == 64, result.stderr
    assert "--ttl" in result.stderr
    assert_still_serves(workstation, bystander)


# "--" alone is not among them: it ends the options on every command line.
@pytest.mark.parametrize("reason", ["-rollback", "--dry", "-", "--dry-run=yes", "-x --force"])
def test_reason_with_leading_dash_kept(
    workstation: Workstation, bystander: RawConnection, reason: str
) -> None:
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE) as shell:
        try:
            result = workstation.deployd(
                "acquire", "api", "--reason", reason, "--pid", str(shell.pid), "--format", "json"
            )
            assert result.returncode == 0, result.stderr
            lease = held_lease(workstation, "api")
            assert lease is not None
            assert lease["purpose"]["reason"] == reason
            assert lease["owner"]["pid"] == shell.pid
        finally:
            assert shell.stdin is not None
            shell.stdin.close()
            shell.wait(30)
    wait_until(lambda: held_lease(workstation, "api") is None)
    assert_still_serves(workstation, bystander)


def test_reason_with_leading_dash_kept_by_run(
    workstation: Workstation, bystander: RawConnection, tmp_path: Path
) -> None:
    status_file = tmp_path / "status.json"
    script = f"{sys.executable} -m deployd_client status --json > {status_file}"
    result = workstation.deployd(
        "run", "api", "--reason", "--dry", "--commit", "-abc", "--", "sh", "-c", script
    )
    assert result.returncode == 0, result.stderr
    locks = json.loads(status_file.read_text())["locks"]
    purposes = [state["lease"]["purpose"] for state in locks if state["lock"] == "api"]
    assert purposes == [{"commit": "-abc", "reason": "--dry"}]
    assert_still_serves(workstation, bystander)


# --- release by someone who is not the holder ---


def test_release_by_other_shell_rejected(
    workstation: Workstation, bystander: RawConnection, tmp_path: Path
) -> None:
    ready = tmp_path / "acquired"
    holder_script = (
        f'eval "$({sys.executable} -m deployd_client acquire api --reason deploy-7 --format env)"'
        f" && touch {ready} && read line"
    )
    with subprocess.Popen(
        ["bash", "-c", holder_script], env=workstation.env(), stdin=subprocess.PIPE
    ) as holder:
        try:
            wait_until(ready.exists)
            lease_before = held_lease(workstation, "api")
            assert lease_before is not None
            assert lease_before["owner"]["pid"] == holder.pid

            result = workstation.deployd("release", "api")
            assert result.returncode == 77, result.stderr
            assert "api is held by" in result.stderr
            assert lease_before["owner"]["user"] in result.stderr
            assert f"pid {holder.pid}" in result.stderr
            assert lease_before["session_id"] in result.stderr
            assert len(result.stderr.splitlines()) == 1, result.stderr

            lease_after = held_lease(workstation, "api")
            assert lease_after is not None, "the rejected release freed the lock"
            assert lease_after["session_id"] == lease_before["session_id"]
            assert lease_after["token"] == lease_before["token"]
            assert lease_after["purpose"]["reason"] == "deploy-7"
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(30)
    wait_until(lambda: held_lease(workstation, "api") is None)
    assert_still_serves(workstation, bystander)


def test_release_over_protocol_by_stranger(
    workstation: Workstation, bystander: RawConnection
) -> None:
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE) as shell:
        try:
            with raw_connection(workstation.socket) as owner:
                granted = owner.call("acquire", lock="api", pid=shell.pid)
                assert granted["ok"], granted
            lease_id = granted["result"]["lease_id"]

            with raw_connection(workstation.socket) as stranger:
                error = error_of(stranger.call("release", lock="api"))
            assert error["code"] == "not_holder"
            session_id, _, key = lease_id.rpartition("+")
            assert session_id in error["message"]
            assert key not in error["message"], "an error must not reveal the lease key"

            lease = held_lease(workstation, "api")
            assert lease is not None
            assert lease["session_id"] == session_id
        finally:
            assert shell.stdin is not None
            shell.stdin.close()
            shell.wait(30)
    assert_still_serves(workstation, bystander)


# --- many requests on one connection ---


def test_many_requests_in_flight(workstation: Workstation, bystander: RawConnection) -> None:
    with raw_connection(workstation.socket) as connection:
        ops = ["hello", "status", "locks"]
        lines = b"".join(
            json.dumps({"v": 1, "id": number, "op": ops[number % len(ops)]}).encode() + b"\n"
            for number in range(1, MAX_REQUESTS_IN_FLIGHT + 1)
        )
        connection.send_bytes(lines)
        responses = [connection.read() for _ in range(MAX_REQUESTS_IN_FLIGHT)]

    assert sorted(response["id"] for response in responses) == list(
        range(1, MAX_REQUESTS_IN_FLIGHT + 1)
    )
    failed = [response for response in responses if not response["ok"]]
    assert failed == []
    assert_still_serves(workstation, bystander)


def test_status_answered_while_acquire_waits(
    workstation: Workstation, bystander: RawConnection
) -> None:
    with raw_connection(workstation.socket) as holder, raw_connection(workstation.socket) as waiter:
        assert holder.call("hold", lock="api")["ok"]

        hold_id = waiter.send("hold", lock="api", wait=60)
        status_id = waiter.send("status")
        while True:
            message = waiter.read()
            if "event" in message:
                continue
            assert message["id"] != hold_id, f"the waiting hold was answered: {message}"
            assert message["id"] == status_id
            assert message["ok"], message
            break

        holder.close()
        granted = waiter.response(hold_id)
        assert granted["ok"], granted
        assert granted["result"]["lock"] == "api"
    assert_still_serves(workstation, bystander)


def test_too_many_requests_in_flight(workstation: Workstation, bystander: RawConnection) -> None:
    with (
        raw_connection(workstation.socket) as holder,
        raw_connection(workstation.socket) as crowded,
    ):
        assert holder.call("hold", lock="api")["ok"]

        waits = b"".join(
            json.dumps({"v": 1, "id": number, "op": "hold", "lock": "api", "wait": 60}).encode()
            + b"\n"
            for number in range(1, MAX_REQUESTS_IN_FLIGHT + 1)
        )
        crowded.send_bytes(waits)
        crowded.next_id = MAX_REQUESTS_IN_FLIGHT
        response = crowded.call("hello")
        error = error_of(response)
        assert error["code"] == "bad_request"
        assert "too many requests in flight" in error["message"]

        # The crowded connection does not slow down the holder's.
        assert holder.call("status")["ok"]
    assert_still_serves(workstation, bystander)
