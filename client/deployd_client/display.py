"""How the command shows leases, waits and status to people."""

from __future__ import annotations

import os
import sys
import time

from deployd_client.durations import format_duration

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, TextIO


def use_color(stream: TextIO) -> bool:
    """Return whether to colour output: only on a terminal, and never with NO_COLOR set."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


# The scope of a freeze of every lock.
ALL_LOCKS = "*"


def clock_time(epoch: float) -> str:
    """Format a wall-clock time as local ``HH:MM:SS`` and zone, with the date if it is not today.

    Every time of day that the command and the daemon show people has this
    form, such as ``23:20:29 CET`` or ``2026-02-05 00:00:00 CET``.
    """
    local = time.localtime(epoch)
    zone = time.strftime("%Z", local)
    if not zone.isalpha():
        # Some zones have no abbreviation and name themselves by their offset ("+03").
        zone = "UTC" + time.strftime("%z", local)
    if time.strftime("%Y-%m-%d", local) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S ", local) + zone
    return time.strftime("%Y-%m-%d %H:%M:%S ", local) + zone


def ago(epoch: float) -> str:
    """Format how long ago a wall-clock time was, such as ``3m12s ago``."""
    return f"{format_duration(max(0.0, time.time() - epoch))} ago"


def describe_holder(lease: dict[str, Any]) -> str:
    """Describe who holds a lease: user, host, since when, commit and reason."""
    owner = lease.get("owner") or {}
    parts = [f"{owner.get('user', '?')} on {owner.get('host', '?')}"]
    acquired_at = lease.get("acquired_at")
    if isinstance(acquired_at, int | float):
        parts.append(f"since {clock_time(acquired_at)} ({ago(acquired_at)})")
    purpose = lease.get("purpose") or {}
    if purpose.get("commit"):
        parts.append(f"commit {purpose['commit']}")
    if purpose.get("reason"):
        parts.append(f"reason {purpose['reason']!r}")
    return ", ".join(parts)


def ordinal(number: int) -> str:
    """Return ``1st``, ``2nd``, ``3rd``, ``4th`` and so on."""
    if 10 <= number % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


# How long a wait display without a terminal holds back its first line for an
# ETA: the daemon sends one within moments once it has read the lock's recent
# deploys, and a lock without such deploys never gets one.
START_LINE_GRACE = 2.0


def describe_eta(event: dict[str, Any], now: float) -> str | None:
    """Describe when the caller may get the lock, from a queue_position event at ``now``.

    ``now`` is wall-clock time, compared with the holder's ``acquired_at``,
    so the estimate moves between events. Returns None when there is nothing
    to estimate: no recent deploys, a freeze in the way, or the next grant due.
    """
    if isinstance(event.get("frozen"), dict):
        # Deploy durations do not predict when a freeze ends.
        return None
    typical = event.get("typical_duration")
    if not isinstance(typical, int | float):
        return None
    position = event.get("position")
    ahead = max(0, position - 1) if isinstance(position, int) else 0
    after_holder = ahead * float(typical)
    holder = event.get("holder")
    acquired_at = holder.get("acquired_at") if isinstance(holder, dict) else None
    if not isinstance(acquired_at, int | float):
        return f"ETA ~{format_duration(after_holder)}" if after_holder >= 1 else None
    held_for = max(0.0, now - acquired_at)
    left = float(typical) - held_for
    if left > 0:
        estimate = left + after_holder
        return f"ETA ~{format_duration(estimate)}" if estimate >= 1 else "ETA <1s"
    # The holder has run past the typical duration: report that instead of a negative ETA.
    text = (
        f"the holder is taking longer than usual ({format_duration(held_for)} so far, "
        f"usually {format_duration(float(typical))})"
    )
    if after_holder >= 1:
        text += f"; ETA ~{format_duration(after_holder)} after it ends"
    return text


class WaitDisplay:
    """Show a wait for a lock on stderr.

    On a terminal, one line is rewritten in place as the position, the holder
    or the elapsed time change, cut to the terminal's width. Elsewhere one line
    is printed when the wait starts and one when it ends, so logs stay short.
    The start line waits for the ETA, at most START_LINE_GRACE seconds.
    """

    def __init__(self, lock: str, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.lock = lock
        self.stream = stream or sys.stderr
        # No stream at all when stderr was closed before the command started.
        self.quiet = quiet or self.stream is None
        self.terminal = not self.quiet and self.stream.isatty()
        self.started = time.monotonic()
        self._shown = False
        self._event: dict[str, Any] | None = None
        self._first_event_at: float | None = None

    def update(self, event: dict[str, Any]) -> None:
        """Show a queue_position event."""
        if self.quiet:
            return
        self._event = event
        if self._first_event_at is None:
            self._first_event_at = time.monotonic()
        if self.terminal:
            self._draw()
        elif not self._shown and self._start_line_ready():
            self._print_start_line()

    def refresh(self) -> None:
        """Redraw the terminal line, so that the elapsed time moves; print a due start line."""
        if self._event is None or self.quiet:
            return
        if self.terminal:
            self._draw()
        elif not self._shown and self._start_line_ready():
            self._print_start_line()

    def refresh_in(self) -> float | None:
        """Return the seconds until ``refresh`` has something to do, or None if never."""
        if self.quiet:
            return None
        if self.terminal:
            return 1.0
        if self._shown or self._first_event_at is None:
            return None
        return max(0.0, self._first_event_at + START_LINE_GRACE - time.monotonic())

    def note(self, text: str) -> None:
        """Print a line about the wait, such as a daemon restart, above the waiting line."""
        if self.quiet:
            return
        prefix = "\r\x1b[K" if self.terminal and self._shown else ""
        self._write(f"{prefix}deployd: {self.lock}: {text}\n")
        self.refresh()

    def finish(self, outcome: str) -> None:
        """End the wait display with ``outcome`` (for example ``got the lock``)."""
        if self.quiet or self._event is None:
            return
        if not self.terminal and not self._shown:
            self._print_start_line()
        waited = format_duration(time.monotonic() - self.started)
        line = f"deployd: {self.lock}: {outcome} after waiting {waited}"
        self._write(f"\r\x1b[K{line}\n" if self.terminal else line + "\n")

    def abandon(self) -> None:
        """End the wait display without an outcome line, because an error line follows.

        The terminal line is erased; without a terminal, a start line still
        held back for the ETA is printed.
        """
        if self.quiet or self._event is None:
            return
        if self.terminal:
            self._write("\r\x1b[K")
        elif not self._shown:
            self._print_start_line()

    def _start_line_ready(self) -> bool:
        event = self._event or {}
        if event.get("typical_duration") is not None or isinstance(event.get("frozen"), dict):
            return True
        first = self._first_event_at
        return first is not None and time.monotonic() - first >= START_LINE_GRACE

    def _print_start_line(self) -> None:
        self._write(self._describe() + "\n")
        self._shown = True

    def _describe(self, brief: bool = False) -> str:
        """Describe the wait; ``brief`` names the holder only, so a narrow line keeps the rest."""
        event = self._event or {}
        parts: list[str] = []
        frozen = event.get("frozen")
        if isinstance(frozen, dict):
            parts.append(f"frozen {describe_freeze(frozen)}")
        holder = event.get("holder")
        if isinstance(holder, dict) and brief:
            owner = holder.get("owner") or {}
            parts.append(f"held by {owner.get('user', '?')}@{owner.get('host', '?')}")
        elif isinstance(holder, dict):
            parts.append(f"held by {describe_holder(holder)}")
        position = event.get("position")
        if isinstance(position, int):
            parts.append(f"you are {ordinal(position)} in line")
        eta = describe_eta(event, time.time())
        if eta is not None:
            parts.append(eta)
        return f"deployd: waiting for {self.lock}: " + "; ".join(parts or ["queued"])

    def _draw(self) -> None:
        waited = format_duration(time.monotonic() - self.started)
        text = f"{self._describe()} (waiting {waited})"
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            width = 0
        # Terminals without a size (script, docker exec -t) report 0 columns.
        width = width or 80
        if len(text) >= width:
            # The place in line and the ETA matter more than the holder's details.
            text = f"{self._describe(brief=True)} (waiting {waited})"
        if len(text) >= width:
            text = text[: max(10, width - 2)] + "…"
        self._write(f"\r\x1b[K{text}")
        self._shown = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.quiet = True


def notification_lines(health: dict[str, Any] | None, daemon_pid: object = None) -> list[str]:
    """Render the notifier's part of ``status``: on or off, counts, and what to fix.

    A fix that restarts the daemon gets the restart command for ``daemon_pid``.
    """
    if not health:
        return []
    if not health.get("configured"):
        return [f"slack    off: {health.get('hint', 'no token or webhook URL is configured')}"]
    if health.get("error"):
        return [f"slack    {health['error']}"]
    where = f"{health.get('channel')} by {health.get('mode')} ({health.get('credentials')})"
    counts = (
        f"{health.get('queued', 0)} queued, {health.get('sent', 0)} sent, "
        f"{health.get('failed', 0)} failed"
    )
    if health.get("parked"):
        counts += f", {health['parked']} parked"
    oldest = health.get("oldest_queued_age")
    if oldest is not None:
        counts += f"; oldest waiting {format_duration(float(oldest))}"
    lines = [f"slack    {where}: {counts}"]
    problem = health.get("problem")
    if problem:
        lines.append(f"         STOPPED: {problem.get('message')}")
        from deployd_client.autostart import explain_restart

        lines.append(f"         fix: {explain_restart(str(problem.get('fix')), daemon_pid)}")
    elif health.get("last_error") and (
        health.get("queued") or health.get("retry_in") or health.get("failed")
    ):
        lines.extend(last_error_lines(health, "         "))
    return lines


def last_error_lines(health: dict[str, Any], indent: str) -> list[str]:
    """Return the notifier's last error with its time, and its fix when one is known."""
    when = health.get("last_error_at")
    at = f" at {clock_time(float(when))}" if isinstance(when, int | float) else ""
    retry_in = health.get("retry_in")
    retry = f"; retrying in {format_duration(float(retry_in))}" if retry_in else ""
    lines = [f"{indent}last error{at}: {health.get('last_error')}{retry}"]
    if health.get("last_error_fix"):
        lines.append(f"{indent}fix: {health['last_error_fix']}")
    return lines


