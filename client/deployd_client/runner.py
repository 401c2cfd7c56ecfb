"""``deployd run LOCK -- COMMAND``: hold a lock while a command runs.

The lease is bound to this client and to the command: the daemon keeps it
while either runs, so a killed client does not free the lock under a
running deploy. The command runs in its own process group; SIGINT, SIGTERM
and SIGHUP sent to this client are forwarded to that group, and on a
terminal the group gets the terminal's foreground. If the daemon goes away
(a restart), the client reconnects and re-attaches to its lease for up to
the lease's TTL. The command's exit code is passed through.
"""

from __future__ import annotations

import os
import select
import sys
import time

from deployd_client import exitcodes
from deployd_client.autostart import connect
from deployd_client.cli import lease_fields, warn_if_unlocked
from deployd_client.display import WaitDisplay
from deployd_client.options import Arguments
from deployd_client.protocol import (
    ClientError,
    Connection,
    ConnectionLost,
    DaemonError,
    NoDaemon,
    unwrap,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    # The C module behind ``signal``: the Python wrapper builds enums at import,
    # which costs every ``deployd run`` time for no benefit here.
    import _signal as signal

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SIGNAL_NAMES: dict[int, str] = {
    signal.SIGINT: "SIGINT",
    signal.SIGTERM: "SIGTERM",
    signal.SIGHUP: "SIGHUP",
}
# How long to wait for the daemon to answer a release before giving up on it.
RELEASE_TIMEOUT = 10.0
# How long a client without a daemon waits for one to come back before it
# starts one itself.
RECONNECT_AUTOSTART_AFTER = 1.0


def run(args: Arguments, command: list[str]) -> int:
    """Run ``command`` under the lock in ``args``; return the exit code to end with."""
    signals = _SignalPipe()
    try:
        return _Run(args, command, signals.read_fd).main()
    finally:
        signals.close()


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


def _read_signals(wakeup: int) -> list[int]:
    try:
        data = os.read(wakeup, 512)
    except BlockingIOError:
        return []
    return list(data)


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
        self.exit_code: int | None = None
        self.lost_message: str | None = None
        self.terminate_sent_at: float | None = None
        self.killed = False
        self.terminal = _Terminal()

    def main(self) -> int:
        self.connection = connect()
        try:
            signal_code = self._hold()
            if signal_code is not None:
                return signal_code
            self._spawn()
            self._supervise()
            return self._finish()
        finally:
            if self.connection is not None:
                self.connection.close()

    # --- taking the lock ---

    def _hold(self) -> int | None:
        """Wait for the lease; return an exit code if a signal ended the wait."""
        assert self.connection is not None
        display = WaitDisplay(self.lock, quiet=self.args.quiet)
        request_id = self.connection.send("hold", pid=os.getpid(), **lease_fields(self.args))
        while True:
            # One recv() can buffer an event and the response together, and select()
            # does not report buffered data, so it must not block then.
            timeout = 0 if self.connection.has_buffered_message() else None
            ready = self._select([self.connection.fileno(), self.wakeup], timeout)
            if self.wakeup in ready:
                for signum in _read_signals(self.wakeup):
                    if signum in FORWARDED_SIGNALS:
                        name = SIGNAL_NAMES.get(signum, f"signal {signum}")
                        display.finish(f"stopped waiting ({name})")
                        return 128 + signum
            if self.connection.fileno() in ready or self.connection.has_buffered_message():
                message = self.connection.read_message(0)
                if message is None:
                    continue
                if "event" in message:
                    display.update(message)
                    continue
                if message.get("id") not in (request_id, None):
                    continue
                try:
                    self.lease = unwrap(message)
                except DaemonError:
                    display.finish("gave up")
                    raise
                display.finish("got the lock")
                warn_if_unlocked(self.lease)
                return None

    # --- running the command ---

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["DEPLOYD_LEASE_ID"] = self.lease["lease_id"]
        env["DEPLOYD_LOCK"] = self.lease["lock"]
        env["DEPLOYD_FENCING_TOKEN"] = str(self.lease["token"])
        try:
            self.child_pid = os.posix_spawnp(self.command[0], self.command, env, setpgroup=0)
        except FileNotFoundError:
            self.exit_code = 127
            print(f"deployd: command not found: {self.command[0]}", file=sys.stderr)
            return
        except PermissionError:
            self.exit_code = 126
            print(f"deployd: permission denied running {self.command[0]}", file=sys.stderr)
            return
        except OSError as exc:
            self.exit_code = 126
            print(f"deployd: cannot run {self.command[0]}: {exc.strerror or exc}", file=sys.stderr)
            return
        self.terminal.hand_to(self.child_pid)
        assert self.connection is not None
        try:
            self.connection.send("bind", lease_id=self.lease["lease_id"], pid=self.child_pid)
        except ClientError:
            pass  # the connection is gone; _supervise() reconnects and re-attaches

    def _supervise(self) -> None:
        """Wait for the command to exit while forwarding signals and minding the lease."""
        if self.child_pid is None:
            return
        disconnected_at: float | None = None
        try:
            while self.exit_code is None:
                self._reap()
                if self.exit_code is not None:
                    break
                if self.connection is None and self.lost_message is None:
                    disconnected_at = disconnected_at or time.monotonic()
                    self._reconnect(disconnected_at)
                    if self.connection is not None:
                        disconnected_at = None
                self._escalate()
                watched = [self.wakeup]
                if self.connection is not None:
                    watched.append(self.connection.fileno())
                reconnecting = self.connection is None and self.lost_message is None
                timeout = 0.1 if reconnecting or self.terminate_sent_at else None
                if self.connection is not None and self.connection.has_buffered_message():
                    timeout = 0
                ready = self._select(watched, timeout)
                if self.wakeup in ready:
                    self._forward(_read_signals(self.wakeup))
                if self.connection is not None:
                    self._read_daemon()
        finally:
            self.terminal.take_back()

    def _reap(self) -> None:
        assert self.child_pid is not None
        try:
            pid, status = os.waitpid(self.child_pid, os.WNOHANG)
        except ChildProcessError:
            self.exit_code = self.exit_code if self.exit_code is not None else 1
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        self.exit_code = code if code >= 0 else 128 - code

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
                    print(
                        "deployd: lost the connection to the daemon; "
                        f"reconnecting to keep {self.lock}",
                        file=sys.stderr,
                    )
                return
            if message is None:
                return
            if message.get("event") in ("overlap", "lease_locked"):
                print(f"deployd: {message.get('message')}", file=sys.stderr)
            elif message.get("event") == "lease_lost":
                self._lease_lost(str(message.get("message") or f"lease on {self.lock} was lost"))
            elif message.get("ok") is False and "event" not in message:
                error = message.get("error") or {}
                if error.get("code") in ("lease_lost", "not_holder"):
                    self._lease_lost(str(error.get("message")))

    def _reconnect(self, since: float) -> None:
        """Try once to reach the daemon again and re-attach to the lease."""
        elapsed = time.monotonic() - since
        ttl = float(self.lease.get("timings", {}).get("ttl", 30.0))
        if elapsed > ttl:
            self._lease_lost(
                f"no daemon answered for {ttl:g}s, so the lease on {self.lock} has expired"
            )
            return
        try:
            connection = connect(autostart=elapsed >= RECONNECT_AUTOSTART_AFTER, timeout=1.0)
        except (NoDaemon, ClientError):
            return
        try:
            connection.request("hold", attach=self.lease["lease_id"], timeout=5.0)
        except DaemonError as exc:
            connection.close()
            self._lease_lost(str(exc))
            return
        except ClientError:
            connection.close()
            return
        self.connection = connection
        print(f"deployd: re-attached to the lease on {self.lock}", file=sys.stderr)

    def _lease_lost(self, message: str) -> None:
        if self.lost_message is not None:
            return
        self.lost_message = message
        policy = self.args.on_lost
        print(f"deployd: LEASE LOST: {message}", file=sys.stderr)
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.child_pid is None or self.exit_code is not None:
            return
        if policy == "warn":
            print(
                "deployd: --on-lost warn: the command keeps running WITHOUT the lock",
                file=sys.stderr,
            )
            return
        signum = signal.SIGINT if policy == "interrupt" else signal.SIGTERM
        print(f"deployd: sending {SIGNAL_NAMES[signum]} to the command", file=sys.stderr)
        _signal_group(self.child_pid, signum)
        if policy == "terminate":
            self.terminate_sent_at = time.monotonic()

    def _escalate(self) -> None:
        if self.terminate_sent_at is None or self.killed or self.child_pid is None:
            return
        if time.monotonic() - self.terminate_sent_at >= self.args.grace:
            print(
                f"deployd: the command did not exit within {self.args.grace:g}s; sending SIGKILL",
                file=sys.stderr,
            )
            _signal_group(self.child_pid, signal.SIGKILL)
            self.killed = True

    # --- ending ---

    def _finish(self) -> int:
        exit_code = self.exit_code if self.exit_code is not None else exitcodes.INTERNAL
        if self.lost_message is not None:
            print(
                f"deployd: the command exited with {exit_code} "
                f"after the lease on {self.lock} was lost",
                file=sys.stderr,
            )
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
                )
                return
            except DaemonError as exc:
                if exc.code == "lease_lost":
                    print(f"deployd: {exc}", file=sys.stderr)
                    raise
                print(f"deployd: release failed: {exc}", file=sys.stderr)
                return
            except ClientError:
                if self.connection is not None:
                    self.connection.close()
                self.connection = None
        print(
            f"deployd: could not report the end of the deploy to the daemon; the lease on "
            f"{self.lock} ends when the daemon sees this process gone",
            file=sys.stderr,
        )

    # --- helpers ---

    def _select(self, fds: list[int], timeout: float | None) -> list[int]:
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return []
        return ready
