"""``deployd run --capture-output``: pass a command's output through and keep its last lines.

The command's stdout and stderr go to two pipes instead of the terminal.
``deployd run`` copies everything it reads to its own stdout and stderr,
and keeps the last TAIL_LINES lines for the release, so that a failure
message in Slack can show them. It is opt-in because a pipe is not a
terminal: commands then stop using colours and progress bars, and may
buffer their output in larger blocks.
"""

from __future__ import annotations

import errno
import os
from collections import deque

TAIL_LINES = 20
# A kept line is cut after this many characters, which also keeps the
# release request well under the protocol's 64 KiB line limit.
MAX_LINE_CHARS = 300
# Bytes kept of a line that has no newline yet, so a command that never
# writes one cannot make the client hold its whole output.
MAX_LINE_BYTES = 4 * MAX_LINE_CHARS
READ_SIZE = 65536


class _Stream:
    """One pipe from the command, copied to ``target`` (1 or 2)."""

    def __init__(self, target: int) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self.target = target
        self.partial = b""
        self.open = True
        self.copy = True

    def copy_out(self, data: bytes) -> None:
        """Write ``data`` to the target; stop copying (but keep reading) once its reader is gone."""
        view = memoryview(data)
        while self.copy and view:
            try:
                written = os.write(self.target, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                # A non-blocking terminal or pipe is full: wait for it, as a plain write would.
                import select

                select.select([], [self.target], [])
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF):
                    self.copy = False
                    return
                raise
            view = view[written:]


class OutputCapture:
    """The pipes of one command and the tail of what it printed."""

    def __init__(self, tail_lines: int = TAIL_LINES) -> None:
        self._streams = [_Stream(1), _Stream(2)]
        self._tail: deque[str] = deque(maxlen=tail_lines)

    def file_actions(self) -> list[tuple[int, int, int]]:
        """Return the posix_spawn file actions that connect the command to the pipes."""
        return [(os.POSIX_SPAWN_DUP2, stream.write_fd, stream.target) for stream in self._streams]

    def spawned(self) -> None:
        """Close this process's copies of the write ends, so the pipes end with the command."""
        for stream in self._streams:
            if stream.write_fd >= 0:
                os.close(stream.write_fd)
                stream.write_fd = -1

    def fds(self) -> list[int]:
        """Return the pipes still open, for select()."""
        return [stream.read_fd for stream in self._streams if stream.open]

    def pump(self, ready: list[int]) -> None:
        """Read whatever the ready pipes hold, copy it out and note complete lines."""
        for stream in self._streams:
            if stream.open and stream.read_fd in ready:
                self._read(stream)

    def drain(self) -> None:
        """Read what is left in the pipes without waiting, then close them.

        A background process that the command left behind may keep a pipe
        open; its later output is not shown.
        """
        for stream in self._streams:
            while stream.open and self._read(stream):
                pass
            self._close(stream)
        self._note_partial()

    def tail(self) -> list[str]:
        """Return the last lines the command printed, oldest first."""
        return list(self._tail)

    def close(self) -> None:
        """Close every pipe end that is still open."""
        self.spawned()
        for stream in self._streams:
            self._close(stream)

    def _read(self, stream: _Stream) -> bool:
        """Read once from ``stream``; return whether it returned data."""
        try:
            data = os.read(stream.read_fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            self._close(stream)
            return False
        stream.copy_out(data)
        self._note_lines(stream, data)
        return True

    def _note_lines(self, stream: _Stream, data: bytes) -> None:
        lines = (stream.partial + data).split(b"\n")
        stream.partial = lines.pop()[:MAX_LINE_BYTES]
        for line in lines:
            self._tail.append(_text(line))

    def _note_partial(self) -> None:
        for stream in self._streams:
            if stream.partial:
                self._tail.append(_text(stream.partial))
                stream.partial = b""

    def _close(self, stream: _Stream) -> None:
        if stream.open:
            os.close(stream.read_fd)
            stream.open = False


def _text(line: bytes) -> str:
    return line[:MAX_LINE_BYTES].decode("utf-8", "replace")[:MAX_LINE_CHARS]
