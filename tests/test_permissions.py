"""Who may reach the daemon, and how the daemon guards its socket file.

The tests that act as another user run processes as ``nobody`` and so need
root. The client imports only the standard library, so it runs under any
Python 3.11 that ``nobody`` may execute, with ``client/`` on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import DaemonProcess, Workstation, wait_until

import deployd_client

OTHER_UID = 65534  # nobody
CLIENT_SOURCE = str(Path(deployd_client.__file__).resolve().parent.parent)

needs_root = pytest.mark.skipif(
    os.getuid() != 0, reason="running a process as another user needs root"
)
needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="lists processes through /proc"
)

# Connects as the other user, reads until the daemon closes the connection, and
# prints the lines it got as JSON.
READ_UNTIL_CLOSED = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect(sys.argv[1])
data = b""
while True:
    chunk = sock.recv(65536)
    if not chunk:
        break
    data += chunk
print(json.dumps(data.decode().splitlines()))
"""


def run_as_other_user(
    command: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as uid OTHER_UID with no supplementary groups."""
    return subprocess.run(
        command,
        env=env,
        user=OTHER_UID,
        group=OTHER_UID,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def other_user_python() -> str:
    """Return a Python 3.11+ interpreter that OTHER_UID may run."""
    if os.getuid() != 0:
        pytest.skip("running a process as another user needs root")
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        try:
            probe = run_as_other_user(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"uid {OTHER_UID} may run none of {candidates} as Python 3.11 or later")


def other_user_env(workstation: Workstation) -> dict[str, str]:
    """Return the workstation's client environment with autostart allowed."""
    env = workstation.env(PYTHONPATH=CLIENT_SOURCE, HOME="/nonexistent")
    del env["DEPLOYD_NO_AUTOSTART"]
    return env


def serve_processes(socket_path: Path) -> list[int]:
    """Return the pids of ``deployd serve`` processes started for ``socket_path``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_serve = b"deployd_client" in arguments and b"serve" in arguments
        if is_serve and f"DEPLOYD_SOCKET={socket_path}".encode() in environment:
            pids.append(int(entry.name))
    return pids


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """Return the inode, mode, owner and change time of ``path``, without following links."""
    info = os.lstat(path)
    return (info.st_ino, info.st_mode, info.st_uid, info.st_ctime_ns)


# --- a client of another user ---


@needs_root
@needs_linux
def test_other_user_client_gets_exit_77(
    workstation: Workstation, daemon: DaemonProcess, other_user_python: str
) -> None:
    socket_before = file_identity(workstation.socket)

    result = run_as_other_user(
        [other_user_python, "-m", "deployd_client", "status"], env=other_user_env(workstation)
    )

    assert result.returncode == 77, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(workstation.socket) in lines[0]
    assert "permission denied" in lines[0]
    assert "DEPLOYD_SOCKET" in lines[0], "the message should say how to fix it"
    assert file_identity(workstation.socket) == socket_before
    assert serve_processes(workstation.socket) == [daemon.pid]
    assert daemon.answers()


@needs_root
def test_other_user_rejected_by_peer_check(
    workstation: Workstation, daemon: DaemonProcess, other_user_python: str
) -> None:
    # Open the path to everyone, so that only the daemon's peer-uid check can reject the client.
    for directory in (workstation.root, workstation.socket.parent):
        directory.chmod(0o711)
    workstation.socket.chmod(0o666)

    result = run_as_other_user(
        [other_user_python, "-c", READ_UNTIL_CLOSED, str(workstation.socket)]
    )

    assert result.returncode == 0, result.stderr
    lines = json.loads(result.stdout)
    assert len(lines) == 1, lines
    response = json.loads(lines[0])
    assert response["ok"] is False
    assert response["error"]["code"] == "permission_denied"
    assert f"uid {OTHER_UID}" in response["error"]["message"]
    assert daemon.answers(), "the daemon stopped serving its own user"


@needs_root
def test_other_user_cli_rejected_by_peer_check(
    workstation: Workstation, daemon: DaemonProcess, other_user_python: str
) -> None:
    for directory in (workstation.root, workstation.socket.parent):
        directory.chmod(0o711)
    workstation.socket.chmod(0o666)

    result = run_as_other_user(
        [other_user_python, "-m", "deployd_client", "status"], env=other_user_env(workstation)
    )

    assert result.returncode == 77, result.stderr
    assert f"uid {OTHER_UID}" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert daemon.answers()


# --- the socket directory ---


@needs_root
def test_socket_dir_of_other_user_rejected(workstation: Workstation) -> None:
    directory = workstation.socket.parent
    directory.mkdir(mode=0o700)
    os.chown(directory, OTHER_UID, OTHER_UID)

    result = workstation.deployd("serve", timeout=60)

    assert result.returncode == 77, result.stderr
    assert f"socket directory {directory}" in result.stderr
    assert f"uid {OTHER_UID}" in result.stderr
    assert "DEPLOYD_SOCKET" in result.stderr
    assert not workstation.socket.exists()


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701, 0o777])
def test_socket_dir_open_to_others_rejected(workstation: Workstation, mode: int) -> None:
    directory = workstation.socket.parent
    directory.mkdir()
    directory.chmod(mode)

    result = workstation.deployd("serve", timeout=60)

    assert result.returncode == 77, result.stderr
    assert f"socket directory {directory} is open to other users" in result.stderr
    assert f"chmod 700 {directory}" in result.stderr
    assert not workstation.socket.exists()
    assert stat.S_IMODE(directory.stat().st_mode) == mode, "the daemon changed the mode itself"


def test_socket_dir_created_private(workstation: Workstation, daemon: DaemonProcess) -> None:
    directory_mode = stat.S_IMODE(workstation.socket.parent.stat().st_mode)
    socket_mode = stat.S_IMODE(workstation.socket.stat().st_mode)
    assert directory_mode == 0o700
    assert socket_mode == 0o600


# --- what sits at the socket path ---


def make_regular_file(path: Path) -> None:
    path.write_text("keep me\n")


def make_directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("keep me\n")


def make_symlink(path: Path) -> None:
    target = path.parent / "elsewhere.sock"
    target.write_text("keep me\n")
    path.symlink_to(target)


@pytest.mark.parametrize(
    "make_obstacle",
    [make_regular_file, make_directory, make_symlink],
    ids=["regular-file", "directory", "symlink"],
)
def test_non_socket_at_path_is_kept(
    workstation: Workstation, make_obstacle: Callable[[Path], None]
) -> None:
    workstation.socket.parent.mkdir(mode=0o700)
    make_obstacle(workstation.socket)
    before = file_identity(workstation.socket)

    result = workstation.deployd("serve", timeout=60)

    assert result.returncode != 0, result.stderr
    assert f"{workstation.socket} exists and is not a socket" in result.stderr
    assert "DEPLOYD_SOCKET" in result.stderr
    assert file_identity(workstation.socket) == before


# --- a second daemon, and a dead one ---


@needs_linux
def test_second_daemon_refused(workstation: Workstation, daemon: DaemonProcess) -> None:
    socket_before = file_identity(workstation.socket)

    result = workstation.deployd("serve", timeout=60)

    assert result.returncode == 75, result.stderr
    assert f"another deployd daemon (pid {daemon.pid}) already runs" in result.stderr
    assert str(workstation.socket) in result.stderr
    assert file_identity(workstation.socket) == socket_before
    assert serve_processes(workstation.socket) == [daemon.pid]
    hello = workstation.request("hello")
    assert hello["result"]["pid"] == daemon.pid


def test_second_daemon_keeps_first_lease(workstation: Workstation, daemon: DaemonProcess) -> None:
    with subprocess.Popen(["cat"], stdin=subprocess.PIPE) as shell:
        try:
            acquired = workstation.deployd("acquire", "api", "--pid", str(shell.pid))
            assert acquired.returncode == 0, acquired.stderr

            result = workstation.deployd("serve", timeout=60)
            assert result.returncode == 75, result.stderr

            busy = workstation.deployd("acquire", "api", "--pid", str(shell.pid))
            assert busy.returncode == 75, "the lease of the first daemon was disturbed"
        finally:
            assert shell.stdin is not None
            shell.stdin.close()
            shell.wait(30)


def test_stale_socket_reclaimed(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    first = start(workstation)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
    assert stat.S_ISSOCK(os.lstat(workstation.socket).st_mode), "no stale socket file was left"

    refused = workstation.deployd("status")
    assert refused.returncode == 69, refused.stderr
    assert stat.S_ISSOCK(os.lstat(workstation.socket).st_mode), "the client removed the socket"

    second = start(workstation)

    assert second.answers()
    assert workstation.request("hello")["result"]["pid"] == second.pid
    wait_until(lambda: "removing stale socket file" in second.log())
