"""The notifier contract.

The docstrings of Notifier are the specification that every notifier meets.
Implementations do not repeat them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskStatus

from deployd.events import DeployEvent


class Notifier(ABC):
    """Tells people about deploys: the daemon hands it every DeployEvent.

    A notifier is never on a deploy's path. ``accept`` only records what must
    be sent and returns. Delivery happens in ``run``, in its own task, with
    its own timeouts. A slow, failing, hanging or absent service never fails
    an acquire, a run or a release. What it adds to their time is the local
    write of ``accept``, and the sender's CPU time when it runs at the same
    moment.

    Delivery guarantees: messages of one deploy (one session id) are
    delivered in the order their events were accepted; each message is
    delivered at most once; a message accepted before the daemon stopped or
    was killed is delivered by the next daemon on the same state directory.
    A message the service rejects for good is not retried forever: the
    notifier says why in ``health`` and in one log line with the fix.
    """

    kind: ClassVar[str]

    @abstractmethod
    def accept(self, event: DeployEvent) -> None:
        """Record the messages ``event`` calls for and wake the sender.

        Called synchronously on the event loop by the lease service's event
        bus, for every event. It writes to local storage only, returns within
        milliseconds and never raises: a message it cannot record is logged
        and dropped.
        """

    @abstractmethod
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver recorded messages until cancelled.

        Cancellation may come at any await. It leaves every message either
        delivered, still queued, or marked as possibly delivered, so that the
        next attempt (in this daemon or the next one) checks before it sends
        again.
        """

    @abstractmethod
    async def flush(self, timeout: float) -> None:
        """Wait until no message is due, or ``timeout`` seconds; the rest stays queued."""

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """Return the notifier's state for ``status``, with every secret masked.

        Keys: ``configured`` (true), ``kind``, ``mode``, ``channel``, the
        message counts ``queued``, ``parked``, ``sent``, ``failed`` and
        ``skipped``, ``oldest_queued_age`` in seconds, ``last_error`` with
        ``last_error_fix`` (what to do about it, or None) and
        ``last_error_at``, and ``problem`` (a rejection that stopped
        delivery, with its fix).
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close connections and files; the notifier is unusable afterwards."""
