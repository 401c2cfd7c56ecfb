"""``deployd service install|uninstall|status``: run the daemon as a per-user service.

On Linux the daemon becomes a systemd user service with socket activation
(``deployd.socket`` and ``deployd.service`` in ``~/.config/systemd/user``);
on macOS a launchd agent (``~/Library/LaunchAgents/com.deployd.daemon.plist``).
Each action is planned first, as files to write and commands to run, so that
``--dry-run`` prints exactly what the real run does.

Exit codes: 0 when done, and for ``status`` when the service is installed,
enabled and running. 1 when ``status`` finds it is not. 69 when systemctl or
launchctl is missing, cannot reach the service manager, or fails. 73 when a
file cannot be written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from deployd_client import exitcodes, paths
from deployd_client.unit_files import (
    LAUNCHD_LABEL,
    SERVICE_UNIT,
    SOCKET_UNIT,
    launchd_agent,
    systemd_exec_path,
    systemd_units,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from deployd_client.options import Arguments

# Exit code of ``service status`` when the service is not installed or not running.
NOT_RUNNING = 1
CANT_CREATE = 73  # sysexits EX_CANTCREAT: a file cannot be written
# systemd creates this directory when it runs as the init system (sd_booted(3)).
SYSTEMD_RUNTIME_DIR = "/run/systemd/system"
# systemd-logind keeps one empty file per user with lingering on (loginctl enable-linger).
LINGER_DIR = "/var/lib/systemd/linger"
COMMAND_TIMEOUT = 60.0
# How long install waits for a daemon started outside the service manager to stop.
STOP_TIMEOUT = 15.0


class ServiceError(Exception):
    """An action failed or cannot be done; the message gives the reason and the fix."""

    def __init__(self, message: str, exit_code: int = exitcodes.UNAVAILABLE) -> None:
        self.exit_code = exit_code
        super().__init__(message)


class Step:
    """One thing an action does: write or remove a file, run a command, or stop a process."""

    def __init__(
        self,
        description: str,
        run: Callable[[], object],
        content: str | None = None,
    ) -> None:
        self.description = description
        self.content = content
        self._run = run

    def run(self) -> None:
        """Do the step; raise ServiceError when it fails."""
        self._run()


class Plan:
    """The steps of an action and the notes to print after them."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.notes: list[str] = []

    def write(self, path: str, content: str) -> None:
        """Write ``content`` to ``path`` (mode 0644), creating its directory."""
        self.steps.append(Step(f"write {path}", lambda: _write_file(path, content), content))

    def remove(self, path: str) -> None:
        """Remove ``path``."""
        self.steps.append(Step(f"remove {path}", lambda: _remove_file(path)))

    def command(self, argv: list[str]) -> None:
        """Run ``argv``; a non-zero exit fails the action."""
        self.steps.append(Step(f"run {_shell_words(argv)}", lambda: run_command(argv)))

    def stop_process(self, pid: int, reason: str) -> None:
        """Stop ``pid`` with SIGTERM and wait for it to exit."""
        self.steps.append(
            Step(f"stop pid {pid} with SIGTERM: {reason}", lambda: _stop_process(pid))
        )


def run(args: Arguments) -> int:
    """Run ``deployd service ACTION`` and return the exit code."""
    from deployd_client.options import UsageError

    actions = ("install", "uninstall", "status")
    if args.action not in actions:
        raise UsageError(
            f"unknown action {args.action!r}; use one of {', '.join(actions)} "
            "(see 'deployd service --help')"
        )
    try:
        manager = service_manager()
        if args.action == "status":
            if args.dry_run:
                raise UsageError("--dry-run goes with install and uninstall, not with status")
            return manager.status()
        plan = manager.plan_install() if args.action == "install" else manager.plan_uninstall()
        if args.dry_run:
            print_plan(plan)
            return exitcodes.OK
        problem = manager.problem()
        if args.action == "install" and problem:
            raise ServiceError(problem)
        for step in plan.steps:
            print(step.description)
            step.run()
        for note in plan.notes:
            print(f"note: {note}")
        return exitcodes.OK
    except ServiceError as exc:
        print(f"deployd: {exc}", file=sys.stderr)
        return exc.exit_code


def print_plan(plan: Plan) -> None:
    """Print every file a plan writes, with its content, and every command it runs."""
    for step in plan.steps:
        print(f"would {step.description}")
        if step.content is not None:
            for line in step.content.splitlines():
                print(f"    {line}".rstrip())
    for note in plan.notes:
        print(f"note: {note}")


