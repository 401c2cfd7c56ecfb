"""``deployd run LOCK -- COMMAND``: hold a lock while a command runs.

The lease is bound to this client and to the command: the daemon keeps it
while either runs, so a killed client does not free the lock under a
running deploy. The command runs in its own process group; SIGINT, SIGTERM
and SIGHUP sent to this client are forwarded to that group, and on a
terminal the group gets the terminal's foreground (Ctrl-Z stops the
command and this client together, as a shell job). The lock is held until
the whole process group has exited, not only the first process.

The client watches the lease itself: the daemon confirms every renewal,
and if no confirmation arrives within the renew deadline (a stopped or
unreachable daemon, or one that restarted and never came back) the client
treats the lease as lost, before it can expire for anyone else. If the
daemon goes away, the client reconnects and re-attaches to its lease.
The command's exit code is passed through.
"""

from __future__ import annotations

import os
import select
import time

from deployd_client import exitcodes
from deployd_client.autostart import DaemonStartFailed, connect
from deployd_client.cli import (
    confirm_forced_lease,
    join_outer_lease,
    joined_depth,
    lease_fields,
    outer_leases_around,
    warn,
    warn_if_unlocked,
)
from deployd_client.display import WaitDisplay
from deployd_client.options import Arguments
from deployd_client.protocol import (
    ClientError,
    Connection,
    ConnectionLost,
    DaemonError,
    NoDaemon,
)
from deployd_client.waiting import (
    AUTOSTART_AFTER,
    INTERRUPTING_SIGNALS,
    WaitInterrupted,
    read_signals,
    wait_for_lease,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any

    from deployd_client.capture import OutputCapture
else:
    # The C module behind ``signal``: the Python wrapper builds enums at import,
    # which costs every ``deployd run`` time for no benefit here.
    import _signal as signal

FORWARDED_SIGNALS = INTERRUPTING_SIGNALS
SIGNAL_NAMES: dict[int, str] = {
    signal.SIGINT: "SIGINT",
    signal.SIGTERM: "SIGTERM",
    signal.SIGHUP: "SIGHUP",
}
# Signals that Python ignores in itself and that the command must get back
# with their default action, as a shell would start it: with SIGPIPE ignored,
# `producer | head -1` never ends.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
# How long to wait for the daemon to answer a release before giving up on it.
RELEASE_TIMEOUT = 10.0
# How often to look whether the rest of the command's process group has exited.
GROUP_POLL_INTERVAL = 0.2


def run(args: Arguments, command: list[str]) -> int:
    """Run ``command`` under the lock in ``args``; return the exit code to end with."""
    if args.grace < 0:
        from deployd_client.options import UsageError

        raise UsageError(f"--grace must not be negative, got {args.grace:g}s")
    problem = command_problem(command[0])
    if problem is not None:
        # Checked before the lock is taken, so a typo neither blocks the team
        # nor leaves a failed deploy in history.
        exit_code, message = problem
        warn(message)
        return exit_code
    signals = _SignalPipe()
    try:
        return _Run(args, command, signals.read_fd).main()
    finally:
        signals.close()


def command_problem(name: str) -> tuple[int, str] | None:
    """Return the shell's exit code and a message when ``name`` cannot be run, else None.

    Looks ``name`` up on PATH as posix_spawnp will: 127 when it is not found,
    126 when it is found but is a directory or not executable.
    """
    if "/" in name:
        candidates = [name]
    else:
        path = os.environ.get("PATH", os.defpath)
        candidates = [os.path.join(entry or ".", name) for entry in path.split(":")]
    found = None
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return None
        if found is None and os.path.exists(candidate):
            found = candidate
    if found is None:
        return 127, f"command not found: {name}; the lock was not taken"
    if os.path.isdir(found):
        return 126, f"cannot run {found}: it is a directory; the lock was not taken"
    return 126, f"cannot run {found}: permission denied (not executable); the lock was not taken"


class _SignalPipe:
    """Route SIGINT, SIGTERM, SIGHUP and SIGCHLD to a pipe that select() watches.

    Signals that were ignored when deployd started stay ignored, so the
    command inherits them ignored as a shell would pass them on.
    """

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, Any] = {}
        for signum in (*FORWARDED_SIGNALS, signal.SIGCHLD):
            handler = signal.getsignal(signum)
            if handler == signal.SIG_IGN:
                continue
            self._previous[signum] = signal.signal(signum, _note_signal)
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self.read_fd)
        os.close(self._write_fd)


