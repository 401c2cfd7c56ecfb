"""Socket paths too long for a Unix socket address (108 bytes on Linux, 104 elsewhere).

On Linux the client and the daemon both reach such a socket through
``/proc/self/fd/N/NAME``; elsewhere both reject it with SocketPathTooLong.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import DaemonProcess, Workstation

from deployd_client import paths
from deployd_client.paths import SocketPathTooLong, socket_address

LINUX = sys.platform.startswith("linux")
# The limit of sun_path without its terminating NUL byte on macOS and the BSDs.
NON_LINUX_LIMIT = 103

needs_linux = pytest.mark.skipif(not LINUX, reason="long socket paths work through /proc only")


class DeepWorkstation(Workstation):
    """A workstation whose socket path is too long for a Unix socket address."""

    @property
    def socket(self) -> Path:
        return self.root / ("d" * 60) / ("e" * 60) / "deployd.sock"


@pytest.fixture
def deep_workstation(make_workstation: Callable[..., Workstation]) -> DeepWorkstation:
    workstation = make_workstation()
    deep = DeepWorkstation(workstation.root, workstation.settings)
    assert len(os.fsencode(str(deep.socket))) > paths.MAX_SOCKET_PATH_BYTES
    return deep


@needs_linux
def test_daemon_serves_long_path(
    deep_workstation: DeepWorkstation, start: Callable[..., DaemonProcess]
) -> None:
    start(deep_workstation)

    assert stat.S_ISSOCK(os.lstat(deep_workstation.socket).st_mode)
    status = deep_workstation.deployd("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["socket"] == str(deep_workstation.socket)

    run = deep_workstation.deployd("run", "api", "--", "sh", "-c", "exit 4")
    assert run.returncode == 4, run.stderr


@needs_linux
def test_client_reports_no_daemon_on_long_path(deep_workstation: DeepWorkstation) -> None:
    result = deep_workstation.deployd("status")
    assert result.returncode == 69, result.stderr
    assert str(deep_workstation.socket) in result.stderr


@needs_linux
def test_daemon_removes_long_socket_on_stop(
    deep_workstation: DeepWorkstation, start: Callable[..., DaemonProcess]
) -> None:
    daemon = start(deep_workstation)
    assert daemon.stop() == 0
    assert not deep_workstation.socket.exists()


def test_short_path_used_as_is() -> None:
    path = "/tmp/deployd-test/deployd.sock"
    with socket_address(path) as address:
        assert address == path


@needs_linux
def test_long_path_goes_through_proc(tmp_path: Path) -> None:
    directory = tmp_path / ("x" * 120)
    directory.mkdir()
    path = str(directory / "deployd.sock")

    with socket_address(path) as address:
        assert address.startswith("/proc/self/fd/")
        assert address.endswith("/deployd.sock")
        descriptor = int(address.split("/")[4])
        assert os.path.samefile(f"/proc/self/fd/{descriptor}", directory)

    with pytest.raises(OSError):
        os.fstat(descriptor)


@needs_linux
def test_long_path_in_missing_dir(tmp_path: Path) -> None:
    path = str(tmp_path / ("x" * 120) / "deployd.sock")
    with pytest.raises(FileNotFoundError), socket_address(path):
        pass


def test_long_path_rejected_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "sys", types.SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(paths, "MAX_SOCKET_PATH_BYTES", NON_LINUX_LIMIT)
    path = "/tmp/" + "d" * 100 + "/deployd.sock"
    length = len(os.fsencode(path))

    with pytest.raises(SocketPathTooLong) as caught, socket_address(path):
        pass

    message = str(caught.value)
    assert caught.value.path == path
    assert f"is {length} bytes long" in message
    assert f"at most {NON_LINUX_LIMIT}" in message
    assert "set DEPLOYD_SOCKET to a shorter path" in message


def test_path_at_limit_used_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "sys", types.SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(paths, "MAX_SOCKET_PATH_BYTES", NON_LINUX_LIMIT)
    path = "/tmp/" + "d" * (NON_LINUX_LIMIT - len("/tmp/") - len("/s")) + "/s"
    assert len(path) == NON_LINUX_LIMIT

    with socket_address(path) as address:
        assert address == path


def test_limit_counts_bytes_not_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "sys", types.SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(paths, "MAX_SOCKET_PATH_BYTES", NON_LINUX_LIMIT)
    # 60 two-byte characters: 120 bytes, but only 60 characters.
    path = "/tmp/" + "\u00e9" * 60 + "/s"
    assert len(path) < NON_LINUX_LIMIT

    with pytest.raises(SocketPathTooLong), socket_address(path):
        pass
