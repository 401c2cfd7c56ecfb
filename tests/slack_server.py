"""A local stand-in for the parts of Slack that deployd's notifier uses.

SlackServer listens on 127.0.0.1 (a free port) and speaks enough of the
Slack Web API (``auth.test``, ``chat.postMessage``, ``chat.update``,
``conversations.history``, ``conversations.replies``,
``conversations.list``) and of incoming webhooks for slack-sdk, given the
server's ``api_url`` as its ``base_url``. It records every request, and a
test can make it answer 429 with Retry-After, 5xx, an error code such as
``invalid_auth``, or hang: accept a request and answer only later.

Like Slack, it applies requests in the order they arrived, also those whose
client gave up waiting: a post that timed out on the client's side still
lands in the channel once the server gets to it. Only the standard library
is used, so the benchmarks can import it too.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_TOKEN = "xoxb-test-2f9c1e7d4b8a6350"
DEFAULT_CHANNEL = "#daily-orchestration"
DEFAULT_CHANNEL_ID = "C0DEPLOYD"
WEBHOOK_PATH = "/services/T0DEPLOYD/B0DEPLOYD/hookSecret7f3a91c2"


@dataclass
class Request:
    """One request as the server received it."""

    number: int
    method: str  # the Web API method ("chat.postMessage") or "webhook"
    params: dict[str, Any]
    received_at: float  # time.monotonic()
    authorized: bool
    status: int | None = None  # the HTTP status sent back, None while unanswered
    error: str | None = None  # the Slack error code answered, if any


@dataclass
class Message:
    """A message in the fake channel."""

    channel: str
    ts: str
    text: str
    blocks: list[Any]
    thread_ts: str | None
    metadata: dict[str, Any] | None
    edits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def uid(self) -> str | None:
        """Return the outbox id that deployd put into the message's metadata."""
        payload = (self.metadata or {}).get("event_payload") or {}
        value = payload.get("id")
        return str(value) if value is not None else None

    def to_api(self, with_metadata: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "type": "message",
            "ts": self.ts,
            "text": self.text,
            "blocks": self.blocks,
            "bot_id": "B0DEPLOYD",
        }
        if self.thread_ts is not None:
            data["thread_ts"] = self.thread_ts
        if with_metadata and self.metadata is not None:
            data["metadata"] = self.metadata
        return data


@dataclass
class _Failure:
    """A scripted answer for the next matching requests."""

    count: int | None  # None: every matching request until cleared
    status: int
    error: str
    retry_after: float | None
    methods: frozenset[str] | None