def service_manager() -> SystemdUser | Launchd:
    """Return the service manager of this platform; raise ServiceError on others."""
    if sys.platform.startswith("linux"):
        return SystemdUser()
    if sys.platform == "darwin":
        return Launchd()
    raise ServiceError(
        f"deployd service supports systemd (Linux) and launchd (macOS), not {sys.platform}; "
        "run 'deployd serve' from your session's start-up instead (any deployd command "
        "also starts a daemon when none runs)"
    )


# --- systemd ---


class SystemdUser:
    """The user's systemd instance (``systemctl --user``)."""

    name = "systemd"

    def __init__(self) -> None:
        base = os.environ.get("XDG_CONFIG_HOME")
        if not base or not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".config")
        self.unit_dir = os.path.join(base, "systemd", "user")

    def unit_path(self, name: str) -> str:
        """Return where the unit file ``name`` is installed."""
        return os.path.join(self.unit_dir, name)

    def problem(self) -> str | None:
        """Return why systemctl cannot manage user units here, or None when it can."""
        if shutil.which("systemctl") is None:
            return (
                "systemctl not found, so this system does not run systemd; run "
                "'deployd serve' from your session's start-up instead"
            )
        if not os.path.isdir(SYSTEMD_RUNTIME_DIR):
            return (
                f"this Linux was not started by systemd ({SYSTEMD_RUNTIME_DIR} is missing), so "
                "there are no user services; run 'deployd serve' from your session's start-up "
                "instead"
            )
        return None

    def plan_install(self) -> Plan:
        """Write both units, enable and start the socket, and restart a running service."""
        plan = Plan()
        problem = self.problem()
        for name, text in systemd_units(exec_start()).items():
            plan.write(self.unit_path(name), text)
        plan.command(["systemctl", "--user", "daemon-reload"])
        plan.command(["systemctl", "--user", "enable", "--now", SOCKET_UNIT])
        # An upgrade: a service that runs restarts on the new unit; one that does not stays so.
        plan.command(["systemctl", "--user", "try-restart", SERVICE_UNIT])
        outside = None if problem or socket_moved() else self._daemon_outside()
        if outside is not None:
            plan.stop_process(
                outside,
                "the daemon started outside systemd; the service resumes its leases",
            )
        if problem:
            plan.notes.append(f"a real install fails here: {problem}")
        plan.notes.extend(socket_path_notes())
        plan.notes.append(self._linger_note())
        return plan

    def plan_uninstall(self) -> Plan:
        """Stop and disable both units and remove their files."""
        plan = Plan()
        installed = [
            self.unit_path(name)
            for name in (SOCKET_UNIT, SERVICE_UNIT)
            if os.path.exists(self.unit_path(name))
        ]
        if not installed:
            plan.notes.append(
                f"deployd is not installed as a systemd user service ({self.unit_dir})"
            )
            return plan
        if self.problem() is None:
            plan.command(["systemctl", "--user", "disable", "--now", SOCKET_UNIT, SERVICE_UNIT])
        for path in installed:
            plan.remove(path)
        if self.problem() is None:
            plan.command(["systemctl", "--user", "daemon-reload"])
        plan.notes.append(
            "the stopped daemon kept the leases of running deploys; the next deployd command "
            "starts a daemon that resumes them"
        )
        return plan

    def status(self) -> int:
        """Print whether the units are installed, enabled and active, and if lingering is on."""
        installed = self._print_installed()

        problem = self.problem()
        if problem:
            raise ServiceError(problem)

        enabled = _output(["systemctl", "--user", "is-enabled", SOCKET_UNIT])
        socket_state = _output(["systemctl", "--user", "is-active", SOCKET_UNIT])
        service_state = _output(["systemctl", "--user", "is-active", SERVICE_UNIT])
        main_pid = _output(
            ["systemctl", "--user", "show", SERVICE_UNIT, "--property=MainPID", "--value"]
        )
        pid_text = f" (pid {main_pid})" if main_pid and main_pid != "0" else ""
        print(f"enabled:   {enabled or 'unknown'} ({SOCKET_UNIT})")
        print(
            f"active:    {SOCKET_UNIT} {socket_state or 'unknown'}, "
            f"{SERVICE_UNIT} {service_state or 'unknown'}{pid_text}"
        )
        print(f"lingering: {self._linger_text()}")

        if not (installed and enabled == "enabled" and socket_state == "active"):
            print(
                "deployd: the service is not installed, enabled and active; run "
                "'deployd service install'",
                file=sys.stderr,
            )
            return NOT_RUNNING
        return exitcodes.OK

    def _print_installed(self) -> bool:
        """Print whether both unit files exist, and whether they run this deployd."""
        installed = all(
            os.path.exists(self.unit_path(name)) for name in (SOCKET_UNIT, SERVICE_UNIT)
        )
        print(f"installed: {'yes' if installed else 'no'} ({self.unit_dir})")
        if installed:
            with open(self.unit_path(SERVICE_UNIT), encoding="utf-8") as handle:
                lines = handle.read().splitlines()
            if f"ExecStart={exec_start()} serve" not in lines:
                print(
                    "           the service runs another deployd than "
                    f"{' '.join(deployd_command())}; run 'deployd service install' to switch"
                )
        return installed

    def _daemon_outside(self) -> int | None:
        """Return the pid of a daemon on the client's socket that systemd did not start."""
        pid = daemon_pid()
        if pid is None:
            return None
        main_pid = _output(
            ["systemctl", "--user", "show", SERVICE_UNIT, "--property=MainPID", "--value"]
        )
        return None if main_pid == str(pid) else pid

    def _linger_text(self) -> str:
        state = linger_state()
        if state is None:
            return "unknown (loginctl not found)"
        if state:
            return "on: the service keeps running after you log out"
        return f"off: the service stops when you log out; 'loginctl enable-linger {user_name()}'"

    def _linger_note(self) -> str:
        state = linger_state()
        if state:
            return "lingering is on, so the daemon keeps running after you log out"
        return (
            "a user service stops when your last session ends, and then its leases expire "
            "after their TTL; to keep deployd running after you log out (for deploys in "
            f"tmux, nohup or cron), run 'loginctl enable-linger {user_name()}'"
        )


