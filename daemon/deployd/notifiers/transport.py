"""What a notifier's transport returns: the outcome of one request to the chat service.

The sender decides what to do next from these values alone, so the rules
for retries, at-most-once checks and parking live in one place
(``deployd.notifiers.sender``) and each transport only classifies its
service's responses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Sent:
    """The service stored the message. ``channel_id`` and ``ts`` identify it (None for webhooks)."""

    channel_id: str | None = None
    ts: str | None = None


@dataclass(frozen=True, slots=True)
class NotFound:
    """A history check found no message with the given id."""


@dataclass(frozen=True, slots=True)
class Retry:
    """The request failed in a way that may pass later.

    ``delivered_maybe`` is true when the service may have stored the message
    anyway (a timeout, a dropped connection, a 5xx): the next attempt must
    check before it posts again. ``after`` is the service's own Retry-After
    in seconds, if it gave one. ``max_attempts`` limits retries of errors
    that are not known to be transient.
    """

    error: str
    delivered_maybe: bool
    after: float | None = None
    max_attempts: int | None = None


class Scope(enum.StrEnum):
    """The reach of a rejection."""

    MESSAGE = "message"  # only this message: it is marked failed and the others go on
    NOTIFIER = "notifier"  # every message (bad token, channel gone): delivery stops


@dataclass(frozen=True, slots=True)
class Rejected:
    """The service rejected the request for good; retrying the same request cannot help.

    ``code`` is the service's error code and ``fix`` what a person must do.
    """

    code: str
    message: str
    fix: str
    scope: Scope


Result = Sent | Retry | Rejected


class Transport(Protocol):
    """One way of reaching a chat service: a bot token or an incoming webhook.

    Every method returns within the transport's timeout and never raises for
    an error of the service or the network: it returns Retry or Rejected.
    """

    mode: str
    threaded: bool

    async def check(self) -> Result | None:
        """Check the credentials once at start; None when the transport cannot check them."""

    async def post(
        self, payload: dict[str, Any], uid: str, thread: tuple[str, str] | None
    ) -> Result:
        """Post a message (in the thread ``(channel_id, ts)`` when given), tagged with ``uid``."""

    async def update(self, payload: dict[str, Any], channel_id: str, ts: str) -> Result:
        """Replace the text and blocks of the message ``ts`` in ``channel_id``."""

    async def find(
        self, uid: str, since: float, thread: tuple[str, str] | None
    ) -> Sent | NotFound | Retry | Rejected:
        """Look for a message tagged with ``uid`` posted after ``since`` (epoch seconds)."""

    def known_channel_id(self) -> str | None:
        """Return the ID of the configured channel, if known."""

    def learn_channel_id(self, channel_id: str) -> None:
        """Remember the ID of the configured channel, as returned by a post."""

    async def aclose(self) -> None:
        """Close the HTTP session."""
