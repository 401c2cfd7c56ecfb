"""``deployd doctor``: check what deploys through deployd depend on, and print what to fix.

Checks the socket (path, directory owner and mode, a stale file), the daemon
(does it respond, its version and pid), the store (reachable, latency), the
clock offset to the store and a configured ``clock_offset``, Slack
(configured, stopped by a rejection), lingering of the systemd user service,
the config file, and, only when there are some, the variables that deployd
ignores (an unknown DEPLOYD_*, a relative XDG_*). It starts no daemon and
changes nothing.

Each check prints one line: ``ok``, ``warn`` (works, but worth a look) or
``FAIL`` (deploys are or will be affected), with a ``fix:`` line under each
warning and failure. The exit code is 0 when no check failed, warnings
included, and 1 when at least one did.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import sys

from deployd_client import __version__, exitcodes, paths
from deployd_client.autostart import explain_restart, restart_command, run_by_systemd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from deployd.config import Config
    from deployd_client.options import Arguments

# Exit code when at least one check failed.
PROBLEMS_FOUND = 1
# How long the daemon may take to respond to hello and to status.
HELLO_TIMEOUT = 5.0
STATUS_TIMEOUT = 15.0
# Above these, the store's latency and the clock offset are worth a warning.
SLOW_STORE_SECONDS = 1.0
CLOCK_OFFSET_WARNING = 1.0

OK, WARN, FAIL = "ok", "warn", "FAIL"


class Check:
    """The outcome of one check: its level, what was found, and the fix for a problem."""

    def __init__(self, name: str, level: str, detail: str, fix: str | None = None) -> None:
        self.name = name
        self.level = level
        self.detail = detail
        self.fix = fix


def run(args: Arguments) -> int:
    """Run every check, print the report, and return the exit code."""
    checks = collect_checks()
    name_width = max(len(check.name) for check in checks) + 2
    for check in checks:
        first, *more = check.detail.splitlines() or [""]
        print(f"{check.level.ljust(6)}{check.name.ljust(name_width)}{first}")
        for line in more:
            print(f"{' ' * (6 + name_width)}{line}")
        if check.fix and check.level != OK:
            print(f"{' ' * (6 + name_width)}fix: {check.fix}")
    failed = sum(check.level == FAIL for check in checks)
    warned = sum(check.level == WARN for check in checks)
    print(f"{_count(failed, 'problem')}, {_count(warned, 'warning')}")
    return PROBLEMS_FOUND if failed else exitcodes.OK


def collect_checks() -> list[Check]:
    """Return the checks in the order they are printed."""
    config, config_failure = read_config()
    environment = check_environment()
    try:
        path = paths.socket_path()
    except paths.PathError as exc:
        # Neither a client nor a daemon can use the socket: nothing else to check there.
        checks = [Check("socket", FAIL, str(exc)), check_config(config, config_failure, None)]
        return checks if environment is None else [*checks, environment]
    socket_check, reachable = check_socket(path)
    checks = [socket_check]
    hello: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    if reachable:
        daemon_check, hello, status = check_daemon(path)
        checks.append(daemon_check)
    if status is not None:
        checks += [check_store(status), check_clock(status, config, hello), check_slack(status)]
    else:
        checks.append(
            Check(
                "store",
                WARN,
                "not checked, nor the clock offset and Slack: no daemon responded",
                _start_fix(),
            )
        )
    linger = check_linger()
    if linger is not None:
        checks.append(linger)
    checks.append(check_config(config, config_failure, hello))
    if environment is not None:
        checks.append(environment)
    return checks


# --- socket and daemon ---


def check_socket(path: str) -> tuple[Check, bool]:
    """Check the socket directory and file; return the check and whether a connect worked."""
    directory = os.path.dirname(path)
    where = f"{path} [{_socket_origin()}]"
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return _no_daemon(f"{where}: no socket directory yet, so no daemon has run"), False
    except OSError as exc:
        return Check("socket", FAIL, f"{where}: cannot read {directory}: {exc.strerror}"), False
    if info.st_uid != os.getuid():
        return (
            Check(
                "socket",
                FAIL,
                f"{where}: the directory {directory} belongs to uid {info.st_uid}, not to you "
                f"(uid {os.getuid()})",
                f"remove {directory}, or set DEPLOYD_SOCKET to a path in a directory of your own",
            ),
            False,
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (
            Check(
                "socket",
                FAIL,
                f"{where}: the directory {directory} is open to other users (mode {mode:o}), so "
                "the daemon refuses to start",
                f"chmod 700 {directory}",
            ),
            False,
        )
    return _check_socket_file(path, where)


def _check_socket_file(path: str, where: str) -> tuple[Check, bool]:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return _no_daemon(f"{where}: no socket file, so no daemon runs"), False
    if not stat.S_ISSOCK(info.st_mode):
        return (
            Check(
                "socket",
                FAIL,
                f"{where}: a file that is not a socket is in the way",
                f"move {path} away; the daemon does not touch it",
            ),
            False,
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(HELLO_TIMEOUT)
    try:
        with paths.socket_address(path) as address:
            probe.connect(address)
    except OSError as exc:
        return _connect_failure(path, where, exc), False
    finally:
        probe.close()
    detail = f"{where}; directory 700, yours"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (
            Check(
                "socket",
                WARN,
                f"{detail}; the socket's mode is {mode:o}, not 600",
                f"chmod 600 {path}",
            ),
            True,
        )
    return Check("socket", OK, detail), True


def _connect_failure(path: str, where: str, exc: OSError) -> Check:
    if exc.errno == errno.ECONNREFUSED:
        # A warning, not a failure: the next daemon to start removes the file itself.
        return Check(
            "socket",
            WARN,
            f"{where}: stale socket file: no daemon listens on it (a daemon was killed, or "
            "it stopped without removing it)",
            f"rm {path}; the next deployd command then starts a daemon (a starting daemon "
            "also removes a stale socket file itself)",
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Check(
            "socket",
            FAIL,
            f"{where}: permission denied: the socket belongs to another user",
            "set DEPLOYD_SOCKET to a path in a directory of your own",
        )
    return Check("socket", FAIL, f"{where}: cannot connect: {exc.strerror or exc}")


def _no_daemon(detail: str) -> Check:
    if os.environ.get("DEPLOYD_NO_AUTOSTART"):
        return Check(
            "socket",
            FAIL,
            f"{detail}, and DEPLOYD_NO_AUTOSTART is set, so no command starts one",
            _start_fix(),
        )
    return Check("socket", WARN, f"{detail}; the next deployd command starts one", _start_fix())


def _start_fix() -> str:
    return "run 'deployd service install' (or 'deployd serve') to keep a daemon running"


def check_daemon(path: str) -> tuple[Check, dict[str, Any] | None, dict[str, Any] | None]:
    """Check that the daemon responds; return the check, its hello and its status."""
    from deployd_client.protocol import ClientError, Connection, DaemonError, NoDaemon

    try:
        with Connection.connect(path) as connection:
            hello = connection.request("hello", timeout=HELLO_TIMEOUT)
            status = connection.request("status", timeout=STATUS_TIMEOUT)
    except DaemonError as exc:
        return Check("daemon", FAIL, f"the daemon returned an error: {exc}"), None, None
    except (ClientError, NoDaemon, OSError) as exc:
        return (
            Check(
                "daemon",
                FAIL,
                f"the socket accepts connections, but no daemon responded: {exc}",
                _log_fix(),
            ),
            None,
            None,
        )
    pid = hello.get("pid")
    version = hello.get("version")
    uptime = hello.get("uptime")
    detail = f"pid {pid}, deployd {version}"
    if isinstance(uptime, int | float):
        from deployd_client.durations import format_duration

        detail += f", up {format_duration(float(uptime))}"
    manager = _service_manager_of(pid)
    if manager:
        detail += f", run by {manager}"
    if version != __version__:
        return (
            Check(
                "daemon",
                WARN,
                f"{detail}, but this command is deployd {__version__}",
                f"restart the daemon to run the installed version: {restart_command(pid)} "
                "(running deploys keep their leases)",
            ),
            hello,
            status,
        )
    return Check("daemon", OK, detail), hello, status


def _service_manager_of(pid: object) -> str | None:
    """Return which service unit runs ``pid``, judged by its control group, or None."""
    return "systemd (deployd.service)" if run_by_systemd(pid) else None


def _log_fix() -> str:
    try:
        log = os.path.join(paths.state_dir(), "deployd.log")
    except paths.PathError:
        # The config check reports the relative DEPLOYD_STATE_DIR.
        log = "deployd.log in the daemon's state directory"
    if shutil.which("systemctl") is not None:
        return (
            "see 'systemctl --user status deployd.service' and 'journalctl --user -u deployd', "
            f"or the log {log}"
        )
    return f"see the log {log}"


# --- what the daemon reports ---


def check_store(status: dict[str, Any]) -> Check:
    """Check that the store is reachable, and how fast."""
    store = status.get("store") or {}
    where = f"{store.get('kind')} at {store.get('location')}"
    latency = store.get("latency")
    if not store.get("reachable"):
        return Check(
            "store",
            FAIL,
            f"{where}: unreachable: {store.get('error')}",
            "check the network and the store's credentials; until then on_store_error "
            "decides whether deploys go ahead without a lock",
        )
    if isinstance(latency, int | float) and latency > SLOW_STORE_SECONDS:
        return Check(
            "store",
            WARN,
            f"{where}: reachable, but the last call took {latency:.2f}s",
            "check the network to the store; slow calls slow every acquire",
        )
    timing = f" in {latency * 1000:.1f} ms" if isinstance(latency, int | float) else ""
    return Check("store", OK, f"{where}: reachable{timing}")


def check_clock(
    status: dict[str, Any], config: Config | None = None, hello: dict[str, Any] | None = None
) -> Check:
    """Check the offset between this machine's clock and the store's.

    A ``clock_offset`` in ``config`` moves the daemon's clock on purpose, to
    test a wrong clock, and is reported as such when the daemon reads the same
    config file.
    """
    offset = (status.get("store") or {}).get("clock_offset")
    # NOTE: this is the clock_offset of the file and this shell's environment as
    # they are now; the daemon keeps the one it started with.
    daemon_file = (hello or {}).get("config_file")
    if config is not None and config.clock_offset and daemon_file == config.file:
        # SQLite judges expiry by this machine's boot-time clock, so its offset
        # is always 0 and does not reflect clock_offset.
        measured = None if (status.get("store") or {}).get("kind") == "sqlite" else offset
        return _configured_offset(measured, config, hello)
    if not isinstance(offset, int | float):
        return Check("clock", OK, "offset to the store's clock not measured yet")
    detail = f"offset to the store's clock {offset:+.3f}s"
    if abs(offset) > CLOCK_OFFSET_WARNING:
        return Check(
            "clock",
            WARN,
            f"{detail}; expiry is judged by the store's clock, but times shown here are off",
            _NTP_FIX,
        )
    return Check("clock", OK, detail)


_NTP_FIX = "synchronise this machine's clock (NTP: 'timedatectl set-ntp true' on systemd)"


def _configured_offset(offset: object, config: Config, hello: dict[str, Any] | None) -> Check:
    """Report a configured ``clock_offset``, a setting for tests, and the offset left without it."""
    from deployd.reload import describe_value

    configured = config.clock_offset
    source = config.sources.get("clock_offset", "the config")
    detail = (
        f"clock_offset = {describe_value(configured, 'clock_offset')} is set ({source}): it "
        "moves this daemon's clock on purpose, and is meant for tests only"
    )
    if source.startswith("DEPLOYD_"):
        fix = f"unset {source}"
    else:
        fix = f"remove clock_offset from {config.file}"
    fix += ", unless this daemon serves a test, then restart the daemon"
    if isinstance(offset, int | float):
        # The store's clock minus the daemon's, which runs ``configured`` ahead.
        actual = offset + configured
        detail += (
            f"\noffset to the store's clock {offset:+.3f}s, {actual:+.3f}s without clock_offset"
        )
        if abs(actual) > CLOCK_OFFSET_WARNING:
            fix += f"; and {_NTP_FIX}"
    return Check("clock", WARN, detail, explain_restart(fix, (hello or {}).get("pid")))


def check_slack(status: dict[str, Any]) -> Check:
    """Check whether Slack is configured and still delivering."""
    notifications = status.get("notifications") or {}
    if not notifications.get("configured"):
        return Check("slack", OK, f"off: {notifications.get('hint') or 'no credentials'}")
    where = f"{notifications.get('mode')} to {notifications.get('channel')}"
    problem = notifications.get("problem")
    if isinstance(problem, dict):
        pid = (status.get("daemon") or {}).get("pid")
        return Check(
            "slack",
            FAIL,
            f"{where}: delivery stopped: {problem.get('message')}",
            _slack_fix(str(problem.get("fix") or "fix the Slack settings"), pid),
        )
    if notifications.get("error"):
        return Check("slack", WARN, f"{where}: {notifications['error']}", _log_fix())
    queued = notifications.get("queued") or 0
    failed = notifications.get("failed") or 0
    last_error = notifications.get("last_error")
    if failed:
        # Failed messages were dropped for good, so a person has to look.
        return Check(
            "slack",
            WARN,
            f"{where}: {_count(failed, 'message')} not delivered in the last 7 days "
            f"({notifications.get('sent', 0)} sent); last error: {last_error or 'unknown'}",
            notifications.get("last_error_fix") or "see the daemon log for each message's error",
        )
    if queued and last_error:
        return Check(
            "slack",
            WARN,
            f"{where}: {queued} messages queued; last error: {last_error}",
            "the daemon retries; if it lasts, check the network to Slack",
        )
    return Check("slack", OK, f"{where}: delivering ({notifications.get('sent', 0)} sent)")


def _slack_fix(fix: str, pid: object) -> str:
    """Return the notifier's fix, which ends in a restart of the daemon, saying how to restart."""
    if "restart the daemon" not in fix:
        fix += ", then restart the daemon"
    return f"{explain_restart(fix, pid)}; the new daemon sends the held messages"