def linger_state() -> bool | None:
    """Return whether systemd keeps this user's services running after logout, None if unknown.

    loginctl reports only on users with a session or lingering on. For others
    the flag file that systemd-logind keeps for each lingering user decides.
    """
    if shutil.which("loginctl") is not None:
        value = _output(["loginctl", "show-user", user_name(), "--property=Linger", "--value"])
        if value in ("yes", "no"):
            return value == "yes"
    if os.path.isdir(LINGER_DIR):
        return os.path.exists(os.path.join(LINGER_DIR, user_name()))
    return None


# --- launchd ---


class Launchd:
    """The user's launchd domain (``gui/UID``)."""

    name = "launchd"

    def __init__(self) -> None:
        home = os.path.expanduser("~")
        self.plist_path = os.path.join(home, "Library", "LaunchAgents", f"{LAUNCHD_LABEL}.plist")
        self.log_dir = os.path.join(home, "Library", "Logs", "deployd")
        self.domain = f"gui/{os.getuid()}"
        self.target = f"{self.domain}/{LAUNCHD_LABEL}"

    def problem(self) -> str | None:
        """Return why launchctl cannot manage the agent here, or None when it can."""
        if shutil.which("launchctl") is None:
            return "launchctl not found; deployd service on macOS needs launchd"
        return None

    def plan_install(self) -> Plan:
        """Write the agent, stop a daemon started outside launchd, and load the agent."""
        import plistlib

        plan = Plan()
        problem = self.problem()
        agent = launchd_agent(deployd_command(), self.log_dir)
        plan.steps.append(
            Step(f"create {self.log_dir}", lambda: os.makedirs(self.log_dir, 0o700, exist_ok=True))
        )
        plan.write(self.plist_path, plistlib.dumps(agent).decode())
        if problem is None and self._loaded():
            plan.command(["launchctl", "bootout", self.target])
        outside = None if problem or socket_moved() else daemon_pid()
        if outside is not None:
            plan.stop_process(
                outside, "the daemon started outside launchd; the agent resumes its leases"
            )
        plan.command(["launchctl", "enable", self.target])
        plan.command(["launchctl", "bootstrap", self.domain, self.plist_path])
        if problem:
            plan.notes.append(f"a real install fails here: {problem}")
        plan.notes.extend(socket_path_notes())
        plan.notes.append(
            "a launch agent runs while you are logged in; after you log out its leases "
            "expire after their TTL"
        )
        return plan

    def plan_uninstall(self) -> Plan:
        """Unload the agent and remove its file."""
        plan = Plan()
        if not os.path.exists(self.plist_path):
            plan.notes.append(f"deployd is not installed as a launch agent ({self.plist_path})")
            return plan
        if self.problem() is None and self._loaded():
            plan.command(["launchctl", "bootout", self.target])
        plan.remove(self.plist_path)
        plan.notes.append(
            "the stopped daemon kept the leases of running deploys; the next deployd command "
            "starts a daemon that resumes them"
        )
        return plan

    def status(self) -> int:
        """Print whether the agent is installed and loaded, and its pid."""
        installed = os.path.exists(self.plist_path)
        print(f"installed: {'yes' if installed else 'no'} ({self.plist_path})")
        problem = self.problem()
        if problem:
            raise ServiceError(problem)
        state = pid = None
        if self._loaded():
            description = _output(["launchctl", "print", self.target]) or ""
            for line in description.splitlines():
                key, _, value = line.strip().partition(" = ")
                if key == "state":
                    state = value
                elif key == "pid":
                    pid = value
        print(f"loaded:    {'yes' if state else 'no'} ({self.target})")
        print(f"running:   {state or 'no'}" + (f" (pid {pid})" if pid else ""))
        if not (installed and state == "running"):
            print(
                "deployd: the agent is not installed and running; run 'deployd service install'",
                file=sys.stderr,
            )
            return NOT_RUNNING
        return exitcodes.OK

    def _loaded(self) -> bool:
        return _output(["launchctl", "print", self.target]) is not None


