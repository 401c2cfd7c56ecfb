"""``deployd doctor`` on a healthy workstation and on broken ones."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from harness import DaemonProcess, Workstation

from deployd_client import __version__


def doctor(workstation: Workstation, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``deployd doctor`` with HOME and XDG_CONFIG_HOME inside the workstation."""
    env = workstation.env(
        HOME=str(workstation.root / "home"),
        XDG_CONFIG_HOME=str(workstation.root / "xdg-config"),
        **extra,
    )
    return workstation.deployd("doctor", env=env)


def levels(output: str) -> dict[str, str]:
    """Return each check's level by its name, from the report lines."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(ok|warn|FAIL)\s+(\w+)\s", line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def line_of(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if re.match(rf"^\S+\s+{name}\s", line))


def test_healthy_setup_exits_0(workstation: Workstation, daemon: DaemonProcess) -> None:
    result = doctor(workstation)

    assert result.returncode == 0, result.stdout + result.stderr
    assert levels(result.stdout) == {
        "socket": "ok",
        "daemon": "ok",
        "store": "ok",
        "clock": "ok",
        "slack": "ok",
        "linger": "ok",
        "config": "ok",
    }
    assert f"{workstation.socket} [DEPLOYD_SOCKET]" in line_of(result.stdout, "socket")
    assert f"pid {daemon.pid}, deployd {__version__}" in line_of(result.stdout, "daemon")
    assert "reachable" in line_of(result.stdout, "store")
    assert "offset to the store's clock +0.000s" in line_of(result.stdout, "clock")
    assert "off" in line_of(result.stdout, "slack")
    assert f"{workstation.config_file} is valid" in line_of(result.stdout, "config")
    assert result.stdout.splitlines()[-1] == "0 problems, 0 warnings"


def test_stale_socket_warns(workstation: Workstation, start: Callable[..., DaemonProcess]) -> None:
    """A stale socket file is a warning: the next daemon to start removes it itself."""
    killed = start(workstation)
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(30)

    result = doctor(workstation)

    assert result.returncode == 0, result.stdout
    assert levels(result.stdout)["socket"] == "warn"
    lines = result.stdout.splitlines()
    socket_line = lines.index(line_of(result.stdout, "socket"))
    assert "stale socket file" in lines[socket_line]
    assert lines[socket_line + 1].strip().startswith(f"fix: rm {workstation.socket}")
    assert workstation.socket.exists(), "doctor must change nothing"
    assert result.stdout.splitlines()[-1].startswith("0 problems, ")


def test_open_socket_dir_fails(workstation: Workstation) -> None:
    directory = workstation.socket.parent
    directory.mkdir()
    directory.chmod(0o755)

    result = doctor(workstation)

    assert result.returncode == 1, result.stdout
    socket_line = line_of(result.stdout, "socket")
    assert socket_line.startswith("FAIL")
    assert f"the directory {directory} is open to other users (mode 755)" in socket_line
    assert f"fix: chmod 700 {directory}" in result.stdout
    assert directory.stat().st_mode & 0o777 == 0o755


def test_no_daemon_without_autostart_fails(workstation: Workstation) -> None:
    result = doctor(workstation)

    assert result.returncode == 1, result.stdout
    assert "DEPLOYD_NO_AUTOSTART is set" in line_of(result.stdout, "socket")
    assert levels(result.stdout)["store"] == "warn"


def test_no_daemon_with_autostart_warns(workstation: Workstation) -> None:
    env = workstation.env(
        HOME=str(workstation.root / "home"), XDG_CONFIG_HOME=str(workstation.root / "xdg")
    )
    del env["DEPLOYD_NO_AUTOSTART"]

    result = workstation.deployd("doctor", env=env)

    assert result.returncode == 0, result.stdout
    assert levels(result.stdout)["socket"] == "warn"
    assert "the next deployd command starts one" in line_of(result.stdout, "socket")
    assert not workstation.socket.exists(), "doctor must not start a daemon"


def test_invalid_config_fails(workstation: Workstation, daemon: DaemonProcess) -> None:
    workstation.config_file.write_text('[lease]\nttl = "-3s"\n')

    result = doctor(workstation)

    assert result.returncode == 1, result.stdout
    config_line = line_of(result.stdout, "config")
    assert config_line.startswith("FAIL")
    assert f"invalid lease.ttl = '-3s' in {workstation.config_file}:2" in config_line
    assert "deployd config check" in result.stdout


def test_symlinked_shared_dir_fails(workstation: Workstation, tmp_path: Path) -> None:
    """A socket directory that is a symlink to a shared one is judged by what it points to."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    workstation.socket.parent.symlink_to(shared)

    result = doctor(workstation)

    assert result.returncode == 1
    assert "open to other users (mode 777)" in line_of(result.stdout, "socket")
