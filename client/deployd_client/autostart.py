"""Connecting to the daemon, starting it in the background when none answers."""

from __future__ import annotations

import os
import sys
import time

from deployd_client import paths
from deployd_client.protocol import Connection, NoDaemon, no_autostart

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    import subprocess

START_TIMEOUT = 5.0


def log_path() -> str:
    """Return the file that an automatically started daemon logs to."""
    return os.path.join(paths.state_dir(), "deployd.log")


def connect(autostart: bool = True, timeout: float = START_TIMEOUT) -> Connection:
    """Connect to the daemon; start one in the background first if none answers.

    Nothing is started when ``autostart`` is False or DEPLOYD_NO_AUTOSTART is
    set; NoDaemon is raised then. A socket that exists but is not accessible
    raises SocketPermissionDenied and is left alone.
    """
    path = paths.socket_path()
    try:
        return Connection.connect(path)
    except NoDaemon:
        if not autostart or no_autostart():
            raise
    log_offset = _log_size()
    process = start_daemon()
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return Connection.connect(path)
        except NoDaemon:
            pass
        exit_code = process.poll()
        # Exit code 75 means another daemon won the race to start; keep connecting to it.
        if exit_code not in (None, 75) or time.monotonic() >= deadline:
            raise DaemonStartFailed(_start_failure(path, exit_code, log_offset), exit_code)
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class DaemonStartFailed(NoDaemon):
    """A daemon was started for this call but did not come up; ``exit_code`` is its own."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        self.exit_code = exit_code
        super().__init__(message)


# Variables that name paths: the daemon runs in /, so relative values are made
# absolute before it starts, or it would look in a different place.
_PATH_VARIABLES = (
    "DEPLOYD_SOCKET",
    "DEPLOYD_STATE_DIR",
    "DEPLOYD_CONFIG",
    "XDG_RUNTIME_DIR",
    "XDG_STATE_HOME",
    "XDG_CONFIG_HOME",
)


# Variables that describe the caller's own lease. A daemon started from inside
# a deploy serves every later caller too, so it must not carry them.
_LEASE_VARIABLES = (
    "DEPLOYD_LEASE_ID",
    "DEPLOYD_FENCING_TOKEN",
    "DEPLOYD_LEASE_DEPTH",
    "DEPLOYD_LEASE_TTL",
    "DEPLOYD_LOCK",
)


def _daemon_environment() -> dict[str, str]:
    """Return the environment for a daemon started by this client."""
    env = dict(os.environ)
    for name in _LEASE_VARIABLES:
        env.pop(name, None)
    for name in _PATH_VARIABLES:
        value = env.get(name)
        if value:
            env[name] = os.path.abspath(value)
    return env


def _log_size() -> int:
    try:
        return os.path.getsize(log_path())
    except OSError:
        return 0


def start_daemon() -> subprocess.Popen[bytes]:
    """Start ``deployd serve`` detached from this process, logging to ``log_path()``."""
    import subprocess  # only here: it costs every other call time to import

    log = log_path()
    os.makedirs(os.path.dirname(log), mode=0o700, exist_ok=True)
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "deployd_client", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            cwd="/",
            env=_daemon_environment(),
            start_new_session=True,
        )
    finally:
        os.close(log_fd)


def _start_failure(path: str, exit_code: int | None, log_offset: int) -> str:
    """Describe a failed start, quoting what this start wrote to the log (not older lines)."""
    log = log_path()
    tail = ""
    try:
        with open(log, "rb") as handle:
            handle.seek(log_offset)
            lines = handle.read().decode("utf-8", "replace").splitlines()
        # A daemon that refuses to start says why on its last "deployd serve:" line.
        reasons = [line for line in lines if line.startswith("deployd serve: ")]
        if reasons:
            return reasons[-1].removeprefix("deployd serve: ")
        if lines:
            tail = ": " + " | ".join(line.strip() for line in lines[-3:])
    except OSError:
        pass
    if exit_code is None:
        return (
            f"started a deployd daemon but it did not respond on {path} within "
            f"{START_TIMEOUT:g}s; see {log}{tail}"
        )
    return f"could not start a deployd daemon (exit code {exit_code}); see {log}{tail}"
