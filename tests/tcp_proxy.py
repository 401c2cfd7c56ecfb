"""A loopback TCP proxy in front of a gRPC server, for fault tests.

It forwards whole HTTP/2 frames, so it can count the gRPC requests that pass
and act on one exact request. Faults:

- ``lose_reply(n)``: forward the n-th request from now, drop everything the
  server sends afterwards on that connection, and close the connection once
  the server has finished its reply. The server processes the request, and
  the client never receives the reply.
- ``delay_replies(seconds)``: hold every frame from the server this long.
- ``reply_latency(seconds)``: hold the first frame of each reply this long,
  as a network round trip would delay it. Frames on one connection share a
  thread, so RPCs sent side by side wait for each other.
- ``blackhole()``: accept connections and forward nothing in either
  direction, so calls hang until their deadline.

The proxy listens on 127.0.0.1 and connects only to the upstream address it
is given. Each connection uses two threads, one per direction.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

# The client's connection preface (RFC 9113, section 3.4), sent before any frame.
_PREFACE_LENGTH = 24
_FRAME_HEADER_LENGTH = 9
_HEADERS_FRAME = 0x1
_END_STREAM_FLAG = 0x1
# Seconds to wait for the server's reply to a lost request before closing anyway.
_LOST_REPLY_WAIT = 2.0


class _Connection:
    """One client connection and, unless it is blackholed, its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.highest_stream = 0
        # The streams whose reply has started, for the reply latency.
        self.replying_streams: set[int] = set()
        # The stream whose reply is lost; set when its request has been forwarded.
        self.lost_stream: int | None = None
        self.muted = threading.Event()
        self.closed = threading.Event()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forward connections from a loopback port to ``upstream`` (``host:port``)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._blackholed = False
        self._reply_delay = 0.0
        self._reply_latency = 0.0
        self._lose_countdown: int | None = None
        self._blackhole_after_loss = False
        self.requests = 0
        self.lost_replies = 0

    @property
    def address(self) -> str:
        """Return the proxy's address, for FIRESTORE_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        """Start accepting connections; return the proxy."""
        self._spawn(self._accept_loop)
        return self

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopping.set()
        self.drop_connections()
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- faults ---

    def lose_reply(self, request_number: int = 1, then_blackhole: bool = False) -> None:
        """Lose the reply to the ``request_number``-th request from now.

        With ``then_blackhole``, the proxy also blackholes every connection
        from the moment that request has been forwarded.
        """
        with self._lock:
            self._lose_countdown = request_number
            self._blackhole_after_loss = then_blackhole

    def delay_replies(self, seconds: float) -> None:
        """Hold every frame from the server for ``seconds`` before forwarding it."""
        with self._lock:
            self._reply_delay = seconds

    def reply_latency(self, seconds: float) -> None:
        """Hold the first frame of each reply from now on for ``seconds``."""
        with self._lock:
            self._reply_latency = seconds

    def blackhole(self, enabled: bool = True) -> None:
        """Forward nothing while enabled; ending a blackhole closes every connection.

        The client then reconnects, because frames dropped mid-stream leave
        the old connections unusable.
        """
        with self._lock:
            self._blackholed = enabled
        if not enabled:
            self.drop_connections()

    def drop_connections(self) -> None:
        """Close every open connection."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    # --- forwarding ---

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return

            with self._lock:
                blackholed = self._blackholed
            # The proxy sends frame by frame. With Nagle's algorithm, a small
            # frame after another could wait for the peer's delayed ACK.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = None
            if not blackholed:
                try:
                    upstream = socket.create_connection(self._upstream, timeout=5)
                    upstream.settimeout(None)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    client.close()
                    continue

            connection = _Connection(client, upstream)
            with self._lock:
                self._connections.append(connection)
            self._spawn(self._forward_requests, connection)
            if upstream is not None:
                self._spawn(self._forward_replies, connection)

    def _forward_requests(self, connection: _Connection) -> None:
        buffer = bytearray()
        preface_sent = False
        try:
            while True:
                data = connection.client.recv(65536)
                if not data:
                    break
                if self._is_blackholed() or connection.upstream is None:
                    continue  # dropped, so the server never receives it

                buffer += data
                if not preface_sent:
                    if len(buffer) < _PREFACE_LENGTH:
                        continue
                    connection.upstream.sendall(bytes(buffer[:_PREFACE_LENGTH]))
                    del buffer[:_PREFACE_LENGTH]
                    preface_sent = True
                for frame in _take_frames(buffer):
                    self._forward_request_frame(connection, frame)
        except OSError:
            pass
        finally:
            connection.close()

    def _forward_request_frame(self, connection: _Connection, frame: bytes) -> None:
        assert connection.upstream is not None
        frame_type, flags, stream = _frame_header(frame)
        if frame_type == _HEADERS_FRAME and stream > connection.highest_stream:
            connection.highest_stream = stream
            self._count_request(connection, stream)

        connection.upstream.sendall(frame)
        if stream == connection.lost_stream and flags & _END_STREAM_FLAG:
            self._mute(connection)

    def _count_request(self, connection: _Connection, stream: int) -> None:
        with self._lock:
            self.requests += 1
            if self._lose_countdown is None:
                return
            self._lose_countdown -= 1
            if self._lose_countdown == 0:
                self._lose_countdown = None
                connection.lost_stream = stream

    def _mute(self, connection: _Connection) -> None:
        """Stop replies on ``connection``; it closes when the lost reply is complete."""
        with self._lock:
            self.lost_replies += 1
            if self._blackhole_after_loss:
                self._blackholed = True
        connection.muted.set()
        timer = threading.Timer(_LOST_REPLY_WAIT, connection.close)
        timer.daemon = True
        timer.start()

    def _forward_replies(self, connection: _Connection) -> None:
        assert connection.upstream is not None
        buffer = bytearray()
        try:
            while True:
                data = connection.upstream.recv(65536)
                if not data:
                    break
                buffer += data
                for frame in _take_frames(buffer):
                    if not self._forward_reply_frame(connection, frame):
                        return
        except OSError:
            pass
        finally:
            connection.close()

    def _forward_reply_frame(self, connection: _Connection, frame: bytes) -> bool:
        """Forward, hold back or drop one frame; return False once the connection is done."""
        _, flags, stream = _frame_header(frame)
        if connection.muted.is_set():
            if stream == connection.lost_stream and flags & _END_STREAM_FLAG:
                connection.close()
                return False
            return True
        if self._is_blackholed():
            return True

        with self._lock:
            delay = self._reply_delay
            latency = self._reply_latency
        if latency > 0 and stream and stream not in connection.replying_streams:
            # Only this connection's reply thread reads or changes the set.
            connection.replying_streams.add(stream)
            delay += latency
        if delay > 0:
            time.sleep(delay)
        connection.client.sendall(frame)
        return True

    def _is_blackholed(self) -> bool:
        with self._lock:
            return self._blackholed


def _take_frames(buffer: bytearray) -> list[bytes]:
    """Remove the complete HTTP/2 frames at the start of ``buffer`` and return them."""
    frames = []
    while len(buffer) >= _FRAME_HEADER_LENGTH:
        length = int.from_bytes(buffer[0:3], "big")
        end = _FRAME_HEADER_LENGTH + length
        if len(buffer) < end:
            break
        frames.append(bytes(buffer[:end]))
        del buffer[:end]
    return frames


def _frame_header(frame: bytes) -> tuple[int, int, int]:
    """Return a frame's type, flags and stream id."""
    stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
    return frame[3], frame[4], stream