# --- lingering and config ---


def check_linger() -> Check | None:
    """Check lingering when deployd runs as a systemd user service; None when not relevant."""
    if not sys.platform.startswith("linux"):
        return None
    from deployd_client.user_service import SystemdUser, linger_state, user_name

    manager = SystemdUser()
    if not os.path.exists(manager.unit_path("deployd.socket")):
        return Check("linger", OK, "not relevant: deployd is not a systemd user service here")
    state = linger_state()
    if state is None:
        return Check("linger", WARN, "unknown: loginctl gave no answer")
    if state:
        return Check("linger", OK, "on: the service keeps running after you log out")
    return Check(
        "linger",
        WARN,
        "off: the service stops when your last session ends, and deploys left running "
        "then lose their lock after its TTL",
        f"loginctl enable-linger {user_name()}",
    )


def read_config() -> tuple[Config | None, Check | None]:
    """Read the config as a daemon started from here would; return it, or why that failed."""
    try:
        from deployd.config import load_config
        from deployd.errors import ConfigError
        from deployd.notifiers.credentials import load_credentials
    except ImportError as exc:
        return None, Check("config", WARN, f"not checked: the daemon's package is missing ({exc})")
    try:
        config = load_config()
        load_credentials(config.slack)
    except ConfigError as exc:
        # One line for each invalid key; ConfigError masks secrets in its message.
        problems = exc.problems
        where = exc.source or _config_file(exc.key)
        return None, Check(
            "config",
            FAIL,
            "\n".join(str(problem) for problem in problems),
            f"fix {'the values' if len(problems) > 1 else 'the value'} ({where}), then run "
            "'deployd config check'; until then a running daemon keeps the config it has, and "
            "a new daemon cannot start",
        )
    return config, None