class SlackServer:
    """A fake Slack on a free loopback port; use as a context manager."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        channel: str = DEFAULT_CHANNEL,
        channel_id: str = DEFAULT_CHANNEL_ID,
    ) -> None:
        self.token = token
        self.channel = channel
        self.channel_id = channel_id
        self.requests: list[Request] = []
        self.messages: list[Message] = []
        self.delay = 0.0
        self._failures: list[_Failure] = []
        self._lock = threading.Condition()
        self._arrivals = itertools.count(1)
        self._applied = 0
        self._hang_until = 0.0
        self._hang_forever = False
        self._stopped = False
        self._last_ts = 0.0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- lifecycle ---

    def __enter__(self) -> SlackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving; requests still held by a hang are dropped without an answer."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def api_url(self) -> str:
        """The base URL of the Web API, for ``slack.api_url``."""
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def webhook_url(self) -> str:
        """The incoming-webhook URL that this server accepts."""
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    # --- behaviour ---

    def fail_next(
        self,
        count: int | None = 1,
        *,
        status: int = 200,
        error: str = "internal_error",
        retry_after: float | None = None,
        methods: set[str] | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests (every one when None) with an error.

        ``status`` 200 with ``error`` is how Slack reports most errors;
        ``status=429`` with ``retry_after`` is a rate limit.
        """
        with self._lock:
            self._failures.append(
                _Failure(count, status, error, retry_after, frozenset(methods) if methods else None)
            )

    def clear_failures(self) -> None:
        """Answer normally again."""
        with self._lock:
            self._failures.clear()

    def hang(self, seconds: float | None) -> None:
        """Hold every request that arrives for the next ``seconds`` (forever when None)."""
        with self._lock:
            if seconds is None:
                self._hang_forever = True
            else:
                self._hang_until = time.monotonic() + seconds

    def release(self) -> None:
        """End a hang now: held requests are applied in arrival order and answered."""
        with self._lock:
            self._hang_forever = False
            self._hang_until = 0.0
            self._lock.notify_all()

    # --- what happened ---

    def calls(self, method: str | None = None) -> list[Request]:
        """Return the recorded requests, of one method when given."""
        with self._lock:
            return [r for r in self.requests if method is None or r.method == method]

    def posts(self) -> list[Message]:
        """Return the stored messages (top-level and replies) in the order they were posted."""
        with self._lock:
            return list(self.messages)

    def wait_for(self, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Poll ``condition`` until it returns a true value; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"fake Slack: condition not met within {timeout}s; requests: "
                    f"{[(r.method, r.status, r.error) for r in self.calls()]}"
                )
            time.sleep(0.02)

    # --- request handling ---

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes; without this, Nagle's
                # algorithm and the client's delayed ACK hold the body for 40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                server._handle(self)

            def do_POST(self) -> None:
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        params = self._params(handler, url.query, body)
        authorization = handler.headers.get("Authorization") or ""
        method = url.path.removeprefix("/api/") if url.path.startswith("/api/") else "webhook"
        with self._lock:
            request = Request(
                number=next(self._arrivals),
                method=method,
                params=params,
                received_at=time.monotonic(),
                authorized=authorization == f"Bearer {self.token}",
            )
            self.requests.append(request)
        if self.delay:
            time.sleep(self.delay)
        if not self._wait_turn(request):
            return
        try:
            status, headers, payload = self._apply(request, url.path)
        finally:
            with self._lock:
                self._applied = request.number
                self._lock.notify_all()
        self._respond(handler, status, headers, payload)

    def _wait_turn(self, request: Request) -> bool:
        """Wait out a hang and the requests that arrived earlier; False when stopped."""
        with self._lock:
            while True:
                if self._stopped:
                    return False
                hanging = self._hang_forever or time.monotonic() < self._hang_until
                if not hanging and self._applied >= request.number - 1:
                    return True
                if not hanging or self._hang_forever:
                    self._lock.wait()
                else:
                    self._lock.wait(max(0.01, self._hang_until - time.monotonic()))

    @staticmethod
    def _params(handler: BaseHTTPRequestHandler, query: str, body: bytes) -> dict[str, Any]:
        params: dict[str, Any] = dict(urllib.parse.parse_qsl(query))
        content_type = handler.headers.get("Content-Type") or ""
        if body and "json" in content_type:
            params.update(json.loads(body))
        elif body:
            params.update(urllib.parse.parse_qsl(body.decode()))
        return params

    def _respond(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        headers: dict[str, str],
        payload: bytes,
    ) -> None:
        try:
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:
            pass  # the client gave up waiting; the request was applied all the same

    def _apply(self, request: Request, path: str) -> tuple[int, dict[str, str], bytes]:
        """Decide and apply the answer to one request; runs in arrival order."""
        with self._lock:
            failure = self._take_failure(request.method)
            if failure is not None:
                request.status, request.error = failure.status, failure.error
                headers = {}
                if failure.retry_after is not None:
                    headers["Retry-After"] = f"{failure.retry_after:g}"
                if request.method == "webhook":
                    headers["Content-Type"] = "text/plain"
                    return failure.status, headers, failure.error.encode()
                headers["Content-Type"] = "application/json"
                return failure.status, headers, _json({"ok": False, "error": failure.error})
            if request.method == "webhook":
                return self._webhook(request, path)
            if not request.authorized:
                return self._api_error(request, "invalid_auth")
            answer = getattr(self, "_api_" + request.method.replace(".", "_"), None)
            if answer is None:
                return self._api_error(request, "unknown_method")
            result: dict[str, Any] | str = answer(request.params)
            if isinstance(result, str):
                return self._api_error(request, result)
            request.status = 200
            return 200, {"Content-Type": "application/json"}, _json({"ok": True, **result})

    def _take_failure(self, method: str) -> _Failure | None:
        for failure in self._failures:
            if failure.methods is not None and method not in failure.methods:
                continue
            if failure.count is not None:
                failure.count -= 1
                if failure.count <= 0:
                    self._failures.remove(failure)
            return failure
        return None

    def _api_error(self, request: Request, error: str) -> tuple[int, dict[str, str], bytes]:
        request.status, request.error = 200, error
        return 200, {"Content-Type": "application/json"}, _json({"ok": False, "error": error})

    def _webhook(self, request: Request, path: str) -> tuple[int, dict[str, str], bytes]:
        if path != WEBHOOK_PATH:
            request.status, request.error = 404, "no_service"
            return 404, {"Content-Type": "text/plain"}, b"no_service"
        params = request.params
        text = str(params.get("text") or "")
        blocks = list(params.get("blocks") or [])
        self.messages.append(Message("webhook", self._next_ts(), text, blocks, None, None))
        request.status = 200
        return 200, {"Content-Type": "text/plain"}, b"ok"

    # --- Web API methods: each returns the result fields, or an error code ---

    def _channel(self, value: Any, names_allowed: bool) -> str | None:
        text = str(value or "")
        if text == self.channel_id:
            return self.channel_id
        if names_allowed and text.lstrip("#") == self.channel.lstrip("#"):
            return self.channel_id
        return None

    def _next_ts(self) -> str:
        now = max(time.time(), self._last_ts + 0.000001)
        self._last_ts = now
        return f"{now:.6f}"

    def _find(self, ts: Any) -> Message | None:
        return next((message for message in self.messages if message.ts == ts), None)

    def _api_auth_test(self, params: dict[str, Any]) -> dict[str, Any] | str:
        return {"team": "deployd-test", "user_id": "U0DEPLOYD", "bot_id": "B0DEPLOYD"}

    def _api_chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any] | str:
        channel = self._channel(params.get("channel"), names_allowed=True)
        if channel is None:
            return "channel_not_found"
        if not params.get("text") and not params.get("blocks"):
            return "no_text"
        thread_ts = params.get("thread_ts")
        if thread_ts is not None:
            parent = self._find(thread_ts)
            if parent is None or parent.thread_ts is not None:
                return "thread_not_found"
        metadata = params.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        message = Message(
            channel,
            self._next_ts(),
            str(params.get("text") or ""),
            list(params.get("blocks") or []),
            str(thread_ts) if thread_ts is not None else None,
            metadata,
        )
        self.messages.append(message)
        return {"channel": channel, "ts": message.ts, "message": message.to_api(True)}

    def _api_chat_update(self, params: dict[str, Any]) -> dict[str, Any] | str:
        # Like Slack, chat.update takes a channel ID, not a name.
        channel = self._channel(params.get("channel"), names_allowed=False)
        if channel is None:
            return "channel_not_found"
        message = self._find(params.get("ts"))
        if message is None:
            return "message_not_found"
        message.edits.append({"text": message.text, "blocks": message.blocks})
        message.text = str(params.get("text") or "")
        message.blocks = list(params.get("blocks") or [])
        return {"channel": channel, "ts": message.ts, "text": message.text}

    def _api_conversations_history(self, params: dict[str, Any]) -> dict[str, Any] | str:
        if self._channel(params.get("channel"), names_allowed=False) is None:
            return "channel_not_found"
        found = [m for m in self.messages if m.thread_ts is None and m.channel == self.channel_id]
        found = self._window(found, params)
        found.reverse()  # newest first, as Slack returns them
        return self._page(found, params)

    def _api_conversations_replies(self, params: dict[str, Any]) -> dict[str, Any] | str:
        if self._channel(params.get("channel"), names_allowed=False) is None:
            return "channel_not_found"
        parent = self._find(params.get("ts"))
        if parent is None:
            return "thread_not_found"
        found = [parent, *(m for m in self.messages if m.thread_ts == parent.ts)]
        return self._page(self._window(found, params), params)

    def _api_conversations_list(self, params: dict[str, Any]) -> dict[str, Any] | str:
        channels = [{"id": self.channel_id, "name": self.channel.lstrip("#"), "is_channel": True}]
        return {"channels": channels, "response_metadata": {"next_cursor": ""}}

    @staticmethod
    def _window(messages: list[Message], params: dict[str, Any]) -> list[Message]:
        oldest = float(params.get("oldest") or 0)
        inclusive = str(params.get("inclusive")).lower() in ("1", "true")
        return [
            message
            for message in messages
            if float(message.ts) > oldest or (inclusive and float(message.ts) == oldest)
        ]

    @staticmethod
    def _page(messages: list[Message], params: dict[str, Any]) -> dict[str, Any]:
        with_metadata = str(params.get("include_all_metadata")).lower() in ("1", "true")
        limit = int(params.get("limit") or 100)
        start = int(params.get("cursor") or 0)
        page = messages[start : start + limit]
        more = start + limit < len(messages)
        return {
            "messages": [message.to_api(with_metadata) for message in page],
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def main() -> None:
    """Serve until stdin closes (for the benchmarks).

    Prints one JSON line with ``api_url`` and ``token`` once listening, and
    one with the number of ``requests`` when stdin closes.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Run the fake Slack in this process.")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--hang", action="store_true", help="never answer")
    args = parser.parse_args()
    with SlackServer() as server:
        server.delay = args.delay
        if args.hang:
            server.hang(None)
        print(json.dumps({"api_url": server.api_url, "token": server.token}), flush=True)
        sys.stdin.read()
        print(json.dumps({"requests": len(server.calls())}), flush=True)


if __name__ == "__main__":
    main()
