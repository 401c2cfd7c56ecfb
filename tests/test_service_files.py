"""The systemd units, the launchd agent, and ``deployd service install|uninstall|status``.

Nothing here touches the real user's service manager: every test points HOME
and XDG_CONFIG_HOME at a temporary directory and puts stand-ins for
systemctl, loginctl and launchctl first on PATH, which record their
arguments. The platform is forced in the process (``sys.platform``) to test
both flavours on one machine. The unit files themselves are checked by the
real ``systemd-analyze verify``.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import DaemonProcess, Workstation

from deployd_client import cli, unit_files, user_service
from deployd_client.unit_files import launchd_agent, systemd_exec_path, systemd_units

REPOSITORY = Path(__file__).resolve().parent.parent
VENV_DEPLOYD = Path(sys.executable).parent / "deployd"

# A stand-in for systemctl, loginctl or launchctl: appends its name and
# arguments to $FAKE_LOG and prints replies to the queries deployd makes.
FAKE_COMMAND = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$(basename "$0") $*" in
  "systemctl --user is-enabled"*) echo "${FAKE_ENABLED:-enabled}" ;;
  "systemctl --user is-active"*) echo "${FAKE_ACTIVE:-active}" ;;
  "systemctl --user show"*) echo "${FAKE_MAIN_PID:-0}" ;;
  "loginctl show-user"*) echo "${FAKE_LINGER:-no}" ;;
  "launchctl print"*)
    if [ -n "$FAKE_LAUNCHD_PID" ]; then
      printf '%s\\n' "gui/0/com.deployd.daemon = {" "  state = running"
      printf '%s\\n' "  pid = $FAKE_LAUNCHD_PID" "}"
    else
      echo "Could not find service" >&2; exit 113
    fi ;;
esac
if [ -n "$FAKE_FAIL" ] && [ "$1 $2" = "$FAKE_FAIL" ]; then
  echo "Failed to connect to bus: No medium found" >&2
  exit 1
fi
exit 0
"""


# --- systemd-analyze ---


def _install_systemd() -> str | None:
    """Install Debian's systemd package for systemd-analyze; return why not, or None when done."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "systemd-analyze is missing and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "systemd"]
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            return None
    return f"apt-get install systemd failed: {result.stderr.strip().splitlines()[-1:]}"


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """Return the path of systemd-analyze, installing it when it is missing and can be."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    reason = _install_systemd()
    found = shutil.which("systemd-analyze")
    if found:
        return found
    installable = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if os.environ.get("CI") and installable:
        pytest.fail(f"systemd-analyze could not be installed under CI: {reason}")
    pytest.skip(reason or "systemd-analyze is missing")


