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
            raise NoDaemon(_start_failure(path, exit_code))
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


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
            start_new_session=True,
        )
    finally:
        os.close(log_fd)


def _start_failure(path: str, exit_code: int | None) -> str:
    log = log_path()
    tail = ""
    try:
        with open(log, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()[-3:]
        if lines:
            tail = ": " + " | ".join(line.strip() for line in lines)
    except OSError:
        pass
    if exit_code is None:
        return (
            f"started a deployd daemon but it did not respond on {path} within "
            f"{START_TIMEOUT:g}s; see {log}{tail}"
        )
    return f"could not start a deployd daemon (exit code {exit_code}); see {log}{tail}"