def status_text(status: dict[str, Any], color: bool = False) -> str:
    """Render the result of the ``status`` op: daemon, store, freezes, locks, queues, deploys."""
    lines = _daemon_lines(status, color)
    for lease in status.get("leases") or []:
        if lease.get("degraded"):
            lines.append(paint(_unlocked_line(lease), "red", color))
    for freeze in status.get("freezes") or []:
        lines.append(paint(f"frozen   {describe_freeze(freeze)}", "cyan", color))
    lines.append("")

    locks = status.get("locks", [])
    if not locks:
        lines.append("no locks yet")
    else:
        lines.append(table(_lock_rows(locks, color), color))
        lines.extend(_queue_lines(locks))

    latest = status.get("latest") or []
    if latest:
        from deployd_client.reports import history_text

        lines += ["", "latest deploys"]
        lines.append(history_text({"deployments": latest}, color))
    return "\n".join(lines)


def _unlocked_line(lease: dict[str, Any]) -> str:
    """Describe a lease granted without the store's lock, which the lock table cannot show."""
    return (
        f"UNLOCKED {lease.get('lock')}: session {lease.get('session_id')} deploys WITHOUT the "
        "team-wide lock (the store is unreachable); the daemon takes the real lock when "
        "the store is back and reports any overlap"
    )