def verify_units(
    systemd_analyze: str, directory: Path, home: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze --user verify`` on the units in ``directory``."""
    runtime = home / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        [
            systemd_analyze,
            "--user",
            "verify",
            str(directory / unit_files.SOCKET_UNIT),
            str(directory / unit_files.SERVICE_UNIT),
        ],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(runtime),
        },
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_units(directory: Path, exec_start: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in systemd_units(exec_start).items():
        (directory / name).write_text(text)


@pytest.mark.parametrize(
    "command",
    [
        [str(VENV_DEPLOYD)],
        [sys.executable, "-m", "deployd_client"],
    ],
    ids=["script", "python-m"],
)
def test_rendered_units_verify(systemd_analyze: str, tmp_path: Path, command: list[str]) -> None:
    units = tmp_path / "units"
    write_units(units, " ".join(systemd_exec_path(word) for word in command))

    result = verify_units(systemd_analyze, units, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_units_verify_with_space_in_path(systemd_analyze: str, tmp_path: Path) -> None:
    odd = tmp_path / "tools 100%" / "deployd"
    odd.parent.mkdir()
    odd.symlink_to(VENV_DEPLOYD)
    units = tmp_path / "units"
    write_units(units, systemd_exec_path(str(odd)))

    result = verify_units(systemd_analyze, units, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    service = (units / unit_files.SERVICE_UNIT).read_text()
    assert f'ExecStart="{tmp_path}/tools 100%%/deployd" serve' in service


def test_repository_units_verify(systemd_analyze: str, tmp_path: Path) -> None:
    """The files in systemd/ verify for a deployd in ~/.local/bin, where they expect it."""
    local_bin = tmp_path / ".local" / "bin"
    local_bin.mkdir(parents=True)
    (local_bin / "deployd").symlink_to(VENV_DEPLOYD)

    result = verify_units(systemd_analyze, REPOSITORY / "systemd", tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_catches_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    """The verify step can fail: a unit whose command does not exist is reported."""
    units = tmp_path / "units"
    write_units(units, str(tmp_path / "missing" / "deployd"))

    result = verify_units(systemd_analyze, units, tmp_path)

    assert result.returncode != 0
    assert "is not executable" in result.stderr


# --- the files in the repository ---


def test_repository_units_match_templates() -> None:
    for name, text in systemd_units("%h/.local/bin/deployd").items():
        assert (REPOSITORY / "systemd" / name).read_text() == text, name


def test_socket_unit_matches_client_path() -> None:
    socket_unit = systemd_units("deployd")[unit_files.SOCKET_UNIT]
    lines = socket_unit.splitlines()
    # %t is $XDG_RUNTIME_DIR: the client's first choice is runtime_dir()/deployd/deployd.sock.
    assert "ListenStream=%t/deployd/deployd.sock" in lines
    assert "SocketMode=0600" in lines
    assert "DirectoryMode=0700" in lines


def test_service_unit_settings() -> None:
    lines = systemd_units("/opt/deployd")[unit_files.SERVICE_UNIT].splitlines()
    for setting in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/opt/deployd serve",
        "Restart=on-failure",
        "WatchdogSec=20s",
        "RestartPreventExitStatus=75 77 78",
    ):
        assert setting in lines


def test_repository_plist_matches_template() -> None:
    with open(REPOSITORY / "launchd" / "com.deployd.daemon.plist", "rb") as handle:
        agent = plistlib.load(handle)

    assert agent == launchd_agent(["/usr/local/bin/deployd"], "/Users/USER/Library/Logs/deployd")


def test_plist_has_launchd_keys() -> None:
    with open(REPOSITORY / "launchd" / "com.deployd.daemon.plist", "rb") as handle:
        agent = plistlib.load(handle)

    assert agent["Label"] == "com.deployd.daemon"
    assert agent["ProgramArguments"][-1] == "serve"
    assert os.path.isabs(agent["ProgramArguments"][0])
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["RunAtLoad"] is True
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert "/Library/Logs/deployd/" in agent[key]


# --- deployd service, with stand-ins for the service managers ---


class FakeTools:
    """A PATH directory of stand-in commands and the log of their calls."""

    def __init__(self, root: Path, names: tuple[str, ...]) -> None:
        self.bin = root / "fakebin"
        self.bin.mkdir()
        self.log = root / "calls.log"
        for name in names:
            path = self.bin / name
            path.write_text(FAKE_COMMAND)
            path.chmod(0o755)
        (self.bin / "deployd").symlink_to(VENV_DEPLOYD)

    def calls(self) -> list[str]:
        if not self.log.exists():
            return []
        return self.log.read_text().splitlines()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME and XDG_CONFIG_HOME, and a socket path where no daemon runs."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("DEPLOYD_SOCKET", str(tmp_path / "run" / "deployd.sock"))
    monkeypatch.setenv("DEPLOYD_NO_AUTOSTART", "1")
    for name in ("FAKE_FAIL", "FAKE_LAUNCHD_PID", "FAKE_MAIN_PID"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def make_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeTools]:
    def make(*names: str, system_path: bool = True) -> FakeTools:
        """Put stand-ins for ``names`` first on PATH; only them with ``system_path`` False."""
        tools = FakeTools(tmp_path, names)
        monkeypatch.setenv("PATH", f"{tools.bin}:/usr/bin:/bin" if system_path else str(tools.bin))
        monkeypatch.setenv("FAKE_LOG", str(tools.log))
        return tools

    return make


@pytest.fixture
def linux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as a Linux booted by systemd."""
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(user_service, "SYSTEMD_RUNTIME_DIR", str(booted))
    monkeypatch.setattr(user_service, "LINGER_DIR", str(tmp_path / "no-linger-dir"))


@pytest.fixture
def macos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")


def indented_block(output: str, header: str) -> str:
    """Return the indented lines that follow ``header`` in dry-run output, unindented."""
    lines = output.splitlines()
    start = lines.index(header) + 1
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).rstrip("\n") + "\n"


