"""The environment as deployd reads it: DEPLOYD_* names, path variables, clock_offset, project.

Misspelt or unknown DEPLOYD_* variables are warned about by ``config
check``, ``doctor`` and a starting daemon, with a guess at the name meant.
A relative DEPLOYD_STATE_DIR or DEPLOYD_CONFIG is rejected with exit 78 by
the client and the daemon, and relative XDG_* base directories are ignored,
as the XDG Base Directory Specification requires. ``doctor`` names a configured
clock_offset as a setting for tests, and ``status``, ``config show`` and the
daemon log name the same Firestore project.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import DaemonProcess, Workstation, autostart_env, wait_until

from deployd.config import OTHER_VARIABLES, known_variables

REPOSITORY = Path(__file__).resolve().parent.parent


def line_of(output: str, name: str) -> str:
    """Return the doctor report line of the check ``name``."""
    return next(line for line in output.splitlines() if re.match(rf"^\S+\s+{name}\s", line))


def lines_of(output: str, name: str) -> list[str]:
    """Return the doctor report lines of the check ``name``: its first line and those under it."""
    lines = output.splitlines()
    start = lines.index(line_of(output, name))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        block.append(line)
    return block


# --- unknown DEPLOYD_* variables ---


def test_check_warns_of_misspelt_variables(workstation: Workstation) -> None:
    env = workstation.env(DEPLOYD_TTL="15s", DEPLOYD_LEASE_TLL="5s")

    result = workstation.deployd("config", "check", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "deployd: warning: DEPLOYD_LEASE_TLL is not a deployd variable, so it has no effect; "
        "did you mean DEPLOYD_LEASE_TTL (lease.ttl)?",
        "deployd: warning: DEPLOYD_TTL is not a deployd variable, so it has no effect; "
        "did you mean DEPLOYD_LEASE_TTL (lease.ttl)?",
    ]
    assert "is valid" in result.stdout


def test_unknown_variable_without_guess_names_scheme(workstation: Workstation) -> None:
    env = workstation.env(DEPLOYD_KEEP_ME="xoxb-not-printed")

    result = workstation.deployd("config", "check", env=env)

    assert result.returncode == 0, result.stderr
    assert "DEPLOYD_KEEP_ME is not a deployd variable" in result.stderr
    assert "such as DEPLOYD_LEASE_TTL for lease.ttl" in result.stderr
    assert "xoxb-not-printed" not in result.stderr


def test_check_warns_when_config_invalid(workstation: Workstation) -> None:
    workstation.config_file.write_text('[lease]\nttl = "0s"\n')
    env = workstation.env(DEPLOYD_LEASE_TLL="5s")

    result = workstation.deployd("config", "check", env=env)

    assert result.returncode == 78, result.stderr
    assert "did you mean DEPLOYD_LEASE_TTL (lease.ttl)?" in result.stderr
    assert "invalid lease.ttl = '0s'" in result.stderr


def test_own_variables_not_warned_about(workstation: Workstation) -> None:
    set_by_workstation = ("DEPLOYD_SOCKET", "DEPLOYD_CONFIG")
    own = {name: "1" for name in OTHER_VARIABLES if name not in set_by_workstation}
    own.pop("DEPLOYD_SLACK_WEBHOOK_URL")  # one Slack credential at a time
    own["DEPLOYD_SLACK_TOKEN"] = "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
    env = workstation.env(DEPLOYD_LEASE_TTL="15s", DEPLOYD_LOG_LEVEL="debug", **own)

    result = workstation.deployd("config", "check", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_every_variable_in_sources_is_known() -> None:
    """A DEPLOYD_* name that the code, units or examples use is not warned about."""
    pattern = re.compile(r"\bDEPLOYD_[A-Z][A-Z_]*[A-Z]\b")
    found: dict[str, Path] = {}
    for folder in ("client", "daemon", "examples", "systemd", "launchd"):
        for path in sorted((REPOSITORY / folder).rglob("*")):
            if not path.is_file() or path.suffix == ".pyc" or "egg-info" in str(path):
                continue
            for name in pattern.findall(path.read_text(errors="replace")):
                found.setdefault(name, path)

    unknown = {name: str(path) for name, path in found.items() if name not in known_variables()}

    assert "DEPLOYD_LEASE_ID" in found
    assert unknown == {}


def test_doctor_warns_of_misspelt_variable(workstation: Workstation, daemon: DaemonProcess) -> None:
    env = workstation.env(HOME=str(workstation.root / "home"), DEPLOYD_TTL="15s")

    result = workstation.deployd("doctor", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    block = lines_of(result.stdout, "environment")
    assert block[0].startswith("warn")
    assert "DEPLOYD_TTL is not a deployd variable" in block[0]
    assert "did you mean DEPLOYD_LEASE_TTL (lease.ttl)?" in block[0]
    assert "fix: correct or unset each variable listed" in block[-1]


def test_doctor_without_unknown_variables_omits_check(
    workstation: Workstation, daemon: DaemonProcess
) -> None:
    result = workstation.deployd("doctor", env=workstation.env(HOME=str(workstation.root / "h")))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "environment" not in result.stdout


def test_daemon_start_logs_misspelt_variable(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    workstation.environment["DEPLOYD_LEASE_TLL"] = "5s"

    daemon = start(workstation)

    warnings = [line for line in daemon.log().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, daemon.log()
    assert "DEPLOYD_LEASE_TLL is not a deployd variable" in warnings[0]
    assert "did you mean DEPLOYD_LEASE_TTL (lease.ttl)?" in warnings[0]


def test_autostarted_daemon_keeps_lease_ttl(workstation: Workstation, stop_started: None) -> None:
    """DEPLOYD_LEASE_TTL sets lease.ttl: a daemon started by a client gets it too."""
    holder = subprocess.Popen(["sleep", "600"])
    try:
        env = autostart_env(workstation, DEPLOYD_LEASE_TTL="7s")
        acquired = workstation.deployd("acquire", "api", "--pid", str(holder.pid), env=env)
        assert acquired.returncode == 0, acquired.stderr

        [lease] = workstation.status()["leases"]
    finally:
        holder.kill()
        holder.wait(10)

    assert lease["ttl"] == 7.0


# --- relative path variables ---


@pytest.mark.parametrize(
    ("variable", "what", "default"),
    [
        ("DEPLOYD_STATE_DIR", "a state directory", Path.home() / ".local/state/deployd"),
        ("DEPLOYD_CONFIG", "a config file", Path.home() / ".config/deployd/config.toml"),
    ],
    ids=["state-dir", "config"],
)
def test_relative_path_rejected_by_client(
    workstation: Workstation, tmp_path: Path, variable: str, what: str, default: Path
) -> None:
    directory = tmp_path / "work"
    directory.mkdir()
    env = autostart_env(workstation, **{variable: "relative"})

    result = workstation.deployd("status", env=env, cwd=directory)

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines() == [
        f"deployd: {variable}='relative' is a relative path, so each working directory would "
        f"get {what} of its own; set {variable} to an absolute path (such as "
        f"'{directory}/relative'), or unset it to use the default {default}"
    ]
    assert list(directory.iterdir()) == []
    assert not (workstation.state_dir / "deployd.log").exists(), "a daemon was started"
    assert not workstation.socket.exists(), "a daemon was started"


def test_relative_state_dir_rejected_by_serve(workstation: Workstation, tmp_path: Path) -> None:
    env = workstation.env(DEPLOYD_STATE_DIR="state")

    result = workstation.deployd("serve", env=env, cwd=tmp_path)

    assert result.returncode == 78, result.stderr
    serve_lines = [line for line in result.stderr.splitlines() if line.startswith("deployd serve")]
    assert serve_lines[0].startswith(
        "deployd serve: invalid state_dir = 'state' in DEPLOYD_STATE_DIR: must be an absolute "
        f"path, because a relative one names another path in each working directory; set it to "
        f"one such as '{tmp_path}/state', or unset it"
    )
    assert list(tmp_path.iterdir()) == []


def test_relative_config_rejected_by_serve(workstation: Workstation, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[lease]\nttl = "20s"\n')
    env = workstation.env(DEPLOYD_CONFIG="config.toml")

    result = workstation.deployd("serve", env=env, cwd=tmp_path)

    assert result.returncode == 78, result.stderr
    assert "deployd serve: invalid DEPLOYD_CONFIG = 'config.toml': must be an absolute path" in (
        result.stderr
    )
    assert f"or unset it to use the default {Path.home()}/.config/deployd/config.toml" in (
        result.stderr
    )
    assert not workstation.socket.exists()


def test_relative_config_fails_check_and_doctor(workstation: Workstation, tmp_path: Path) -> None:
    env = workstation.env(DEPLOYD_CONFIG="config.toml", HOME=str(workstation.root / "home"))

    check = workstation.deployd("config", "check", env=env, cwd=tmp_path)
    doctor = workstation.deployd("doctor", env=env, cwd=tmp_path)

    assert check.returncode == 78, check.stderr
    assert "invalid DEPLOYD_CONFIG = 'config.toml': must be an absolute path" in check.stderr
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    config_line = line_of(doctor.stdout, "config")
    assert config_line.startswith("FAIL")
    assert "invalid DEPLOYD_CONFIG = 'config.toml'" in config_line
    assert doctor.stderr == ""


def test_relative_path_key_from_environment_rejected(
    workstation: Workstation, tmp_path: Path
) -> None:
    env = workstation.env(DEPLOYD_LOG_FILE="deployd.log")

    result = workstation.deployd("config", "check", env=env, cwd=tmp_path)

    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(
        "deployd: invalid log.file = 'deployd.log' in DEPLOYD_LOG_FILE: must be an absolute path"
    )


def test_tilde_state_dir_shared(workstation: Workstation, stop_started: None) -> None:
    home = workstation.root / "home"
    home.mkdir()
    env = autostart_env(workstation, HOME=str(home), DEPLOYD_STATE_DIR="~/state")

    result = workstation.deployd("status", "--json", env=env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["store"]["location"] == str(home / "state/locks.sqlite3")
    assert (home / "state/deployd.log").exists(), "the client logged the daemon elsewhere"


# --- relative XDG_* variables ---


def xdg_env(workstation: Workstation, home: Path, **extra: str) -> dict[str, str]:
    """Return a client environment that leaves the state and config paths to XDG_* and HOME."""
    env = autostart_env(workstation, HOME=str(home), **extra)
    del env["DEPLOYD_STATE_DIR"]
    del env["DEPLOYD_CONFIG"]
    return env


def test_relative_xdg_dirs_ignored(
    workstation: Workstation, tmp_path: Path, stop_started: None
) -> None:
    home = workstation.root / "home"
    work = tmp_path / "work"
    work.mkdir()
    env = xdg_env(workstation, home, XDG_STATE_HOME="state", XDG_CONFIG_HOME="config")

    status = workstation.deployd("status", "--json", env=env, cwd=work)
    show = workstation.deployd("config", "show", "--json", env=env, cwd=work)

    assert status.returncode == 0, status.stderr
    location = json.loads(status.stdout)["store"]["location"]
    assert location == str(home / ".local/state/deployd/locks.sqlite3")
    assert (home / ".local/state/deployd/deployd.log").exists()
    assert list(work.iterdir()) == []
    assert show.returncode == 0, show.stderr
    document = json.loads(show.stdout)
    assert document["file"]["path"] == str(home / ".config/deployd/config.toml")
    assert document["values"]["state_dir"]["value"] == str(home / ".local/state/deployd")
    for variable in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        assert (
            f"deployd: warning: {variable} is a relative path, so deployd ignores it" in show.stderr
        )


def test_relative_runtime_dir_ignored(workstation: Workstation, tmp_path: Path) -> None:
    env = workstation.env(XDG_RUNTIME_DIR="runtime")
    del env["DEPLOYD_SOCKET"]

    result = workstation.deployd("config", "show", "--json", env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    socket = json.loads(result.stdout)["socket"]
    assert not socket["path"].startswith(str(tmp_path))
    assert socket["path"].startswith(("/run/user/", "/tmp/deployd-"))
    assert "XDG_RUNTIME_DIR is relative, so ignored" in socket["source"]
    assert "XDG_RUNTIME_DIR is a relative path, so deployd ignores it" in result.stderr


# --- clock_offset, a setting for tests ---


def test_doctor_names_configured_clock_offset(
    make_workstation: Callable[..., Workstation], start: Callable[..., DaemonProcess]
) -> None:
    workstation = make_workstation(clock_offset="10m")
    daemon = start(workstation)
    env = workstation.env(HOME=str(workstation.root / "home"))

    result = workstation.deployd("doctor", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    block = lines_of(result.stdout, "clock")
    assert block[0].startswith("warn")
    assert f"clock_offset = 10m00s is set ({workstation.config_file}:1)" in block[0]
    assert "meant for tests only" in block[0]
    assert block[-1].strip().startswith(f"fix: remove clock_offset from {workstation.config_file}")
    assert f"restart the daemon (kill -TERM {daemon.pid}" in block[-1]
    assert "NTP" not in result.stdout


@pytest.mark.firestore
def test_doctor_explains_firestore_offset(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = make_firestore_workstation(clock_offset="10m")
    start(workstation)
    holder = subprocess.Popen(["sleep", "600"])
    try:
        # The store measures its offset from the server times of its writes.
        acquired = workstation.deployd("acquire", "api", "--pid", str(holder.pid))
        assert acquired.returncode == 0, acquired.stderr
        wait_until(lambda: workstation.status()["store"]["clock_offset"] is not None)
        env = workstation.env(HOME=str(workstation.root / "home"))

        result = workstation.deployd("doctor", env=env)
    finally:
        holder.kill()
        holder.wait(10)

    block = lines_of(result.stdout, "clock")
    assert block[0].startswith("warn"), result.stdout
    assert "clock_offset = 10m00s is set" in block[0]
    pattern = r"offset to the store's clock (\S+)s, (\S+)s without clock_offset"
    measured = re.search(pattern, block[1])
    assert measured is not None, block
    assert abs(float(measured.group(1)) + 600) < 5
    assert abs(float(measured.group(2))) < 5
    assert "NTP" not in result.stdout


# --- the Firestore project ---


@pytest.mark.firestore
@pytest.mark.parametrize(
    ("environment", "project", "source"),
    [
        ({}, "deployd-local", "default: the emulator's project, as FIRESTORE_EMULATOR_HOST is set"),
        ({"GOOGLE_CLOUD_PROJECT": "team-project"}, "team-project", "default: GOOGLE_CLOUD_PROJECT"),
    ],
    ids=["emulator", "google-cloud-project"],
)
def test_status_and_show_name_project_in_use(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    project: str,
    source: str,
) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    workstation = make_firestore_workstation()
    del workstation.settings["store"]["project"]
    workstation.write_config()
    workstation.environment.update(environment)
    daemon = start(workstation)
    namespace = workstation.settings["store"]["namespace"]

    status = workstation.deployd("status")
    show = workstation.deployd("config", "show", "--json")

    assert f"opened Firestore store (project {project}," in daemon.log()
    assert workstation.status()["store"]["location"] == f"{project}/(default)/{namespace}"
    assert f"firestore at {project}/(default)/{namespace}" in status.stdout
    assert "from environment" not in status.stdout
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["values"]["store.project"] == {
        "value": project,
        "source": source,
        "env": "DEPLOYD_STORE_PROJECT",
    }
