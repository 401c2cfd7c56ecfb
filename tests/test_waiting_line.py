"""The line that ``deployd run --wait`` shows while it waits, on a terminal and on pipes.

On a terminal (a pseudo-terminal here, as an interactive shell would give)
one line is redrawn in place. It shows the holder, how long it has held the
lock, the caller's place in line, an ETA from the lock's recent deploys, and
the time waited so far, which moves. On pipes the command prints one line when
the wait starts and one when it ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import DEPLOYD, DaemonProcess, ShellHolder, Workstation, wait_until
from report_rigs import HOST, USER, seed_deploys, terminal_command

from deployd_client.display import describe_eta

# Redraws start with a carriage return and "erase to the end of the line".
REDRAW = "\r\x1b[K"
# The median duration of the lock's recent deploys, which the ETA is based on.
MEDIAN_DEPLOY = 300.0
# One drawing of the waiting line; the ETA is missing until the daemon has read the durations.
LINE = re.compile(
    rf"deployd: waiting for api: held by {USER} on {HOST}, since \d\d:\d\d:\d\d [A-Z]\S* "
    r"\((?P<held>\S+) ago\), reason 'schema change'; you are 1st in line"
    r"(?:; ETA ~(?P<eta>\S+))? \(waiting (?P<waited>\S+)\)"
)


class TerminalOutput(threading.Thread):
    """Read everything a process writes to its pseudo-terminal until the terminal closes."""

    def __init__(self, controller: int) -> None:
        super().__init__(daemon=True)
        self.controller = controller
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.controller, 4096)
            except OSError:
                # EIO: every process with the terminal open has closed it.
                return
            if not data:
                return
            with self._lock:
                self._chunks.append(data)

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")


def with_recent_deploys(workstation: Workstation) -> None:
    """Record three finished deploys of ``api`` in the last hour, so that waiters get an ETA."""
    hour_ago = time.time() - 3600
    durations = (MEDIAN_DEPLOY - 60, MEDIAN_DEPLOY, MEDIAN_DEPLOY + 60)
    deploys = [(hour_ago + index * 900, duration) for index, duration in enumerate(durations)]
    seed_deploys(workstation.store_file, "api", deploys)


def seconds(text: str) -> float:
    """Parse what format_duration printed: ``850ms``, ``4.5s``, ``42s`` or ``4m58s``."""
    match = re.fullmatch(r"(?:(\d+)m)?([0-9.]+)(m?s)", text)
    assert match is not None, text
    minutes, number, unit = match.groups()
    value = float(number) / (1000 if unit == "ms" else 1)
    return value + 60 * int(minutes or 0)


def test_waiting_line_on_terminal(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    with_recent_deploys(workstation)
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api", "--reason", "schema change")
    process = None
    reader = None
    try:
        holder.lease()
        process, controller = terminal_command(
            [*DEPLOYD, "run", "api", "--wait", "30s", "--", "true"], workstation.env()
        )
        reader = TerminalOutput(controller)
        reader.start()
        # Four redraws with the ETA, a second apart: the elapsed time has moved.
        wait_until(lambda: len(re.findall(r"; ETA ~", reader.text())) >= 4, timeout=20)
        during = reader.text()
        holder.kill()
        assert process.wait(30) == 0, reader.text()
        reader.join(10)
        output = reader.text()
    finally:
        holder.kill()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        if reader is not None:
            os.close(reader.controller)

    # One line, redrawn in place, until the wait ends.
    assert "\n" not in during
    # Every drawing but the last is complete: another one followed it.
    frames = [frame for frame in during.split(REDRAW) if frame][:-1]
    matches = [LINE.fullmatch(frame) for frame in frames]
    assert all(matches), frames
    # The daemon reads the lock's recent durations after the first event.
    with_eta = [match for match in matches if match and match.group("eta")]
    assert len(with_eta) >= 3, frames
    waited = [seconds(match.group("waited")) for match in with_eta]
    assert waited == sorted(waited), frames
    assert waited[-1] > waited[0], frames
    held = [seconds(match.group("held")) for match in with_eta]
    assert held[-1] > held[0], frames
    # The holder is younger than the median deploy: the ETA is the rest of it, counting down.
    left = [seconds(match.group("eta")) for match in with_eta]
    assert MEDIAN_DEPLOY - 30 < left[0] < MEDIAN_DEPLOY, frames
    assert left == sorted(left, reverse=True), frames
    assert left[-1] < left[0], frames
    end = output.split(REDRAW)[-1]
    assert end.startswith("deployd: api: got the lock after waiting "), output
    assert end.endswith("\r\n"), output


def queued_for(workstation: Workstation) -> float:
    """Return how long the first caller in the daemon's queue for ``api`` has waited."""
    queue = workstation.local_queue("api")
    return float(queue[0]["waiting_for"]) if queue else 0.0