def _note_signal(signum: int, frame: object) -> None:
    """Do nothing: the signal number reaches the wakeup pipe, which the loop reads."""


def _signal_group(process_group: int, signum: int) -> None:
    """Send ``signum`` to a process group that may already be gone."""
    try:
        os.killpg(process_group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(process_group: int) -> bool:
    """Return whether any process of ``process_group`` still exists."""
    try:
        os.killpg(process_group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Terminal:
    """Give the command's process group the terminal's foreground, and take it back."""

    def __init__(self) -> None:
        self.fd: int | None = None
        try:
            if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
                self.fd = 0
        except OSError:
            pass

    def hand_to(self, process_group: int) -> None:
        if self.fd is not None:
            try:
                os.tcsetpgrp(self.fd, process_group)
            except OSError:
                pass

    def take_back(self) -> None:
        if self.fd is None:
            return
        # This process is in the background now: without ignoring SIGTTOU the
        # kernel would stop it when it asks for the foreground back.
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(self.fd, os.getpgrp())
        except OSError:
            pass
        finally:
            signal.signal(signal.SIGTTOU, previous)


class _Run:
    def __init__(self, args: Arguments, command: list[str], wakeup: int) -> None:
        self.args = args
        self.command = command
        self.wakeup = wakeup
        self.lock: str = args.lock
        self.connection: Connection | None = None
        self.lease: dict[str, Any] = {}
        self.child_pid: int | None = None
        self.child_done = False
        self.exit_code: int | None = None
        self.lost_message: str | None = None
        self.terminate_sent_at: float | None = None
        self.killed = False
        self.terminal = _Terminal()
        # When the daemon last confirmed the lease (a grant or a renewal), on
        # this process's monotonic clock; None while the lease has no store
        # lease to renew (it runs without a lock).
        self.confirmed_at: float | None = None
        self.renew_deadline = 0.0
        # Why a daemon started to re-attach could not start: the latest reason,
        # and every reason printed so far (each is printed once).
        self.start_failure: str | None = None
        self.start_failures_shown: set[str] = set()
        self.group_notice_shown = False
        # Whether this run joined the lease of the deploy it runs under (nesting):
        # that deploy renews and releases it, so this run only runs the command.
        self.joined = False
        self.capture: OutputCapture | None = None
        if args.capture_output:
            from deployd_client.capture import OutputCapture

            self.capture = OutputCapture()

    def main(self) -> int:
        try:
            interrupted = self._hold()
            if interrupted is not None:
                return interrupted
            self._spawn()
            self._supervise()
            return self._finish()
        finally:
            if self.connection is not None:
                self.connection.close()
            if self.capture is not None:
                self.capture.close()

    # --- taking the lock ---

    def _hold(self) -> int | None:
        """Wait for the lease; return an exit code if a signal ended the wait."""
        joined = join_outer_lease("hold", self.lock)
        if joined is not None:
            self.lease = joined
            self.joined = True
            return None
        if not confirm_forced_lease(self.args):
            return exitcodes.BUSY
        display = WaitDisplay(self.lock, quiet=self.args.quiet)
        try:
            self.connection, self.lease = wait_for_lease(
                "hold",
                {"pid": os.getpid(), **lease_fields(self.args)},
                self.args.wait,
                display,
                self.wakeup,
            )
        except WaitInterrupted as stop:
            name = SIGNAL_NAMES.get(stop.signum, f"signal {stop.signum}")
            display.finish(f"stopped waiting ({name})")
            return 128 + stop.signum
        except DaemonError:
            display.abandon()  # the error line that follows gives the reason
            raise
        display.finish("got the lock")
        warn_if_unlocked(self.lease)
        self._confirmed(self.lease)
        return None

    def _confirmed(self, data: dict[str, Any]) -> None:
        """Note a confirmation of the lease from the daemon (a grant, renewal or re-attach)."""
        if data.get("degraded"):
            self.confirmed_at = None
            return
        timings = data.get("timings") or self.lease.get("timings") or {}
        self.renew_deadline = float(timings.get("renew_deadline", 0.0))
        # The daemon's monotonic clock is the same system-wide clock as this
        # process's, so its confirmation time can be used as it is.
        confirmed = data.get("confirmed_at")
        self.confirmed_at = (
            float(confirmed) if isinstance(confirmed, int | float) else time.monotonic()
        )

    # --- running the command ---

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["DEPLOYD_LEASE_ID"] = self.lease["lease_id"]
        env["DEPLOYD_LOCK"] = self.lease["lock"]
        env["DEPLOYD_FENCING_TOKEN"] = str(self.lease["token"])
        env["DEPLOYD_LEASE_DEPTH"] = str(joined_depth(self.lock) if self.joined else 1)
        env["DEPLOYD_OUTER_LEASES"] = outer_leases_around(self.lock)
        # Tells 'deployd release' in the command that this run, not the command, ends the lease.
        env["DEPLOYD_LEASE_OWNER"] = "run"
        try:
            self.child_pid = os.posix_spawnp(
                self.command[0],
                self.command,
                env,
                setpgroup=0,
                setsigdef=RESET_SIGNALS,
                file_actions=self.capture.file_actions() if self.capture is not None else (),
            )
        except FileNotFoundError:
            self.exit_code = 127
            warn(f"command not found: {self.command[0]}")
            return
        except PermissionError:
            self.exit_code = 126
            warn(f"permission denied running {self.command[0]}")
            return
        except OSError as exc:
            self.exit_code = 126
            warn(f"cannot run {self.command[0]}: {exc.strerror or exc}")
            return
        if self.capture is not None:
            self.capture.spawned()
        self.terminal.hand_to(self.child_pid)
        if self.joined:
            return
        assert self.connection is not None
        try:
            self.connection.send("bind", lease_id=self.lease["lease_id"], pid=self.child_pid)
        except ClientError:
            pass  # the connection is gone; _supervise() reconnects and re-attaches

    def _supervise(self) -> None:
        """Wait for the command's process group while forwarding signals and minding the lease."""
        if self.child_pid is None:
            return
        disconnected_at: float | None = None
        try:
            while True:
                self._reap()
                if self.child_done and not self._rest_of_group_running():
                    break
                if self.connection is None and self.lost_message is None and not self.joined:
                    disconnected_at = disconnected_at or time.monotonic()
                    self._reconnect(disconnected_at)
                    if self.connection is not None:
                        disconnected_at = None
                if self.connection is not None:
                    # Confirmations may wait in the socket (after Ctrl-Z, for one).
                    self._read_daemon()
                self._check_renewals()
                self._escalate()
                ready = self._select(self._watched(), self._timeout())
                if self.wakeup in ready:
                    self._forward(read_signals(self.wakeup))
                if self.capture is not None:
                    self.capture.pump(ready)
                if self.connection is not None:
                    self._read_daemon()
        finally:
            self.terminal.take_back()
            if self.capture is not None:
                self.capture.drain()

    def _watched(self) -> list[int]:
        watched = [self.wakeup]
        if self.connection is not None:
            watched.append(self.connection.fileno())
        if self.capture is not None:
            watched.extend(self.capture.fds())
        return watched

    def _timeout(self) -> float | None:
        """Return how long select() may sleep before something needs checking."""
        if self.connection is not None and self.connection.has_buffered_message():
            return 0
        timeouts: list[float] = []
        if self.connection is None and self.lost_message is None and not self.joined:
            timeouts.append(0.1)  # reconnecting
        if self.terminate_sent_at is not None and not self.killed:
            timeouts.append(0.1)
        if self.child_done:
            timeouts.append(GROUP_POLL_INTERVAL)
        if self.confirmed_at is not None and self.lost_message is None:
            due = self.confirmed_at + self.renew_deadline - time.monotonic()
            timeouts.append(max(0.0, due))
        return min(timeouts, default=None)

    def _reap(self) -> None:
        """Collect the command's exit status, and follow it when the user stops it (Ctrl-Z)."""
        if self.child_done:
            return
        assert self.child_pid is not None
        try:
            pid, status = os.waitpid(self.child_pid, os.WNOHANG | os.WUNTRACED)
        except ChildProcessError:
            self.child_done = True
            self.exit_code = self.exit_code if self.exit_code is not None else 1
            return
        if pid == 0:
            return
        if os.WIFSTOPPED(status):
            self._stop_with_child()
            return
        self.child_done = True
        code = os.waitstatus_to_exitcode(status)
        self.exit_code = code if code >= 0 else 128 - code

    def _stop_with_child(self) -> None:
        """Stop this client too, as a shell job is stopped, and resume the command with it."""
        assert self.child_pid is not None
        self.terminal.take_back()
        os.kill(os.getpid(), signal.SIGSTOP)
        # Here after SIGCONT, when the user resumed the job (fg or bg).
        if self.terminal.fd is not None:
            try:
                in_foreground = os.tcgetpgrp(self.terminal.fd) == os.getpgrp()
            except OSError:
                in_foreground = False
            if in_foreground:
                self.terminal.hand_to(self.child_pid)
        _signal_group(self.child_pid, signal.SIGCONT)

    def _rest_of_group_running(self) -> bool:
        assert self.child_pid is not None
        if not _group_alive(self.child_pid):
            return False
        if not self.group_notice_shown:
            self.group_notice_shown = True
            if self.lost_message is None:
                holding = f"holding {self.lock} until"
            else:
                holding = f"the lease on {self.lock} is already lost; waiting until"
            warn(
                f"the command exited with {self.exit_code}; {holding} the other processes "
                f"of its process group ({self.child_pid}) exit. To stop them: "
                f"kill -- -{self.child_pid}"
            )
        return True

    def _forward(self, signals: list[int]) -> None:
        assert self.child_pid is not None
        for signum in signals:
            if signum in FORWARDED_SIGNALS:
                _signal_group(self.child_pid, signum)

    def _read_daemon(self) -> None:
        while self.connection is not None:
            try:
                message = self.connection.read_message(0)
            except ConnectionLost:
                self.connection.close()
                self.connection = None
                if self.lost_message is None:
                    warn(f"lost the connection to the daemon; reconnecting to keep {self.lock}")
                return
            if message is None:
                return
            event = message.get("event")
            if event == "lease_renewed":
                self._confirmed(message)
            elif event == "lease_locked":
                warn(f"{message.get('message')}")
                self._confirmed(message)
            elif event == "overlap":
                warn(f"{message.get('message')}")
            elif event == "lease_lost":
                self._lease_lost(str(message.get("message") or f"lease on {self.lock} was lost"))
            elif message.get("ok") is False and event is None:
                error = message.get("error") or {}
                if error.get("code") in ("lease_lost", "not_holder"):
                    self._lease_lost(str(error.get("message")))

    def _check_renewals(self) -> None:
        """Treat the lease as lost when no renewal was confirmed within the renew deadline."""
        if self.confirmed_at is None or self.lost_message is not None:
            return
        silent = time.monotonic() - self.confirmed_at
        if silent >= self.renew_deadline:
            why = ""
            if self.connection is None and self.start_failure is not None:
                why = f"; a new daemon cannot start: {self.start_failure}"
            self._lease_lost(
                f"the daemon confirmed no renewal of the lease on {self.lock} for "
                f"{silent:.1f}s (renew deadline {self.renew_deadline:g}s): it is stopped, "
                f"wedged or gone, so the lease may expire for others{why}"
            )

    def _reconnect(self, since: float) -> None:
        """Try once to reach the daemon again and re-attach to the lease."""
        elapsed = time.monotonic() - since
        try:
            connection = connect(autostart=elapsed >= AUTOSTART_AFTER, timeout=1.0)
        except DaemonStartFailed as exc:
            if exc.exit_code not in (None, 75):
                self._note_start_failure(str(exc))
            return
        except (NoDaemon, ClientError):
            return
        try:
            result = connection.request(
                "hold",
                timeout=5.0,
                attach=self.lease["lease_id"],
                lease=self.lease.get("lease"),
                pids=[os.getpid(), self.child_pid],
            )
        except DaemonError as exc:
            connection.close()
            self._lease_lost(str(exc))
            return
        except ClientError:
            connection.close()
            return
        self.connection = connection
        self.start_failure = None
        self._confirmed(result)
        warn(f"re-attached to the lease on {self.lock}")

    def _note_start_failure(self, reason: str) -> None:
        """Keep why a new daemon cannot start, for LEASE LOST; print each reason once."""
        self.start_failure = reason
        if reason in self.start_failures_shown:
            return
        self.start_failures_shown.add(reason)
        warn(
            f"a new daemon cannot start, so the lease on {self.lock} is not renewed; retrying "
            f"until the renew deadline: {reason}"
        )

    def _lease_lost(self, message: str) -> None:
        if self.lost_message is not None:
            return
        self.lost_message = message
        policy = self.args.on_lost
        warn(f"LEASE LOST: {message}")
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.child_pid is None or self.child_done:
            return
        if policy == "warn":
            warn("--on-lost warn: the command keeps running WITHOUT the lock")
            return
        signum = signal.SIGINT if policy == "interrupt" else signal.SIGTERM
        warn(f"sending {SIGNAL_NAMES[signum]} to the command")
        _signal_group(self.child_pid, signum)
        if policy == "terminate":
            self.terminate_sent_at = time.monotonic()

    def _escalate(self) -> None:
        if self.terminate_sent_at is None or self.killed or self.child_pid is None:
            return
        if time.monotonic() - self.terminate_sent_at >= self.args.grace:
            warn(f"the command did not exit within {self.args.grace:g}s; sending SIGKILL")
            _signal_group(self.child_pid, signal.SIGKILL)
            self.killed = True

    # --- ending ---

    def _finish(self) -> int:
        exit_code = self.exit_code if self.exit_code is not None else exitcodes.INTERNAL
        if self.joined:
            return exit_code
        if self.lost_message is not None:
            warn(f"the command exited with {exit_code} after the lease on {self.lock} was lost")
            return exitcodes.LEASE_LOST
        self._release(exit_code)
        return exit_code

    def _release(self, exit_code: int) -> None:
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while time.monotonic() < deadline:
            if self.connection is None:
                try:
                    self.connection = connect(timeout=1.0)
                except ClientError:
                    time.sleep(0.1)
                    continue
            try:
                self.connection.request(
                    "release",
                    timeout=max(0.1, deadline - time.monotonic()),
                    lease_id=self.lease["lease_id"],
                    exit_code=exit_code,
                    output_tail=self._output_tail(exit_code),
                )
                return
            except DaemonError as exc:
                if exc.code == "lease_lost":
                    warn(f"{exc}")
                    raise
                warn(f"release failed: {exc}")
                return
            except ClientError:
                if self.connection is not None:
                    self.connection.close()
                self.connection = None
        warn(
            f"could not report the end of the deploy to the daemon; the lease on "
            f"{self.lock} ends when the daemon sees this process gone"
        )

    def _output_tail(self, exit_code: int) -> list[str] | None:
        """Return the command's last lines of output for a failed release, when captured."""
        if self.capture is None or exit_code == 0:
            return None
        return self.capture.tail() or None

    # --- helpers ---

    def _select(self, fds: list[int], timeout: float | None) -> list[int]:
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return []
        return ready
