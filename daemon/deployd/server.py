"""The daemon's socket server: newline-delimited JSON over a Unix stream socket.

Each request is one JSON object on one line with ``v``, ``id`` and ``op``;
each response carries the same ``id`` with ``ok`` and a ``result`` or an
``error``. A connection may have several requests in flight (a waiting
acquire does not block a status call on the same connection), and the
daemon may push events (``queue_position``, ``lease_lost``) between
responses. Bad input gets an error response and never affects other
connections.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup

from deployd.errors import DeploydError
from deployd.peercred import PeerCredentials, peer_credentials

logger = logging.getLogger("deployd.server")

PROTOCOL_VERSIONS = (1,)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits, in bytes, seconds and counts."""

    max_line: int = 64 * 1024
    max_connections: int = 256
    max_requests_in_flight: int = 32
    idle_timeout: float = 300.0
    half_line_timeout: float = 10.0
    send_timeout: float = 10.0


class ProtocolError(DeploydError):
    """A request line that cannot be handled: malformed JSON, wrong shape, unknown op."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


Handler = Callable[["Connection", dict[str, Any]], Awaitable[dict[str, Any]]]
# Ops whose requests are withdrawn when the client closes its side, because
# they only make sense while the client waits for the answer.
# Seconds between log lines about rejected connections, so that a flood of
# clients cannot flood the log.
REJECTION_LOG_INTERVAL = 10.0
CANCEL_ON_CLOSE = frozenset({"acquire", "hold"})


class Connection:
    """One client connection: framing, limits, ordered sending and pushed events."""

    def __init__(
        self,
        stream: SocketStream,
        peer: PeerCredentials | None,
        limits: Limits,
        number: int,
    ) -> None:
        self.stream = stream
        self._socket: socket.socket = stream.extra(SocketAttribute.raw_socket)
        self.peer = peer
        self.limits = limits
        self.number = number
        self.bound_leases: set[str] = set()
        self.in_flight = 0
        # Cancel scopes of the requests withdrawn when the client closes its side.
        self.wait_scopes: set[anyio.CancelScope] = set()
        self.scope: anyio.CancelScope | None = None
        self._outbox_send, self._outbox_receive = anyio.create_memory_object_stream[bytes](math.inf)
        # Messages queued in the outbox or being sent by send_loop. While there
        # are none, push() writes to the socket itself, which saves a task switch.
        self._unsent = 0
        self._closed = False

    def __repr__(self) -> str:
        pid = self.peer.pid if self.peer else None
        return f"<Connection #{self.number} pid={pid}>"

    @property
    def peer_pid(self) -> int | None:
        """Return the client's pid, where the platform reports it."""
        return self.peer.pid if self.peer else None

    def push(self, message: dict[str, Any]) -> None:
        """Send a message (an event or a response), or queue it for sending, without waiting.

        With nothing queued before it, the message goes to the socket at once.
        What the socket's buffer does not take waits in the outbox.
        """
        if self._closed:
            return
        data = (json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        if self._unsent == 0:
            try:
                sent = self._socket.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                logger.info("closing %r: sending failed: %s", self, exc)
                self.close()
                return
            if sent == len(data):
                return
            data = data[sent:]
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._outbox_send.send_nowait(data)
            self._unsent += 1

    def close(self) -> None:
        """Close the connection: stop reading and sending."""
        self._closed = True
        if self.scope is not None:
            self.scope.cancel()

    async def send_loop(self) -> None:
        """Send queued messages in order; close the connection if the client stops reading."""
        async with self._outbox_receive:
            async for first in self._outbox_receive:
                # Messages queued meanwhile go out with the first in one send.
                chunks = [first]
                with contextlib.suppress(anyio.WouldBlock):
                    while True:
                        chunks.append(self._outbox_receive.receive_nowait())
                try:
                    with anyio.fail_after(self.limits.send_timeout):
                        await self.stream.send(b"".join(chunks))
                    self._unsent -= len(chunks)
                except (
                    TimeoutError,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    OSError,
                ) as exc:
                    logger.info("closing %r: sending failed: %s", self, exc or type(exc).__name__)
                    self.close()
                    return

    def idle(self) -> bool:
        """Return whether nothing is in flight or bound, so an idle timeout may close it."""
        return self.in_flight == 0 and not self.bound_leases

    def outbox_empty(self) -> bool:
        """Return whether every queued message has been handed to the socket."""
        return self._unsent == 0

    def mark_closed(self) -> None:
        """Stop queueing messages; the connection is going away."""
        self._closed = True


class Server:
    """Accept connections and dispatch their requests to the op handlers."""

    def __init__(
        self,
        handlers: dict[str, Handler],
        limits: Limits | None = None,
        on_close: Callable[[Connection], None] | None = None,
        check_peer: Callable[[PeerCredentials | None], str | None] | None = None,
    ) -> None:
        self.handlers = handlers
        self.limits = limits or Limits()
        self._on_close = on_close
        self._check_peer = check_peer or same_user
        self._connections: set[Connection] = set()
        self._numbers = 0
        self._rejections_logged_at = -math.inf
        self._rejections_not_logged = 0

    @property
    def connection_count(self) -> int:
        """Return how many clients are connected."""
        return len(self._connections)

    async def serve(self, listener: SocketListener, task_group: TaskGroup) -> None:
        """Accept connections until cancelled; each runs in ``task_group``."""
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                logger.error("accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            task_group.start_soon(self._handle_connection, stream)

    def _log_rejection(self, connection: Connection, rejection: str) -> None:
        """Log a rejected connection; a burst logs its first one, then a count every 10 s."""
        now = time.monotonic()
        if now - self._rejections_logged_at >= REJECTION_LOG_INTERVAL:
            more = self._rejections_not_logged
            also = f" (and {more} more rejected since the last such line)" if more else ""
            logger.warning("rejected %r: %s%s", connection, rejection, also)
            self._rejections_logged_at = now
            self._rejections_not_logged = 0
        else:
            self._rejections_not_logged += 1

    async def _handle_connection(self, stream: SocketStream) -> None:
        self._numbers += 1
        raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
        try:
            peer = peer_credentials(raw)
        except OSError as exc:
            logger.warning("cannot read peer credentials: %s", exc)
            peer = None
        connection = Connection(stream, peer, self.limits, self._numbers)

        rejection = self._check_peer(peer)
        if rejection is None and len(self._connections) >= self.limits.max_connections:
            rejection = (
                f"too many connections ({self.limits.max_connections}); "
                "close idle clients and retry"
            )
            code = "too_many_connections"
        else:
            code = "permission_denied"
        if rejection is not None:
            self._log_rejection(connection, rejection)
            await _send_and_close(stream, error_response(None, code, rejection))
            return

        self._connections.add(connection)
        logger.debug("accepted %r", connection)
        try:
            async with anyio.create_task_group() as task_group:
                connection.scope = task_group.cancel_scope
                task_group.start_soon(connection.send_loop)
                await self._read_loop(connection, task_group)
                # The client closed its side: withdraw waits, let quick requests answer.
                for scope in list(connection.wait_scopes):
                    scope.cancel()
                await self._drain(connection)
                task_group.cancel_scope.cancel()
        finally:
            self._connections.discard(connection)
            connection.mark_closed()
            if self._on_close is not None:
                self._on_close(connection)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            logger.debug("closed %r", connection)

    async def _read_loop(self, connection: Connection, task_group: TaskGroup) -> None:
        limits = self.limits
        buffer = b""
        discarding = False
        while True:
            if buffer and not discarding:
                timeout = limits.half_line_timeout
            elif connection.idle():
                timeout = limits.idle_timeout
            else:
                timeout = math.inf
            with anyio.move_on_after(timeout) as scope:
                try:
                    data = await connection.stream.receive(65536)
                except (
                    anyio.EndOfStream,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    OSError,
                ):
                    return
            if scope.cancelled_caught:
                if buffer and not discarding:
                    message = (
                        f"incomplete request: {len(buffer)} bytes without a newline for "
                        f"{limits.half_line_timeout:g}s; end each request with a newline"
                    )
                    connection.push(error_response(None, "bad_request", message))
                    logger.info("closing %r: %s", connection, message)
                else:
                    logger.debug("closing idle %r", connection)
                await anyio.sleep(0)  # let the sender flush the message
                await _wait_outbox_flushed(connection)
                return

            buffer += data
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    break
                line, buffer = buffer[:newline], buffer[newline + 1 :]
                if discarding:
                    discarding = False
                    continue
                if len(line) > limits.max_line:
                    connection.push(_line_too_long(limits))
                    continue
                self._dispatch(connection, line, task_group)
            if discarding:
                # The rest of a line that was too long: drop it as it arrives, so
                # a client that never sends the newline cannot fill the memory.
                buffer = b""
            elif len(buffer) > limits.max_line:
                connection.push(_line_too_long(limits))
                logger.warning(
                    "%r sent a line longer than %d bytes; skipping it", connection, limits.max_line
                )
                buffer = b""
                discarding = True

    def _dispatch(self, connection: Connection, line: bytes, task_group: TaskGroup) -> None:
        if not line.strip():
            return
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            request_id = _request_id_of(line)
            connection.push(error_response(request_id, exc.code, str(exc)))
            return
        request_id = request.get("id")
        op = request["op"]
        handler = self.handlers.get(op)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            connection.push(
                error_response(request_id, "unknown_op", f"unknown op {op!r}; known ops: {known}")
            )
            return
        if connection.in_flight >= self.limits.max_requests_in_flight:
            connection.push(
                error_response(
                    request_id,
                    "bad_request",
                    f"too many requests in flight on one connection "
                    f"({self.limits.max_requests_in_flight}); wait for answers before sending more",
                )
            )
            return
        connection.in_flight += 1
        scope = anyio.CancelScope()
        if op in CANCEL_ON_CLOSE:
            connection.wait_scopes.add(scope)
        task_group.start_soon(self._run_handler, connection, handler, request, scope)

    async def _run_handler(
        self,
        connection: Connection,
        handler: Handler,
        request: dict[str, Any],
        scope: anyio.CancelScope,
    ) -> None:
        request_id = request.get("id")
        try:
            with scope:
                try:
                    result = await handler(connection, request)
                except DeploydError as exc:
                    response = error_response(request_id, exc.code, str(exc), exc.details())
                except Exception as exc:
                    logger.exception(
                        "internal error handling op=%s on %r", request.get("op"), connection
                    )
                    response = error_response(
                        request_id,
                        "internal",
                        f"internal error in the daemon: {type(exc).__name__}: {exc}; "
                        "see the daemon log",
                    )
                else:
                    response = {"id": request_id, "ok": True, "result": result}
                connection.push(response)
        finally:
            connection.in_flight -= 1
            connection.wait_scopes.discard(scope)

    async def _drain(self, connection: Connection) -> None:
        """Wait for the remaining quick requests of a half-closed client, then flush."""
        with anyio.move_on_after(self.limits.send_timeout):
            while connection.in_flight:
                await anyio.sleep(0.01)
            await _wait_outbox_flushed(connection)


async def _wait_outbox_flushed(connection: Connection) -> None:
    with anyio.move_on_after(connection.limits.send_timeout):
        while not connection.outbox_empty():
            await anyio.sleep(0.01)


def same_user(peer: PeerCredentials | None) -> str | None:
    """Return why a peer is rejected, or None when it runs as this daemon's user."""
    if peer is None:
        return None
    if peer.uid != os.getuid():
        return (
            f"permission denied: this daemon serves uid {os.getuid()} only, and the client "
            f"runs as uid {peer.uid}; run your own daemon as your user"
        )
    return None


def parse_request(line: bytes) -> dict[str, Any]:
    """Decode and check the envelope of one request line; raise ProtocolError when invalid."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(
            "bad_request", f"malformed JSON: {exc}; send one JSON object per line"
        ) from exc
    if not isinstance(request, dict):
        raise ProtocolError(
            "bad_request", f"a request must be a JSON object, got {type(request).__name__}"
        )
    request_id = request.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, int | str)
    ):
        raise ProtocolError("bad_request", f"id must be an integer or a string, got {request_id!r}")
    version = request.get("v")
    if isinstance(version, bool) or version not in PROTOCOL_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"unsupported protocol version v={version!r}; this daemon speaks "
            f"{', '.join(map(str, PROTOCOL_VERSIONS))}; upgrade the client or the daemon",
        )
    op = request.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError("bad_request", f"op must be a non-empty string, got {op!r}")
    return request


def error_response(
    request_id: object, code: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return an error response in the protocol's shape."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error.update(details)
    return {"id": request_id, "ok": False, "error": error}


def _line_too_long(limits: Limits) -> dict[str, Any]:
    return error_response(
        None,
        "line_too_long",
        f"request line longer than {limits.max_line} bytes; the line was skipped",
    )


def _request_id_of(line: bytes) -> object:
    """Return the id of a request that failed validation, when the line is a JSON object."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if isinstance(data, dict):
        request_id = data.get("id")
        if isinstance(request_id, int | str) and not isinstance(request_id, bool):
            return request_id
    return None


async def _send_and_close(stream: SocketStream, response: dict[str, Any]) -> None:
    data = (json.dumps(response) + "\n").encode()
    try:
        with anyio.fail_after(2):
            await stream.send(data)
    except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
