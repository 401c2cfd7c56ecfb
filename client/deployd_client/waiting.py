"""Waiting for a lease: one request that survives a daemon restart and never hangs.

``acquire`` and ``run`` both send one request (``acquire`` or ``hold``) and
wait for the grant while the daemon pushes queue positions. If the daemon
goes away meanwhile (a restart), the request is sent again to the next
daemon with what is left of the wait; the caller loses its place in line
but not its wait. If the daemon stops responding altogether (a stopped or
wedged process), the wait ends with DaemonTimeout instead of hanging.
"""

from __future__ import annotations

import os
import select
import time

from deployd_client.autostart import DaemonStartFailed, connect
from deployd_client.display import WaitDisplay
from deployd_client.protocol import (
    ClientError,
    Connection,
    ConnectionLost,
    DaemonError,
    NoDaemon,
    unwrap,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    # The C module behind ``signal``, which skips building the enums at import.
    import _signal as signal

# How long the daemon may take to answer beyond the time the caller agreed to
# wait. The daemon itself answers within its store deadline (seconds); this
# bounds a daemon that is stopped or wedged.
RESPONSE_TIMEOUT = 30.0
# How long a client without a daemon waits for one to come back before it
# starts one itself.
AUTOSTART_AFTER = 1.0


class DaemonTimeout(ClientError):
    """The daemon accepted the connection but did not respond in time."""

    code = "daemon_timeout"


# The signals that end a wait: those that ``deployd run`` forwards to its command.
INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class WaitInterrupted(Exception):
    """A signal arrived on the wakeup pipe while waiting; ``signum`` names it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"signal {signum}")


def read_signals(wakeup: int) -> list[int]:
    """Return the signal numbers written to a wakeup pipe since the last read."""
    try:
        data = os.read(wakeup, 512)
    except BlockingIOError:
        return []
    return list(data)


def wait_for_lease(
    op: str,
    fields: dict[str, Any],
    wait: float | None,
    display: WaitDisplay,
    wakeup: int | None = None,
) -> tuple[Connection, dict[str, Any]]:
    """Send ``op`` with ``fields`` and return the connection and the granted lease.

    ``wait`` is how long the caller agreed to wait (None: not at all).
    Raises DaemonError when the daemon refuses, DaemonTimeout when it stops
    responding, and WaitInterrupted when a forwarded signal arrives on
    ``wakeup``.
    """
    started = time.monotonic()
    wait_until = None if not wait else started + wait
    give_up_at = (wait_until or started) + RESPONSE_TIMEOUT
    connection = connect()
    while True:
        request = dict(fields)
        if wait_until is not None:
            request["wait"] = max(0.001, wait_until - time.monotonic())
        try:
            request_id = connection.send(op, **request)
            return connection, _await_grant(connection, request_id, display, wakeup, give_up_at)
        except (ConnectionLost, DaemonError) as exc:
            connection.close()
            restarting = isinstance(exc, ConnectionLost) or exc.code == "shutting_down"
            if not restarting or time.monotonic() >= give_up_at:
                raise
        display.note("the daemon restarted; asking the next one")
        connection = _reconnect(give_up_at, wakeup, display)


def _await_grant(
    connection: Connection,
    request_id: int,
    display: WaitDisplay,
    wakeup: int | None,
    give_up_at: float,
) -> dict[str, Any]:
    watched = [connection.fileno()] + ([wakeup] if wakeup is not None else [])
    while True:
        now = time.monotonic()
        if now >= give_up_at:
            raise DaemonTimeout(
                f"the deployd daemon on {connection.path} did not respond in time; it may be "
                "stopped or overloaded: see 'deployd status' and the daemon log"
            )
        timeout = give_up_at - now
        refresh_in = display.refresh_in()
        if refresh_in is not None:
            # The terminal line shows the elapsed time; a start line may be held back for the ETA.
            timeout = min(timeout, refresh_in)
        if connection.has_buffered_message():
            timeout = 0
        ready = _select(watched, timeout)
        if wakeup is not None and wakeup in ready:
            _raise_if_interrupted(read_signals(wakeup))
        if not ready and not connection.has_buffered_message():
            display.refresh()
            continue
        message = connection.read_message(0)
        if message is None:
            continue
        if "event" in message:
            display.update(message)
            continue
        if message.get("id") not in (request_id, None):
            continue
        return unwrap(message)


def _reconnect(give_up_at: float, wakeup: int | None, display: WaitDisplay) -> Connection:
    """Connect to the daemon that replaces one that went away, starting one if none comes.

    Why a daemon started here failed (its ``deployd serve:`` line) is shown
    once for each distinct reason, and raised when the wait gives up.
    """
    lost_at = time.monotonic()
    shown: set[str] = set()
    while True:
        elapsed = time.monotonic() - lost_at
        try:
            return connect(autostart=elapsed >= AUTOSTART_AFTER, timeout=1.0)
        except DaemonStartFailed as exc:
            reason = str(exc)
            if exc.exit_code not in (None, 75) and reason not in shown:
                shown.add(reason)
                display.note(f"a new daemon cannot start: {reason}")
            if time.monotonic() >= give_up_at:
                raise
        except NoDaemon:
            if time.monotonic() >= give_up_at:
                raise
        if wakeup is not None and _select([wakeup], 0.1):
            _raise_if_interrupted(read_signals(wakeup))
        elif wakeup is None:
            time.sleep(0.1)


def _raise_if_interrupted(signals: list[int]) -> None:
    """Raise WaitInterrupted for the first of ``signals`` that ends a wait.

    SIGCHLD also reaches the wakeup pipe, for instance when a daemon that
    this client started loses the race to start and exits. It must not end
    the wait.
    """
    for signum in signals:
        if signum in INTERRUPTING_SIGNALS:
            raise WaitInterrupted(signum)


def _select(fds: list[int], timeout: float | None) -> list[int]:
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except InterruptedError:
        return []
    return ready