def check_config(
    config: Config | None, failure: Check | None, hello: dict[str, Any] | None
) -> Check:
    """Check that the config is valid; ``config`` and ``failure`` come from read_config()."""
    if failure is not None or config is None:
        return failure or Check("config", WARN, "not checked")
    detail = f"{config.file} is valid" if config.file else "no config file: the defaults apply"
    daemon_file = (hello or {}).get("config_file")
    if hello is not None and daemon_file != config.file:
        return Check(
            "config",
            WARN,
            f"{detail}, but the daemon reads {daemon_file or 'no file'}",
            "give the daemon and your shell the same DEPLOYD_CONFIG, or none",
        )
    return Check("config", OK, detail)


def _config_file(fallback: str) -> str:
    """Return the config file a daemon started from here would read, or ``fallback``."""
    try:
        return paths.config_path()
    except paths.PathError:
        return fallback


def check_environment() -> Check | None:
    """Check for variables that deployd ignores, such as a misspelt DEPLOYD_*; None when none."""
    try:
        from deployd.config import environment_warnings
    except ImportError:
        return None
    warnings = environment_warnings()
    if not warnings:
        return None
    return Check(
        "environment",
        WARN,
        "\n".join(warnings),
        "correct or unset each variable listed; a DEPLOYD_* variable that another tool reads "
        "can stay",
    )


def _socket_origin() -> str:
    from deployd_client.config_commands import socket_source

    return socket_source()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