def test_waiting_lines_on_pipes(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    with_recent_deploys(workstation)
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    waiter = None
    try:
        holder.lease()
        stderr_file = tmp_path / "waiter.stderr"
        with open(stderr_file, "wb") as stderr_sink:
            waiter = workstation.spawn(
                "run",
                "api",
                "--wait",
                "30s",
                "--",
                "true",
                stdout=subprocess.DEVNULL,
                stderr=stderr_sink,
            )
        wait_until(lambda: stderr_file.read_text().endswith("\n"))
        # Long enough in line that a terminal would have shown several redraws.
        wait_until(lambda: queued_for(workstation) > 2.5)
        holder.kill()
        waiter.wait(30)
        stderr = stderr_file.read_text()
    finally:
        holder.kill()
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.wait(10)

    assert waiter.returncode == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    assert lines[0].startswith(f"deployd: waiting for api: held by {USER} on {HOST}, since ")
    assert "you are 1st in line" in lines[0]
    # The start line waits for the ETA, which the daemon sends once it has read recent deploys.
    assert re.search(r"; ETA ~\S+$", lines[0]), lines[0]
    assert "\x1b" not in stderr
    assert "\r" not in stderr
    assert lines[1].startswith("deployd: api: got the lock after waiting ")


# --- the estimate ---

NOW = 1_770_000_000.0


def queue_event(
    held_for: float | None,
    typical: float | None,
    position: int = 1,
    frozen: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a queue_position event whose holder has held the lock ``held_for`` seconds at NOW."""
    holder = None if held_for is None else {"owner": {"user": "bob"}, "acquired_at": NOW - held_for}
    return {
        "event": "queue_position",
        "position": position,
        "holder": holder,
        "typical_duration": typical,
        "frozen": frozen,
    }


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(queue_event(8.0, 30.0), "ETA ~22s", id="holder-halfway"),
        pytest.param(queue_event(8.0, 30.0, position=3), "ETA ~1m22s", id="two-ahead"),
        pytest.param(
            queue_event(45.0, 30.0),
            "the holder is taking longer than usual (45s so far, usually 30s)",
            id="holder-past-usual",
        ),
        pytest.param(
            queue_event(45.0, 30.0, position=2),
            "the holder is taking longer than usual (45s so far, usually 30s); "
            "ETA ~30s after it ends",
            id="past-usual-one-ahead",
        ),
        pytest.param(queue_event(0.1, 0.4), "ETA <1s", id="sub-second-fresh"),
        pytest.param(
            queue_event(2.0, 0.4),
            "the holder is taking longer than usual (2s so far, usually 400ms)",
            id="sub-second-past-usual",
        ),
        pytest.param(queue_event(None, 30.0, position=2), "ETA ~30s", id="no-holder-one-ahead"),
        pytest.param(queue_event(None, 30.0), None, id="no-holder-next"),
        pytest.param(queue_event(8.0, None), None, id="no-recent-deploys"),
        pytest.param(
            queue_event(8.0, 30.0, frozen={"scope": "*", "reason": "x"}), None, id="frozen"
        ),
    ],
)
def test_eta_text(event: dict[str, Any], expected: str | None) -> None:
    assert describe_eta(event, NOW) == expected


def test_eta_moves_with_holder_age() -> None:
    event = queue_event(8.0, 30.0)

    later = [describe_eta(event, NOW + seconds) for seconds in (0.0, 10.0, 21.5, 22.5)]

    assert later == [
        "ETA ~22s",
        "ETA ~12s",
        "ETA <1s",
        "the holder is taking longer than usual (30s so far, usually 30s)",
    ]


def test_short_deploys_never_show_overdue(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """Behind a holder that takes longer than the lock's sub-second deploys, the line shows that."""
    hour_ago = time.time() - 3600
    seed_deploys(workstation.store_file, "api", [(hour_ago + index, 0.3) for index in range(3)])
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    process = None
    reader = None
    try:
        holder.lease()
        process, controller = terminal_command(
            [*DEPLOYD, "run", "api", "--wait", "30s", "--", "true"], workstation.env()
        )
        reader = TerminalOutput(controller)
        reader.start()
        wait_until(lambda: "longer than usual" in reader.text(), timeout=20)
        # Two redraws later, the line still shows it and the time so far has moved.
        shown = reader.text().count(REDRAW)
        wait_until(lambda: reader.text().count(REDRAW) >= shown + 2, timeout=20)
        during = reader.text()
        holder.kill()
        assert process.wait(30) == 0, reader.text()
        reader.join(10)
        output = reader.text()
    finally:
        holder.kill()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        if reader is not None:
            os.close(reader.controller)

    assert "overdue" not in output
    frames = [frame for frame in during.split(REDRAW) if frame][:-1]
    past = [frame for frame in frames if "longer than usual" in frame]
    assert len(past) >= 2, frames
    assert all("usually 300ms)" in frame for frame in past), frames
    matches = [re.search(r"\((\S+) so far", frame) for frame in past]
    so_far = [seconds(match.group(1)) for match in matches if match]
    assert len(so_far) == len(past), frames
    assert so_far == sorted(so_far), frames
    assert so_far[-1] > so_far[0], frames


# --- a wait that runs out ---


def test_wait_timeout_prints_one_line_on_terminal(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    process = None
    reader = None
    try:
        holder.lease()
        process, controller = terminal_command(
            [*DEPLOYD, "run", "api", "--wait", "2s", "--", "true"], workstation.env()
        )
        reader = TerminalOutput(controller)
        reader.start()
        assert process.wait(30) == 75, reader.text()
        reader.join(10)
        output = reader.text()
    finally:
        holder.kill()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        if reader is not None:
            os.close(reader.controller)

    # The waiting line is erased, and the error is the one line left on the screen.
    shown = output.split(REDRAW)[-1]
    assert shown.startswith("deployd: gave up waiting for api after 2s (held by "), output
    assert shown.endswith("\r\n"), output
    assert shown.count("\n") == 1, output
    assert "gave up after waiting" not in output


def test_wait_timeout_prints_one_line_on_pipes(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    try:
        holder.lease()
        result = workstation.deployd("run", "api", "--wait", "1s", "--", "true")
    finally:
        holder.kill()

    assert result.returncode == 75, result.stderr
    start_line, error_line = result.stderr.splitlines()
    assert start_line.startswith("deployd: waiting for api: held by "), result.stderr
    assert error_line.startswith("deployd: gave up waiting for api after 1s (held by ")


def test_sizeless_terminal_shows_whole_line(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A terminal that reports 0 columns (script, docker exec -t) gets 80, not a cut line."""
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    process = None
    reader = None
    try:
        holder.lease()
        process, controller = terminal_command(
            [*DEPLOYD, "run", "api", "--wait", "2s", "--", "true"], workstation.env(), columns=0
        )
        reader = TerminalOutput(controller)
        reader.start()
        assert process.wait(30) == 75, reader.text()
        reader.join(10)
        output = reader.text()
    finally:
        holder.kill()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        if reader is not None:
            os.close(reader.controller)

    drawn = [line for line in output.split(REDRAW) if line.startswith("deployd: waiting")]
    assert drawn, output
    assert all(len(line) >= 70 for line in drawn), drawn


def test_narrow_terminal_keeps_place_in_line(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """On an 80-column terminal the holder's details give way to the caller's place in line."""
    start(workstation)
    holder = ShellHolder(
        workstation, tmp_path / "holder", "api", "--commit", "abc1234", "--reason", "fix login"
    )
    process = None
    reader = None
    try:
        holder.lease()
        process, controller = terminal_command(
            [*DEPLOYD, "run", "api", "--wait", "3s", "--", "true"], workstation.env(), columns=80
        )
        reader = TerminalOutput(controller)
        reader.start()
        assert process.wait(30) == 75, reader.text()
        reader.join(10)
        output = reader.text()
    finally:
        holder.kill()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        if reader is not None:
            os.close(reader.controller)

    drawn = [line for line in output.split(REDRAW) if line.startswith("deployd: waiting")]
    assert any("you are 1st in line" in line for line in drawn), drawn
    assert all(len(line) < 80 for line in drawn), drawn