def _daemon_lines(status: dict[str, Any], color: bool) -> list[str]:
    daemon = status.get("daemon", {})
    store = status.get("store", {})
    lines = [
        f"daemon   deployd {daemon.get('version')}, pid {daemon.get('pid')}, "
        f"up {format_duration(float(daemon.get('uptime', 0)))}",
        f"socket   {daemon.get('socket')}",
        f"config   {daemon.get('config_file') or '(defaults, no file)'}",
    ]
    if store.get("reachable"):
        state = paint("reachable", "green", color)
    else:
        state = paint(f"UNREACHABLE: {store.get('error')}", "red", color)
    details = []
    if store.get("latency") is not None:
        details.append(f"last call {format_duration(float(store['latency']))}")
    offset = store.get("clock_offset")
    if isinstance(offset, int | float) and offset:
        details.append(f"clock offset {offset:+.3f}s")
    detail_text = f" ({', '.join(details)})" if details else ""
    lines.append(f"store    {store.get('kind')} at {store.get('location')}: {state}{detail_text}")
    lines.extend(notification_lines(status.get("notifications"), daemon.get("pid")))
    return lines


_HEALTH_COLORS = {"healthy": "green", "late": "yellow", "expired": "red"}


def _lock_rows(locks: list[dict[str, Any]], color: bool) -> list[list[str]]:
    rows = [
        [
            "LOCK",
            "HOLDER",
            "HOST",
            "SINCE",
            "HEALTH",
            "LEFT",
            "TOKEN",
            "WAITING",
            "COMMIT",
            "REASON",
        ]
    ]
    for entry in locks:
        lease = entry.get("lease")
        waiting = len(entry.get("waiters", [])) + max(0, len(entry.get("local_queue", [])) - 1)
        waiting_text = str(waiting) if waiting else "-"
        frozen = paint(" frozen", "cyan", color) if entry.get("frozen") else ""
        if lease:
            owner = lease.get("owner", {})
            purpose = lease.get("purpose", {})
            health = str(lease.get("health", "healthy" if entry.get("held") else "expired"))
            rows.append(
                [
                    entry["lock"] + frozen,
                    str(owner.get("user")),
                    str(owner.get("host")),
                    ago(float(lease["acquired_at"])),
                    paint(health, _HEALTH_COLORS.get(health, ""), color),
                    format_duration(max(0.0, float(lease.get("expires_in", 0)))),
                    str(entry.get("token")),
                    waiting_text,
                    str(purpose.get("commit") or "-"),
                    str(purpose.get("reason") or "-"),
                ]
            )
        else:
            rows.append(
                [
                    entry["lock"] + frozen,
                    "-",
                    "-",
                    "-",
                    "free",
                    "-",
                    str(entry.get("token")),
                    waiting_text,
                    "-",
                    "-",
                ]
            )
    return rows