# --- shared helpers ---


def exec_start() -> str:
    """Return the ``deployd`` command as the start of the service's ``ExecStart=`` line."""
    return " ".join(systemd_exec_path(word) for word in deployd_command())


def deployd_command() -> list[str]:
    """Return the command that runs this deployd: the installed script, else Python with -m.

    The script is the one that runs now when its name is ``deployd``, else
    ``deployd`` on PATH. The -m form always runs the deployd of this
    interpreter.
    """
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "deployd" and os.access(script, os.X_OK):
        return [script]
    found = shutil.which("deployd")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "deployd_client"]


def daemon_pid() -> int | None:
    """Return the pid of the daemon that responds on the client's socket, or None."""
    from deployd_client.protocol import ClientError, Connection, NoDaemon

    try:
        with Connection.connect(paths.socket_path()) as connection:
            result = connection.request("hello", timeout=5.0)
    except (NoDaemon, ClientError, OSError):
        return None
    pid = result.get("pid")
    return pid if isinstance(pid, int) else None


def socket_moved() -> bool:
    """Return whether DEPLOYD_SOCKET moves this shell's socket away from the service's."""
    return bool(os.environ.get("DEPLOYD_SOCKET"))


def socket_path_notes() -> list[str]:
    """Return warnings when this shell's socket path differs from the service's."""
    if socket_moved():
        return [
            f"DEPLOYD_SOCKET is set to {os.environ['DEPLOYD_SOCKET']}, but the service listens "
            "in your runtime directory; unset DEPLOYD_SOCKET where you deploy, or clients "
            "start daemons of their own"
        ]
    return []


def user_name() -> str:
    """Return the login name of this process's user."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def run_command(argv: Sequence[str], check: bool = True) -> str:
    """Run ``argv`` and return its output; raise ServiceError naming the command when it fails."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise ServiceError(f"{argv[0]} not found; is it on PATH?") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(
            f"'{_shell_words(argv)}' did not finish within {COMMAND_TIMEOUT:g}s"
        ) from None
    if check and result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        detail = lines[-1] if lines else "no output"
        hint = ""
        if argv[:2] == ["systemctl", "--user"] and "bus" in detail.lower():
            hint = (
                "; systemctl cannot reach your user manager: log in as this user (not "
                f"'sudo -u' or 'su') or set XDG_RUNTIME_DIR=/run/user/{os.getuid()}"
            )
        raise ServiceError(
            f"'{_shell_words(argv)}' failed with exit code {result.returncode}: {detail}{hint}"
        )
    return result.stdout


def _output(argv: list[str]) -> str | None:
    """Return the stripped output of a query command, or None when it fails or is missing."""
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = result.stdout.strip()
    # is-enabled and is-active print the state and exit non-zero when it is not the expected one.
    if result.returncode != 0 and not output:
        return None
    if result.returncode != 0 and argv[:1] == ["launchctl"]:
        return None
    return output


def _write_file(path: str, content: str) -> None:
    directory = os.path.dirname(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as exc:
        raise ServiceError(f"cannot write {path}: {exc.strerror}", CANT_CREATE) from exc


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror}", CANT_CREATE) from exc


def _stop_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError as exc:
        raise ServiceError(f"cannot stop the daemon with pid {pid}: {exc.strerror}") from exc
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not _is_running(pid):
            return
        time.sleep(0.05)
    raise ServiceError(
        f"the daemon with pid {pid} did not stop within {STOP_TIMEOUT:g}s; stop it "
        f"('kill {pid}') so the service can take over"
    )


def _is_running(pid: int) -> bool:
    """Return whether ``pid`` runs; a zombie (exited, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _shell_words(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)
