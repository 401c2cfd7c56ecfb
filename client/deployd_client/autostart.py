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
# How long after a failed start a client that keeps trying (a waiting acquire,
# a run re-attaching to its lease) waits before it starts another daemon.
START_RETRY_INTERVAL = 2.0


def log_path() -> str:
    """Return the file that an automatically started daemon logs to."""
    return os.path.join(paths.state_dir(), "deployd.log")


def connect(autostart: bool = True, timeout: float = START_TIMEOUT) -> Connection:
    """Connect to the daemon; start one in the background first if none answers.

    Nothing is started when ``autostart`` is False or DEPLOYD_NO_AUTOSTART is
    set; NoDaemon is raised then. A socket that exists but is not accessible
    raises SocketPermissionDenied and is left alone. A daemon that this
    process started and that has neither come up nor failed within
    ``timeout`` is waited for by the next call instead of starting another;
    DaemonStartFailed carries its exit code (None while it runs) and why it
    failed (its ``deployd serve:`` line). Within START_RETRY_INTERVAL
    of such a failure, the same DaemonStartFailed is raised again instead of
    starting another daemon.
    """
    global _starting, _last_failure
    path = paths.socket_path()
    try:
        return Connection.connect(path)
    except NoDaemon:
        if not autostart or no_autostart():
            raise
    if _last_failure is not None and time.monotonic() - _last_failure[0] < START_RETRY_INTERVAL:
        raise _last_failure[1]
    start = _starting if _starting is not None else _Start()
    _starting = start
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            connection = Connection.connect(path)
        except NoDaemon:
            pass
        else:
            _starting = None
            return connection
        exit_code = start.process.poll()
        if exit_code == 75:
            # Another daemon won the race to start; keep connecting to it.
            _starting = None
        elif exit_code is not None:
            _starting = None
            failure = DaemonStartFailed(start.failure(path, exit_code), exit_code)
            _last_failure = (time.monotonic(), failure)
            raise failure
        if time.monotonic() >= deadline:
            raise DaemonStartFailed(start.failure(path, exit_code), exit_code)
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class _Start:
    """One daemon started in the background, with where its lines begin in the log."""

    def __init__(self) -> None:
        # The daemon runs in /, where a relative path names another file.
        # paths rejects a relative DEPLOYD_CONFIG here and DEPLOYD_STATE_DIR in
        # log_path(), before a daemon starts; both sides ignore relative XDG_*.
        paths.config_path()
        self.log_offset = _log_size()
        self.started_at = time.monotonic()
        self.process = start_daemon()

    def failure(self, path: str, exit_code: int | None) -> str:
        """Describe why the daemon did not come up (yet)."""
        waited = time.monotonic() - self.started_at
        return _start_failure(path, exit_code, self.log_offset, waited)


# The daemon this process started last, while it has neither accepted a connection nor exited.
_starting: _Start | None = None
# When the last daemon this process started exited without serving, and why.
_last_failure: tuple[float, DaemonStartFailed] | None = None


class DaemonStartFailed(NoDaemon):
    """A daemon was started for this call but did not come up; ``exit_code`` is its own."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        self.exit_code = exit_code
        super().__init__(message)


# Variables that describe the caller's own lease. A daemon started from inside
# a deploy serves every later caller too, so it must not carry them.
# DEPLOYD_LEASE_TTL is not one of them: it sets the daemon's lease.ttl.
_LEASE_VARIABLES = (
    "DEPLOYD_LEASE_ID",
    "DEPLOYD_FENCING_TOKEN",
    "DEPLOYD_LEASE_DEPTH",
    "DEPLOYD_LOCK",
    "DEPLOYD_OUTER_LEASES",
    "DEPLOYD_LEASE_OWNER",
)


def _daemon_environment() -> dict[str, str]:
    """Return the environment for a daemon started by this client."""
    env = dict(os.environ)
    for name in _LEASE_VARIABLES:
        env.pop(name, None)
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


def _start_failure(path: str, exit_code: int | None, log_offset: int, waited: float) -> str:
    """Describe a failed start, quoting what this start wrote to the log (not older lines)."""
    from deployd_client.redaction import mask_secrets

    log = log_path()
    tail = ""
    try:
        with open(log, "rb") as handle:
            handle.seek(log_offset)
            lines = handle.read().decode("utf-8", "replace").splitlines()
        # A daemon that refuses to start says why on its last "deployd serve:" line.
        reasons = [line for line in lines if line.startswith("deployd serve: ")]
        if reasons:
            return mask_secrets(reasons[-1].removeprefix("deployd serve: "))
        if lines:
            tail = ": " + " | ".join(line.strip() for line in lines[-3:])
    except OSError:
        pass
    tail = mask_secrets(tail)
    if exit_code is None:
        return (
            f"started a deployd daemon but it did not respond on {path} within "
            f"{waited:.1f}s; see {log}{tail}"
        )
    return f"could not start a deployd daemon (exit code {exit_code}); see {log}{tail}"


def restart_command(pid: object, under_systemd: bool | None = None) -> str:
    """Return how to restart the daemon with ``pid``: through its service manager, or SIGTERM.

    ``under_systemd`` None means: judge by the process's control group. A
    daemon started by a client keeps the leases of running deploys when it
    stops on SIGTERM, and the next deployd command starts a new one.
    """
    if under_systemd is None:
        under_systemd = run_by_systemd(pid)
    if under_systemd:
        return "systemctl --user restart deployd.service"
    if sys.platform == "darwin":
        from deployd_client.unit_files import LAUNCHD_LABEL

        agent = os.path.expanduser(f"~/Library/LaunchAgents/{LAUNCHD_LABEL}.plist")
        if os.path.exists(agent):
            return f"launchctl kickstart -k gui/{os.getuid()}/{LAUNCHD_LABEL}"
    target = pid if isinstance(pid, int) else "PID"
    return f"kill -TERM {target}; the next deployd command starts it again"


def explain_restart(text: str, pid: object) -> str:
    """Return ``text`` with its first "restart the daemon" followed by how, in brackets."""
    phrase = "restart the daemon"
    if phrase not in text:
        return text
    return text.replace(phrase, f"{phrase} ({restart_command(pid)})", 1)


def run_by_systemd(pid: object) -> bool:
    """Return whether ``pid`` runs in the control group of deployd's systemd service (Linux)."""
    if not isinstance(pid, int) or not sys.platform.startswith("linux"):
        return False
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as handle:
            groups = handle.read()
    except OSError:
        return False
    return "/deployd.service" in groups