@pytest.mark.usefixtures("linux")
def test_dry_run_systemd(
    home: Path, make_tools: Callable[..., FakeTools], capsys: pytest.CaptureFixture[str]
) -> None:
    tools = make_tools("systemctl", "loginctl")

    code = cli.main(["service", "install", "--dry-run"])

    output = capsys.readouterr().out
    assert code == 0
    unit_dir = home / ".config" / "systemd" / "user"
    units = systemd_units(systemd_exec_path(str(tools.bin / "deployd")))
    for name, text in units.items():
        assert indented_block(output, f"would write {unit_dir / name}") == text
    commands = [line for line in output.splitlines() if line.startswith("would run ")]
    assert commands == [
        "would run systemctl --user daemon-reload",
        "would run systemctl --user enable --now deployd.socket",
        "would run systemctl --user try-restart deployd.service",
    ]
    assert "loginctl enable-linger" in output
    assert not unit_dir.exists()
    mutating = [call for call in tools.calls() if not call.startswith(("loginctl show-user",))]
    assert mutating == []


@pytest.mark.usefixtures("macos")
def test_dry_run_launchd(
    home: Path, make_tools: Callable[..., FakeTools], capsys: pytest.CaptureFixture[str]
) -> None:
    tools = make_tools("launchctl")

    code = cli.main(["service", "install", "--dry-run"])

    output = capsys.readouterr().out
    assert code == 0
    plist_path = home / "Library" / "LaunchAgents" / "com.deployd.daemon.plist"
    agent = plistlib.loads(indented_block(output, f"would write {plist_path}").encode())
    assert agent == launchd_agent(
        [str(tools.bin / "deployd")], str(home / "Library" / "Logs" / "deployd")
    )
    uid = os.getuid()
    commands = [line for line in output.splitlines() if line.startswith("would run ")]
    assert commands == [
        f"would run launchctl enable gui/{uid}/com.deployd.daemon",
        f"would run launchctl bootstrap gui/{uid} {plist_path}",
    ]
    assert f"would create {home}/Library/Logs/deployd" in output
    assert not plist_path.exists()
    assert not (home / "Library").exists()
    assert [call for call in tools.calls() if not call.startswith("launchctl print")] == []


@pytest.mark.usefixtures("macos")
def test_dry_run_launchd_without_launchctl(
    home: Path, make_tools: Callable[..., FakeTools], capsys: pytest.CaptureFixture[str]
) -> None:
    make_tools(system_path=False)

    code = cli.main(["service", "install", "--dry-run"])

    output = capsys.readouterr().out
    assert code == 0
    assert "note: a real install fails here: launchctl not found" in output


@pytest.mark.usefixtures("linux")
def test_install_status_uninstall_systemd(
    home: Path, make_tools: Callable[..., FakeTools], capsys: pytest.CaptureFixture[str]
) -> None:
    tools = make_tools("systemctl", "loginctl")
    unit_dir = home / ".config" / "systemd" / "user"

    assert cli.main(["service", "install"]) == 0
    install_output = capsys.readouterr().out

    expected = systemd_units(systemd_exec_path(str(tools.bin / "deployd")))
    for name, text in expected.items():
        assert (unit_dir / name).read_text() == text
        assert (unit_dir / name).stat().st_mode & 0o777 == 0o644
    assert tools.calls()[-3:] == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now deployd.socket",
        "systemctl --user try-restart deployd.service",
    ]
    assert f"loginctl enable-linger {user_service.user_name()}" in install_output

    assert cli.main(["service", "status"]) == 0
    status = capsys.readouterr().out
    assert f"installed: yes ({unit_dir})" in status
    assert "enabled:   enabled (deployd.socket)" in status
    assert "lingering: off" in status

    assert cli.main(["service", "uninstall"]) == 0
    capsys.readouterr()
    assert not (unit_dir / "deployd.socket").exists()
    assert not (unit_dir / "deployd.service").exists()
    assert "systemctl --user disable --now deployd.socket deployd.service" in tools.calls()

    assert cli.main(["service", "status"]) == user_service.NOT_RUNNING
    assert "installed: no" in capsys.readouterr().out


