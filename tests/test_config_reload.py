"""Config reload while the daemon runs, and ``deployd config check|show|reload``.

The daemon watches its config file's directory. The tests edit the file,
wait for the daemon's log line about it, and then check the TTL of the next
lease, because new leases are what a reload changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DEPLOYD, DaemonProcess, Workstation, wait_until

SLACK_TOKEN = "xoxb-1234-5678-deploydtestsecret"
WEBHOOK_URL = "https://hooks.slack.com/services/T000/B000/deploydtestsecret"


@pytest.fixture
def pid_holder() -> Iterator[subprocess.Popen[bytes]]:
    """A process for leases to be bound to; it ends with the test."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait(10)


def acquire_ttl(workstation: Workstation, lock: str, holder: subprocess.Popen[bytes]) -> float:
    """Take ``lock`` for ``holder`` and return the lease's TTL in seconds."""
    result = workstation.deployd("acquire", lock, "--pid", str(holder.pid), "--format", "json")
    assert result.returncode == 0, result.stderr
    lease: dict[str, Any] = json.loads(result.stdout)
    return float(lease["timings"]["ttl"])


def log_after(daemon: DaemonProcess, offset: int) -> str:
    return daemon.workstation.log_file.read_bytes()[offset:].decode(errors="replace")


def log_size(workstation: Workstation) -> int:
    return workstation.log_file.stat().st_size


# --- reload on change ---


def test_valid_edit_changes_next_ttl(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    pid_holder: subprocess.Popen[bytes],
) -> None:
    workstation = make_workstation(lease={"ttl": "30s"})
    daemon = start(workstation)
    assert acquire_ttl(workstation, "api", pid_holder) == 30.0
    offset = log_size(workstation)

    workstation.config_file.write_text('[lease]\nttl = "12s"\n')

    wait_until(lambda: "config reloaded (the file changed)" in log_after(daemon, offset))
    line = next(
        line for line in log_after(daemon, offset).splitlines() if "config reloaded" in line
    )
    assert f"lease.ttl 30s -> 12s ({workstation.config_file}:2)" in line
    assert acquire_ttl(workstation, "web", pid_holder) == 12.0
    ttls = {entry["lock"]: entry["ttl"] for entry in workstation.status()["leases"]}
    assert ttls == {"api": 30.0, "web": 12.0}, "a reload must not change leases already held"


def test_invalid_edit_keeps_old_config(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    pid_holder: subprocess.Popen[bytes],
) -> None:
    workstation = make_workstation(lease={"ttl": "20s"})
    daemon = start(workstation)
    offset = log_size(workstation)

    workstation.config_file.write_text('on_store_error = "open"\n\n[lease]\nttl = "0s"\n')

    wait_until(lambda: "rejected" in log_after(daemon, offset))
    log = log_after(daemon, offset)
    assert "config reload (the file changed) rejected, the running config stays" in log
    assert f"invalid lease.ttl = '0s' in {workstation.config_file}:4" in log
    assert "must be longer than 0s" in log
    assert acquire_ttl(workstation, "api", pid_holder) == 20.0

    reload = workstation.deployd("config", "reload")
    assert reload.returncode == 78, reload.stderr
    assert f"invalid lease.ttl = '0s' in {workstation.config_file}:4" in reload.stderr
    assert len(reload.stderr.splitlines()) == 1


def test_unknown_key_with_secret_masked_in_log(
    workstation: Workstation, daemon: DaemonProcess
) -> None:
    offset = log_size(workstation)

    workstation.config_file.write_text(f'[slack]\ntoken = "{SLACK_TOKEN}"\n')

    wait_until(lambda: "rejected" in log_after(daemon, offset))
    log = log_after(daemon, offset)
    assert "invalid slack.token = '[masked]'" in log
    assert "unknown key" in log
    assert SLACK_TOKEN not in log


