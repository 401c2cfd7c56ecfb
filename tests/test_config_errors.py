"""Config errors as people see them: masked secrets, every invalid key, the fix.

Covers ``deployd config check``, ``doctor``, a reload, and a daemon that
cannot start (its log and the client that started it). A ``deployd run``
re-attaches while the config is invalid, ``DEPLOYD_SOCKET`` is relative, and
the fixes that ``status`` and ``doctor`` print explain how to restart.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    DaemonProcess,
    Workstation,
    autostart_env,
    terminate,
    wait_until,
)
from slack_server import SlackServer

from deployd.notifiers.credentials import TOKEN_VARIABLES, WEBHOOK_VARIABLE

BOT_TOKEN = "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
SECRETS = {
    "bot token": BOT_TOKEN,
    "user token": "xoxp-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrSt",
    "app token": "xapp-1-A0123456789-1234567890123-0123456789abcdef0123456789abcdef",
    "legacy token": "xoxa-2-1234567890-AbCdEfGhIjKlMnOp",
    "webhook URL": "https://hooks.slack.com/services/T0000/B0000/AbCdEfGhIjKlMnOpQrStUvWx",
}
# The secret part of each, which must never be printed.
SECRET_PARTS = {
    "bot token": "AbCdEfGhIjKlMnOpQrStUvWx",
    "user token": "AbCdEfGhIjKlMnOpQrSt",
    "app token": "0123456789abcdef0123456789abcdef",
    "legacy token": "AbCdEfGhIjKlMnOp",
    "webhook URL": "AbCdEfGhIjKlMnOpQrStUvWx",
}


def started_log(workstation: Workstation) -> str:
    """Return the log of the daemons that clients started, or "" when none was."""
    log = workstation.state_dir / "deployd.log"
    return log.read_text(errors="replace") if log.exists() else ""


# --- secrets in config errors ---


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_secret_under_unknown_key_masked_at_autostart(
    workstation: Workstation, stop_started: None, kind: str
) -> None:
    workstation.config_file.write_text(f'[slack]\ntoken = "{SECRETS[kind]}"\n')

    result = workstation.deployd("status", env=autostart_env(workstation))

    assert result.returncode == 78, result.stderr
    assert "invalid slack.token = '[masked]'" in result.stderr
    assert SECRET_PARTS[kind] not in result.stderr
    assert SECRET_PARTS[kind] not in started_log(workstation)
    assert "invalid slack.token = '[masked]'" in started_log(workstation)


def test_unknown_token_key_names_where_tokens_go(workstation: Workstation) -> None:
    workstation.config_file.write_text(f'[slack]\ntoken = "{BOT_TOKEN}"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert "slack.token_file" in result.stderr
    for variable in TOKEN_VARIABLES:
        assert variable in result.stderr


def test_unknown_webhook_key_names_where_urls_go(workstation: Workstation) -> None:
    workstation.config_file.write_text(f'[slack]\nwebhook_url = "{SECRETS["webhook URL"]}"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert "slack.webhook_url_file" in result.stderr
    assert WEBHOOK_VARIABLE in result.stderr
    assert SECRET_PARTS["webhook URL"] not in result.stderr


def test_token_in_duration_masked_in_rule(workstation: Workstation) -> None:
    workstation.config_file.write_text(f'[lease]\nttl = "{BOT_TOKEN}"\n')

    check = workstation.deployd("config", "check")
    doctor = workstation.deployd("doctor")

    assert check.returncode == 78, check.stderr
    assert "invalid lease.ttl = '[masked]'" in check.stderr
    assert "invalid duration '[masked]'" in check.stderr
    assert SECRET_PARTS["bot token"] not in check.stderr
    assert doctor.returncode == 1, doctor.stdout
    assert "invalid duration '[masked]'" in doctor.stdout
    assert SECRET_PARTS["bot token"] not in doctor.stdout + doctor.stderr


def test_token_in_duration_masked_on_reload(
    workstation: Workstation, daemon: DaemonProcess
) -> None:
    offset = workstation.log_file.stat().st_size
    workstation.config_file.write_text(f'[lease]\nttl = "{BOT_TOKEN}"\n')

    reload = workstation.deployd("config", "reload")

    assert reload.returncode == 78, reload.stderr
    assert "invalid duration '[masked]'" in reload.stderr
    assert SECRET_PARTS["bot token"] not in reload.stderr
    wait_until(lambda: "rejected" in workstation.log_file.read_bytes()[offset:].decode())
    log = workstation.log_file.read_bytes()[offset:].decode()
    assert "invalid duration '[masked]'" in log
    assert SECRET_PARTS["bot token"] not in log


def test_random_secret_under_secret_key_masked(workstation: Workstation) -> None:
    secret = "8f14e45fceea167a5a36dedd4bea2543"
    workstation.config_file.write_text(f'[slack]\nclient_secret = "{secret}"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert "invalid slack.client_secret = '[masked]'" in result.stderr
    assert secret not in result.stderr


# --- every invalid key, as written ---


def test_check_reports_every_invalid_key(workstation: Workstation) -> None:
    workstation.config_file.write_text(
        'on_store_error = "maybe"\n\n[lease]\nttl = "0s"\n\n[log]\nlevel = "loud"\ncolour = 1\n'
    )

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    lines = result.stderr.splitlines()
    path = workstation.config_file
    assert lines == [
        f"deployd: invalid on_store_error = 'maybe' in {path}:1: must be one of open, closed",
        f"deployd: invalid lease.ttl = '0s' in {path}:4: must be longer than 0s",
        f"deployd: invalid log.level = 'loud' in {path}:7: must be one of debug, info, warning, "
        "error",
        f"deployd: invalid log.colour = 1 in {path}:8: unknown key; known keys here: "
        "log.level, log.file",
    ]


def test_relation_error_quotes_value_as_written(workstation: Workstation) -> None:
    workstation.config_file.write_text('[lease]\nrenew_every = "30s"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines() == [
        f"deployd: invalid lease.renew_every = '30s' in {workstation.config_file}:2: must be "
        "shorter than lease.ttl (30s), or the lease expires between renewals"
    ]


def test_check_counts_one_key(workstation: Workstation) -> None:
    workstation.config_file.write_text('[lease]\nttl = "20s"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 0, result.stderr
    assert "1 key set in the file" in result.stdout


SECTIONS = "[store], [lease], [slack], [log], [server]"
TOP_LEVEL_KEYS = "on_store_error, state_dir, clock_offset"


def test_section_key_at_top_level_names_section(workstation: Workstation) -> None:
    workstation.config_file.write_text('ttl = "15s"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines() == [
        f"deployd: invalid ttl = '15s' in {workstation.config_file}:1: unknown key; did you "
        f"mean ttl under [lease] (lease.ttl)? Known keys here: {TOP_LEVEL_KEYS}, and the "
        f"sections {SECTIONS}"
    ]


def test_unknown_section_suggests_section(workstation: Workstation) -> None:
    workstation.config_file.write_text('on_store_error = "open"\n\n[leases]\nttl = "15s"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines() == [
        f"deployd: invalid leases = a table in {workstation.config_file}:3: unknown section; "
        f"did you mean [lease]? The sections are {SECTIONS}, and the top-level keys "
        f"{TOP_LEVEL_KEYS}"
    ]


def test_unknown_section_named_by_its_keys(workstation: Workstation) -> None:
    workstation.config_file.write_text('[lock]\nttl = "15s"\nmax_hold = "1h"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert "unknown section; did you mean [lease]?" in result.stderr


def test_unknown_section_masks_secret(workstation: Workstation) -> None:
    workstation.config_file.write_text(f'[slak]\ntoken = "{BOT_TOKEN}"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert "invalid slak = a table" in result.stderr
    assert "did you mean [slack]?" in result.stderr
    assert SECRET_PARTS["bot token"] not in result.stderr


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ('[lease]\ntll = "15s"\n', "did you mean lease.ttl?"),
        (
            '[store]\non_store_error = "open"\n',
            "did you mean on_store_error at the top level, before the first [section]?",
        ),
        (
            '[lease]\ntimeout = "5s"\n',
            "did you mean timeout under [store] (store.timeout) or timeout under [slack] "
            "(slack.timeout)?",
        ),
    ],
    ids=["misspelt", "top-level-key-in-section", "key-of-two-sections"],
)
def test_unknown_key_suggests_place(workstation: Workstation, text: str, suggestion: str) -> None:
    workstation.config_file.write_text(text)

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert f"unknown key; {suggestion} Known keys here: " in result.stderr


def test_several_errors_on_one_serve_line(workstation: Workstation, stop_started: None) -> None:
    workstation.config_file.write_text('[lease]\nttl = "0s"\n\n[log]\nlevel = "loud"\n')

    result = workstation.deployd("status", env=autostart_env(workstation))

    assert result.returncode == 78, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "invalid lease.ttl = '0s'" in result.stderr
    assert "; also invalid log.level = 'loud'" in result.stderr


# --- the missing file and the start-up log ---


def test_missing_config_file_says_fix(workstation: Workstation) -> None:
    workstation.config_file.unlink()

    result = workstation.deployd("config", "check")

    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(
        f"deployd: invalid DEPLOYD_CONFIG = '{workstation.config_file}': the file does not exist; "
        "create it"
    )
    assert "or unset DEPLOYD_CONFIG" in result.stderr


def test_missing_config_option_file_says_fix(workstation: Workstation, tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"

    result = workstation.deployd("config", "check", "--config", str(missing))

    assert result.returncode == 78, result.stderr
    assert f"invalid --config = '{missing}': the file does not exist" in result.stderr
    assert "leave --config out" in result.stderr


def test_start_config_error_logged_as_error(workstation: Workstation, stop_started: None) -> None:
    workstation.config_file.write_text('[lease]\nttl = "0s"\n')

    result = workstation.deployd("status", env=autostart_env(workstation))

    assert result.returncode == 78, result.stderr
    assert "invalid lease.ttl = '0s'" in result.stderr
    assert "deployd config check" in result.stderr
    log_lines = started_log(workstation).splitlines()
    errors = [line for line in log_lines if " ERROR deployd.daemon: cannot start: " in line]
    assert len(errors) == 1, log_lines
    assert "invalid lease.ttl = '0s'" in errors[0]
    serve_lines = [line for line in log_lines if line.startswith("deployd serve: ")]
    assert len(serve_lines) == 1, log_lines


# --- a restart while the config is invalid ---


def test_run_reports_why_daemon_cannot_restart(
    make_workstation: Callable[..., Workstation], start: Callable[..., DaemonProcess]
) -> None:
    workstation = make_workstation(lease={"ttl": "6s"})
    daemon = start(workstation)
    stderr_file = workstation.root / "run.stderr"
    with open(stderr_file, "wb") as stderr:
        run = workstation.spawn(
            "run",
            "api",
            "--",
            "sleep",
            "600",
            env=autostart_env(workstation),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_until(lambda: [lease["lock"] for lease in workstation.status()["leases"]] == ["api"])
        workstation.config_file.write_text('[lease]\nttl = "0s"\n')
        wait_until(lambda: "rejected" in daemon.log())

        assert daemon.stop() == 0
        run.wait(60)
    finally:
        terminate(run)

    assert run.returncode == 76
    lines = stderr_file.read_text().splitlines()
    reasons = [line for line in lines if "retrying until the renew deadline" in line]
    assert len(reasons) == 1, lines
    assert f"invalid lease.ttl = '0s' in {workstation.config_file}:2" in reasons[0]
    lost = [line for line in lines if "LEASE LOST" in line]
    assert len(lost) == 1, lines
    assert f"invalid lease.ttl = '0s' in {workstation.config_file}:2" in lost[0]


def test_waiting_acquire_reports_why_daemon_cannot_restart(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    daemon = start(workstation)
    holder = subprocess.Popen(["sleep", "600"])
    stderr_file = workstation.root / "acquire.stderr"
    try:
        held = workstation.deployd("acquire", "api", "--pid", str(holder.pid))
        assert held.returncode == 0, held.stderr
        with open(stderr_file, "wb") as stderr:
            waiter = workstation.spawn(
                "acquire",
                "api",
                "--wait",
                "10m",
                env=autostart_env(workstation),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_until(lambda: len(workstation.local_queue("api")) == 1)
            workstation.config_file.write_text('[lease]\nttl = "0s"\n')
            wait_until(lambda: "rejected" in daemon.log())
            assert daemon.stop() == 0

            wait_until(lambda: "a new daemon cannot start" in stderr_file.read_text(), 30)
        finally:
            terminate(waiter)
    finally:
        holder.kill()
        holder.wait(10)

    note = next(line for line in stderr_file.read_text().splitlines() if "cannot start" in line)
    assert f"invalid lease.ttl = '0s' in {workstation.config_file}:2" in note


# --- relative DEPLOYD_SOCKET ---


def test_relative_socket_rejected_by_client(workstation: Workstation, tmp_path: Path) -> None:
    directory = tmp_path / "work"
    directory.mkdir(mode=0o755)

    result = workstation.deployd(
        "status", env=autostart_env(workstation, DEPLOYD_SOCKET="relative.sock"), cwd=directory
    )

    assert result.returncode == 78, result.stderr
    assert "DEPLOYD_SOCKET='relative.sock' is a relative path" in result.stderr
    assert "absolute path" in result.stderr
    assert "mode" not in result.stderr
    assert list(directory.iterdir()) == []
    assert not (workstation.state_dir / "deployd.log").exists(), "a daemon was started"


def test_relative_socket_rejected_by_serve(workstation: Workstation, tmp_path: Path) -> None:
    result = workstation.deployd(
        "serve", env=workstation.env(DEPLOYD_SOCKET="relative.sock"), cwd=tmp_path
    )

    assert result.returncode == 78, result.stderr
    assert "deployd serve: DEPLOYD_SOCKET='relative.sock' is a relative path" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_relative_socket_fails_doctor(workstation: Workstation, tmp_path: Path) -> None:
    result = workstation.deployd(
        "doctor", env=workstation.env(DEPLOYD_SOCKET="relative.sock"), cwd=tmp_path
    )

    assert result.returncode == 1, result.stdout + result.stderr
    socket_line = next(line for line in result.stdout.splitlines() if "socket" in line)
    assert socket_line.startswith("FAIL")
    assert "is a relative path" in socket_line


# --- how to restart the daemon ---


@pytest.fixture
def slack() -> Iterator[SlackServer]:
    """Return a running fake Slack; it is stopped after the test."""
    with SlackServer() as server:
        yield server


def test_slack_fix_says_how_to_restart(
    workstation: Workstation, slack: SlackServer, start: Callable[..., DaemonProcess]
) -> None:
    token_file = workstation.root / "slack-token"
    token_file.write_text("xoxb-revoked-0000\n")
    token_file.chmod(0o600)
    workstation.write_config(
        {"slack": {"token_file": str(token_file), "api_url": slack.api_url, "timeout": "2s"}}
    )
    daemon = start(workstation)
    wait_until(lambda: workstation.status()["notifications"].get("problem"))
    how = f"restart the daemon (kill -TERM {daemon.pid}; the next deployd command starts it again)"

    status = workstation.deployd("status")
    doctor = workstation.deployd("doctor")

    fix = next(line for line in status.stdout.splitlines() if "fix:" in line)
    assert how in fix
    doctor_fix = next(
        line for line in doctor.stdout.splitlines() if "fix:" in line and "token" in line
    )
    assert how in doctor_fix
    assert doctor_fix.count("restart the daemon") == 1
    assert "the new daemon sends the held messages" in doctor_fix


def test_restart_only_change_says_how_to_restart(
    workstation: Workstation, daemon: DaemonProcess, tmp_path: Path
) -> None:
    offset = workstation.log_file.stat().st_size

    workstation.write_config({"store": {"path": str(tmp_path / "other.sqlite3")}})

    reload = workstation.deployd("config", "reload", "--json")
    assert reload.returncode == 0, reload.stderr
    assert [change["key"] for change in json.loads(reload.stdout)["restart_required"]] == [
        "store.path"
    ]
    wait_until(lambda: "after a restart" in workstation.log_file.read_bytes()[offset:].decode())
    log = workstation.log_file.read_bytes()[offset:].decode()
    assert f"restart of the daemon (kill -TERM {daemon.pid}; the next deployd command" in log