@pytest.mark.usefixtures("linux")
def test_status_reports_inactive_service(
    home: Path,
    make_tools: Callable[..., FakeTools],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_tools("systemctl", "loginctl")
    assert cli.main(["service", "install"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("FAKE_ACTIVE", "inactive")
    monkeypatch.setenv("FAKE_LINGER", "yes")

    code = cli.main(["service", "status"])

    captured = capsys.readouterr()
    assert code == user_service.NOT_RUNNING
    assert "deployd.socket inactive" in captured.out
    assert "lingering: on" in captured.out
    assert "run 'deployd service install'" in captured.err


@pytest.mark.usefixtures("linux")
def test_install_without_systemctl_exits_69(
    home: Path, make_tools: Callable[..., FakeTools], capsys: pytest.CaptureFixture[str]
) -> None:
    make_tools(system_path=False)

    code = cli.main(["service", "install"])

    captured = capsys.readouterr()
    assert code == 69
    assert captured.err.splitlines() == [
        "deployd: systemctl not found, so this system does not run systemd; run "
        "'deployd serve' from your session's start-up instead"
    ]
    assert not (home / ".config").exists()


def test_install_on_non_systemd_linux_exits_69(
    home: Path,
    make_tools: Callable[..., FakeTools],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_tools("systemctl")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(user_service, "SYSTEMD_RUNTIME_DIR", str(tmp_path / "not-booted"))

    code = cli.main(["service", "install"])

    captured = capsys.readouterr()
    assert code == 69
    assert len(captured.err.splitlines()) == 1
    assert "this Linux was not started by systemd" in captured.err
    assert not (home / ".config").exists()


@pytest.mark.usefixtures("linux")
def test_systemctl_failure_exits_69(
    home: Path,
    make_tools: Callable[..., FakeTools],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_tools("systemctl", "loginctl")
    monkeypatch.setenv("FAKE_FAIL", "--user daemon-reload")

    code = cli.main(["service", "install"])

    captured = capsys.readouterr()
    assert code == 69
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(
        "deployd: 'systemctl --user daemon-reload' failed with exit code 1: "
        "Failed to connect to bus: No medium found; systemctl cannot reach your user manager"
    )


@pytest.mark.usefixtures("macos")
def test_install_status_uninstall_launchd(
    home: Path,
    make_tools: Callable[..., FakeTools],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tools = make_tools("launchctl")
    plist_path = home / "Library" / "LaunchAgents" / "com.deployd.daemon.plist"
    uid = os.getuid()

    assert cli.main(["service", "install"]) == 0
    capsys.readouterr()

    with open(plist_path, "rb") as handle:
        assert plistlib.load(handle)["ProgramArguments"] == [str(tools.bin / "deployd"), "serve"]
    assert (home / "Library" / "Logs" / "deployd").is_dir()
    assert tools.calls()[-2:] == [
        f"launchctl enable gui/{uid}/com.deployd.daemon",
        f"launchctl bootstrap gui/{uid} {plist_path}",
    ]

    monkeypatch.setenv("FAKE_LAUNCHD_PID", "4242")
    assert cli.main(["service", "status"]) == 0
    status = capsys.readouterr().out
    assert "running:   running (pid 4242)" in status

    assert cli.main(["service", "uninstall"]) == 0
    assert not plist_path.exists()
    assert f"launchctl bootout gui/{uid}/com.deployd.daemon" in tools.calls()


class RuntimeDirWorkstation(Workstation):
    """A workstation whose socket is where the service's is: $XDG_RUNTIME_DIR/deployd/."""

    @property
    def socket(self) -> Path:
        return self.root / "runtime" / "deployd" / "deployd.sock"


@pytest.mark.usefixtures("linux")
def test_install_stops_daemon_outside_systemd(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    home: Path,
    make_tools: Callable[..., FakeTools],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A daemon that a client started is stopped, so the service can take over its leases."""
    root = make_workstation().root
    workstation = RuntimeDirWorkstation(root)
    daemon = start(workstation)
    make_tools("systemctl", "loginctl")
    monkeypatch.delenv("DEPLOYD_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root / "runtime"))

    code = cli.main(["service", "install"])

    output = capsys.readouterr().out
    assert code == 0
    assert f"stop pid {daemon.pid} with SIGTERM" in output
    assert daemon.process.wait(30) == 0


@pytest.mark.usefixtures("linux")
def test_install_leaves_daemon_on_moved_socket(
    workstation: Workstation,
    daemon: DaemonProcess,
    home: Path,
    make_tools: Callable[..., FakeTools],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A daemon on a DEPLOYD_SOCKET path does not compete with the service, so it keeps running."""
    make_tools("systemctl", "loginctl")
    monkeypatch.setenv("DEPLOYD_SOCKET", str(workstation.socket))

    code = cli.main(["service", "install"])

    output = capsys.readouterr().out
    assert code == 0
    assert "stop pid" not in output
    assert f"DEPLOYD_SOCKET is set to {workstation.socket}" in output
    assert daemon.answers()


def test_unknown_service_action_exits_64(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["service", "start"]) == 64
    assert "use one of install, uninstall, status" in capsys.readouterr().err


def test_service_on_other_platform_exits_69(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "platform", "freebsd14")

    assert cli.main(["service", "status"]) == 69
    assert "supports systemd (Linux) and launchd (macOS), not freebsd14" in capsys.readouterr().err