def _queue_lines(locks: list[dict[str, Any]]) -> list[str]:
    """Return one line per lock with waiters: the store's queue, then this daemon's."""
    lines = []
    for entry in locks:
        waiters = [
            f"{owner['user']}@{owner['host']} ({ago(float(waiter['enqueued_at']))})"
            for waiter in entry.get("waiters", [])
            if (owner := waiter["owner"])
        ]
        local = (
            entry.get("local_queue", [])[1:]
            if entry.get("waiters")
            else entry.get("local_queue", [])
        )
        waiters += [
            f"{item['user']} here ({format_duration(float(item['waiting_for']))})" for item in local
        ]
        if waiters:
            numbered = "  ".join(f"{index}. {who}" for index, who in enumerate(waiters, start=1))
            lines.append(f"waiting for {entry['lock']}: {numbered}")
    if lines:
        lines.insert(0, "")
    return lines


def describe_freeze(freeze: dict[str, Any]) -> str:
    """Describe a freeze: what, by whom, since and until when, and why."""
    what = "all locks" if freeze.get("scope") == ALL_LOCKS else str(freeze.get("scope"))
    return f"{what} by {describe_freeze_origin(freeze)}"


def describe_freeze_origin(freeze: dict[str, Any]) -> str:
    """Describe who set a freeze, since and until when, and why."""
    until = freeze.get("until")
    until_text = f" until {clock_time(float(until))}" if isinstance(until, int | float) else ""
    return (
        f"{freeze.get('by')} since {clock_time(float(freeze.get('at', 0)))}"
        f"{until_text}: {freeze.get('reason')!r}"
    )


_COLOR_CODES = {"red": "31", "green": "32", "yellow": "33", "cyan": "36", "bold": "1", "dim": "2"}


def paint(text: str, color: str, enabled: bool) -> str:
    """Wrap ``text`` in the ANSI code of ``color`` when ``enabled``; unknown colors are ignored."""
    code = _COLOR_CODES.get(color)
    if not enabled or code is None:
        return text
    return f"\x1b[{code}m{text}\x1b[0m"


def visible_length(text: str) -> int:
    """Return the length of ``text`` on a terminal, without its ANSI color codes."""
    length = 0
    inside = False
    for char in text:
        if char == "\x1b":
            inside = True
        elif inside:
            inside = char != "m"
        else:
            length += 1
    return length


def table(rows: list[list[str]], color: bool = False) -> str:
    """Align ``rows`` in columns two spaces apart; the first row is the header."""
    widths = [max(visible_length(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell + " " * (width - visible_length(cell))
            for cell, width in zip(row, widths, strict=True)
        ]
        text = "  ".join(cells).rstrip()
        lines.append(paint(text, "bold", color) if index == 0 else text)
    return "\n".join(lines)