def test_restart_only_change_reported(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    pid_holder: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    workstation = make_workstation(lease={"ttl": "25s"})
    daemon = start(workstation)
    location = workstation.status()["store"]["location"]
    offset = log_size(workstation)
    other_store = tmp_path / "other.sqlite3"

    workstation.write_config({"store": {"path": str(other_store)}, "lease": {"ttl": "9s"}})

    wait_until(lambda: "after a restart" in log_after(daemon, offset))
    log = log_after(daemon, offset)
    assert "lease.ttl 25s -> 9s" in log
    assert f"store.path unset -> '{other_store}'" in log
    assert workstation.status()["store"]["location"] == location
    assert acquire_ttl(workstation, "api", pid_holder) == 9.0
    assert not other_store.exists()

    reload = workstation.deployd("config", "reload", "--json")
    assert reload.returncode == 0, reload.stderr
    result = json.loads(reload.stdout)
    assert result["changed"] == []
    assert [change["key"] for change in result["restart_required"]] == ["store.path"]


def test_sighup_reloads(workstation: Workstation, daemon: DaemonProcess) -> None:
    offset = log_size(workstation)

    daemon.process.send_signal(signal.SIGHUP)

    wait_until(lambda: "config reloaded (SIGHUP)" in log_after(daemon, offset))
    assert daemon.process.poll() is None
    assert daemon.answers()


def test_reload_command_lists_changes(
    make_workstation: Callable[..., Workstation], start: Callable[..., DaemonProcess]
) -> None:
    workstation = make_workstation(lease={"ttl": "30s"})
    start(workstation)

    unchanged = workstation.deployd("config", "reload")
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout == f"reloaded {workstation.config_file}: no changes\n"


def test_config_created_later_is_picked_up(
    workstation: Workstation, tmp_path: Path, pid_holder: subprocess.Popen[bytes]
) -> None:
    """With no config directory at start, the daemon notices the file once it is created."""
    config_home = workstation.root / "xdg"
    env = workstation.env(XDG_CONFIG_HOME=str(config_home))
    del env["DEPLOYD_CONFIG"]
    with open(workstation.log_file, "ab") as log:
        process = subprocess.Popen(
            [*DEPLOYD, "serve"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    daemon = DaemonProcess(workstation, process)
    try:
        wait_until(daemon.answers)
        assert acquire_ttl(workstation, "api", pid_holder) == 30.0
        offset = log_size(workstation)

        config_file = config_home / "deployd" / "config.toml"
        config_file.parent.mkdir(parents=True)
        config_file.write_text('[lease]\nttl = "7s"\n')

        wait_until(lambda: "lease.ttl 30s -> 7s" in log_after(daemon, offset))
        assert acquire_ttl(workstation, "web", pid_holder) == 7.0
    finally:
        assert daemon.stop() == 0


# --- config check and show ---


def test_check_accepts_valid_file(make_workstation: Callable[..., Workstation]) -> None:
    workstation = make_workstation(lease={"ttl": "15s"})

    result = workstation.deployd("config", "check")

    assert result.returncode == 0, result.stderr
    assert f"{workstation.config_file} is valid" in result.stdout


def test_check_rejects_invalid_value(workstation: Workstation) -> None:
    workstation.config_file.write_text('[lease]\nttl = "soon"\n')

    result = workstation.deployd("config", "check")

    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"deployd: invalid lease.ttl = 'soon' in {workstation.config_file}:2:"
    )


def test_check_with_config_option(workstation: Workstation, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('on_store_error = "sometimes"\n')

    result = workstation.deployd("config", "check", "--config", str(other))

    assert result.returncode == 78
    assert f"invalid on_store_error = 'sometimes' in {other}:1" in result.stderr
    assert "must be one of open, closed" in result.stderr


def test_check_rejects_open_token_file(workstation: Workstation) -> None:
    token_file = workstation.root / "slack-token"
    token_file.write_text(SLACK_TOKEN + "\n")
    token_file.chmod(0o644)
    workstation.write_config({"slack": {"token_file": str(token_file)}})

    result = workstation.deployd("config", "check")

    assert result.returncode == 78
    assert f"chmod 600 {token_file}" in result.stderr
    assert SLACK_TOKEN not in result.stderr


def test_show_names_every_source(workstation: Workstation) -> None:
    workstation.config_file.write_text('on_store_error = "closed"\n\n[lease]\nttl = "40s"\n')
    env = workstation.env(DEPLOYD_LEASE_MAX_HOLD="45m")

    result = workstation.deployd("config", "show", "--json", env=env)

    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)["values"]
    assert values["lease.ttl"] == {
        "value": 40.0,
        "source": f"{workstation.config_file}:4",
        "env": "DEPLOYD_LEASE_TTL",
    }
    assert values["on_store_error"]["source"] == f"{workstation.config_file}:1"
    assert values["lease.max_hold"]["value"] == 2700.0
    assert values["lease.max_hold"]["source"] == "DEPLOYD_LEASE_MAX_HOLD"
    assert values["slack.channel"]["source"] == "default"
    assert values["lease.renew_every"]["value"] == pytest.approx(40.0 / 3)
    assert values["lease.renew_every"]["source"] == "default: lease.ttl / 3"


def test_show_text_lists_keys(workstation: Workstation) -> None:
    workstation.config_file.write_text('[lease]\nttl = "40s"\n')

    result = workstation.deployd("config", "show")

    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["lease.ttl"][1:] == ["40s", f"{workstation.config_file}:2"]
    assert rows["socket"][1] == str(workstation.socket)
    assert rows["socket"][2] == "DEPLOYD_SOCKET"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_show_masks_slack_secrets(workstation: Workstation, as_json: bool) -> None:
    token_file = workstation.root / "slack-token"
    token_file.write_text(SLACK_TOKEN + "\n")
    token_file.chmod(0o600)
    workstation.write_config({"slack": {"token_file": str(token_file)}})
    flags = ["--json"] if as_json else []

    from_file = workstation.deployd("config", "show", *flags)
    from_env = workstation.deployd(
        "config", "show", *flags, env=workstation.env(DEPLOYD_SLACK_WEBHOOK_URL=WEBHOOK_URL)
    )
    token_env = workstation.deployd(
        "config", "show", *flags, env=workstation.env(DEPLOYD_SLACK_TOKEN=SLACK_TOKEN)
    )

    for result in (from_file, from_env, token_env):
        assert result.returncode == 0, result.stderr
        assert "deploydtestsecret" not in result.stdout
        assert "deploydtestsecret" not in result.stderr
    assert "xoxb-[masked]" in from_file.stdout
    assert str(token_file) in from_file.stdout
    assert "DEPLOYD_SLACK_TOKEN" in token_env.stdout


def test_show_of_invalid_config_exits_78(workstation: Workstation) -> None:
    workstation.config_file.write_text("[lease\n")

    result = workstation.deployd("config", "show")

    assert result.returncode == 78
    assert "invalid TOML" in result.stderr


def test_unknown_config_action_exits_64(workstation: Workstation) -> None:
    result = workstation.deployd("config", "edit")

    assert result.returncode == 64
    assert "use one of check, show, reload" in result.stderr


def test_reload_without_daemon_exits_69(workstation: Workstation) -> None:
    result = workstation.deployd("config", "reload")

    assert result.returncode == 69, result.stderr
    assert not workstation.socket.exists()


def test_default_config_path_unaffected(tmp_path: Path, workstation: Workstation) -> None:
    """Without DEPLOYD_CONFIG and with no file, check reports the defaults as valid."""
    env = workstation.env(XDG_CONFIG_HOME=str(tmp_path / "none"))
    del env["DEPLOYD_CONFIG"]

    result = workstation.deployd("config", "check", env=env)

    assert result.returncode == 0, result.stderr
    expected = os.path.join(tmp_path, "none", "deployd", "config.toml")
    assert f"no config file at {expected}" in result.stdout
