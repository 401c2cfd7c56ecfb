"""The client side of the protocol: one connection to the daemon's Unix socket.

Requests and responses are JSON objects, one per line. Besides responses
the daemon pushes events (``queue_position``, ``lease_lost``); they carry
the id of the request they concern, or none.
"""

from __future__ import annotations

# The C module behind ``socket``: the Python wrapper imports enum and more,
# which costs every client call time for no benefit here.
import _socket
import errno
import os
import time

from deployd_client import jsonline, paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Event = dict[str, Any]  # a pushed event: a JSON object with an "event" key

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024


class ClientError(Exception):
    """Base class of the client's errors; ``code`` is a protocol error code."""

    code = "internal"


class DaemonError(ClientError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.code = code
        self.details = details or {}
        super().__init__(message)


class NoDaemon(ClientError):
    """No daemon listens on the socket (missing file, or connection refused)."""

    code = "no_daemon"


class SocketPermissionDenied(ClientError):
    """The socket or its directory is not accessible to this user."""

    code = "permission_denied"


class ConnectionLost(ClientError):
    """The daemon closed the connection before answering."""

    code = "connection_lost"


class Connection:
    """A connection to the daemon that sends requests and reads responses and events."""

    def __init__(self, sock: _socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._buffer = b""
        self._next_id = 0
        self._closed = False

    @classmethod
    def connect(cls, path: str | None = None, timeout: float = 5.0) -> Connection:
        """Connect to the daemon's socket at ``path`` (default: the standard path).

        Raises NoDaemon when nothing listens there, SocketPermissionDenied when
        the socket is not ours; never removes or changes the socket file.
        """
        path = path or paths.socket_path()
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            with paths.socket_address(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise NoDaemon(f"no deployd daemon is listening on {path}") from exc
        except PermissionError as exc:
            sock.close()
            raise SocketPermissionDenied(
                f"permission denied on the deployd socket {path}: it or its directory belongs "
                "to another user or is not accessible; run deployd as the user who started the "
                "daemon, or set DEPLOYD_SOCKET to a socket of your own"
            ) from exc
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENOTDIR, errno.ENOENT, errno.ECONNREFUSED):
                raise NoDaemon(f"no deployd daemon is listening on {path}") from exc
            raise NoDaemon(f"cannot connect to {path}: {exc.strerror or exc}") from exc
        sock.settimeout(None)
        return cls(sock, path)

    def fileno(self) -> int:
        """Return the socket's descriptor, for select()."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection."""
        if not self._closed:
            self._closed = True
            self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; return its id."""
        self._next_id += 1
        message = {"v": PROTOCOL_VERSION, "id": self._next_id, "op": op}
        message.update({key: value for key, value in fields.items() if value is not None})
        data = (jsonline.dumps(message) + "\n").encode()
        try:
            self.sock.sendall(data)
        except OSError as exc:
            rejection = self._read_rejection()
            if rejection is not None:
                raise rejection from exc
            raise ConnectionLost(
                f"the daemon closed the connection: {exc.strerror or exc}"
            ) from exc
        return self._next_id

    def _read_rejection(self) -> DaemonError | None:
        """Return the error that the daemon sent before closing the connection, if any.

        The daemon rejects a connection (another user, too many clients) with
        one error line and closes it, often before the client's first request
        arrives, so sending fails while the reason waits to be read.
        """
        try:
            message = self.read_message(timeout=1.0)
        except ClientError:
            return None
        if message is None or message.get("ok") is not False:
            return None
        try:
            unwrap(message)
        except DaemonError as exc:
            return exc
        return None

    def read_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Return the next message, or None if ``timeout`` passes first.

        Raises ConnectionLost when the daemon closes the connection.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line, self._buffer = self._buffer[:newline], self._buffer[newline + 1 :]
                try:
                    message = jsonline.loads(line.decode("utf-8", "replace"))
                except ValueError as exc:
                    raise ConnectionLost(f"the daemon sent a malformed message: {exc}") from exc
                if isinstance(message, dict):
                    return message
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return None
            except OSError as exc:
                raise ConnectionLost(
                    f"lost the connection to the daemon: {exc.strerror or exc}"
                ) from exc
            finally:
                self.sock.settimeout(None)
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._buffer += data

    def has_buffered_message(self) -> bool:
        """Return whether a whole message is already buffered (select() would not show it)."""
        return b"\n" in self._buffer

    def wait_response(
        self,
        request_id: int,
        on_event: Callable[[Event], None] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Read until the response to ``request_id``; pass events to ``on_event``.

        Returns the result of a successful response; raises DaemonError for an
        error response (including one with no id, which the daemon sends for
        lines it could not parse) and ConnectionLost on timeout or close.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ConnectionLost(
                    f"the deployd daemon on {self.path} did not respond in time; it may be "
                    "stopped or overloaded: see its log"
                )
            message = self.read_message(remaining)
            if message is None:
                continue
            if "event" in message:
                if on_event is not None:
                    on_event(message)
                continue
            if message.get("id") not in (request_id, None):
                continue
            return unwrap(message)

    def request(
        self,
        op: str,
        on_event: Callable[[Event], None] | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send a request and wait for its result."""
        return self.wait_response(self.send(op, **fields), on_event, timeout)


def unwrap(message: dict[str, Any]) -> dict[str, Any]:
    """Return a response's result, or raise DaemonError for an error response."""
    if message.get("ok"):
        result = message.get("result")
        return result if isinstance(result, dict) else {}
    error = message.get("error") or {}
    code = str(error.get("code", "internal"))
    text = str(error.get("message", "the daemon reported an error without a message"))
    details = {key: value for key, value in error.items() if key not in ("code", "message")}
    raise DaemonError(code, text, details)


def no_autostart() -> bool:
    """Return whether DEPLOYD_NO_AUTOSTART forbids starting a daemon."""
    return os.environ.get("DEPLOYD_NO_AUTOSTART", "") not in ("", "0")
