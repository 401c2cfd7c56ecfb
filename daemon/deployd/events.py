"""Deploy events: what happened to a deploy, for the notifier and anything else that listens.

The lease service emits one DeployEvent for each thing the team should
see: a deploy started, waited, finished, was forced away, lost its lease,
ran without a lock, or ran longer than ``max_hold``. Emitting never blocks
and never fails the deploy: a sink that raises is logged and ignored.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from deployd.models import Owner, Purpose

logger = logging.getLogger("deployd.events")


class EventKind(enum.StrEnum):
    """The kinds of deploy events."""

    STARTED = "started"  # a deploy got its lease
    WAITING = "waiting"  # a deploy queued behind a holder (once per wait)
    DEPLOYED = "deployed"  # the deploy reported a revision (deployd event ... deployed)
    SUCCEEDED = "succeeded"  # the lease ended with exit code 0
    FAILED = "failed"  # the lease ended with a non-zero exit code
    RELEASED = "released"  # the lease ended without an exit code
    ABANDONED = "abandoned"  # the holder's processes exited without a release
    FORCED = "forced"  # a holder took the lock by force from a live holder
    STALE_TAKEOVER = "stale_takeover"  # a holder took over an expired lease
    LOST = "lost"  # a lease was lost while its deploy ran
    UNLOCKED = "unlocked"  # a deploy went ahead without a lock (store unreachable)
    OVERLAP = "overlap"  # an unlocked deploy overlapped another holder's deploy
    MAX_HOLD = "max_hold"  # a deploy has held its lease longer than lease.max_hold


@dataclass(frozen=True, slots=True)
class DeployEvent:
    """One event of one deploy, identified by its session id.

    ``details`` holds what the kind needs: ``exit_code``, ``duration`` and
    ``revision`` for outcomes; ``holder`` (a lease as JSON) for waiting,
    forced and stale takeovers; ``forced_by`` and ``force_reason``;
    ``message`` for losses and overlaps; ``output_tail`` (lines) when the
    command's output was captured.
    """

    kind: EventKind
    lock: str
    session_id: str
    owner: Owner
    purpose: Purpose
    token: int | None
    at: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the event as JSON-ready data (for the outbox)."""
        data = asdict(self)
        data["kind"] = str(self.kind)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeployEvent:
        """Rebuild an event from ``to_json()`` output."""
        return cls(
            kind=EventKind(data["kind"]),
            lock=data["lock"],
            session_id=data["session_id"],
            owner=Owner(**data["owner"]),
            purpose=Purpose(**data["purpose"]),
            token=data["token"],
            at=data["at"],
            details=dict(data.get("details") or {}),
        )


EventSink = Callable[[DeployEvent], None]


class EventBus:
    """Hand each event to every registered sink, synchronously and without ever raising."""

    def __init__(self) -> None:
        self._sinks: list[EventSink] = []

    def subscribe(self, sink: EventSink) -> None:
        """Add a sink; it must not block (queue the work and return)."""
        self._sinks.append(sink)

    def emit(self, event: DeployEvent) -> None:
        """Pass ``event`` to every sink; a sink that raises is logged and skipped."""
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                logger.exception(
                    "event sink failed: kind=%s lock=%s session=%s",
                    event.kind,
                    event.lock,
                    event.session_id,
                )


def lease_event(kind: EventKind, lease: Any, **details: Any) -> DeployEvent:
    """Return an event about the deploy that holds ``lease`` (a models.Lease)."""
    return DeployEvent(
        kind=kind,
        lock=lease.lock,
        session_id=lease.holder,
        owner=lease.owner,
        purpose=lease.purpose,
        token=lease.token or None,
        details={key: value for key, value in details.items() if value is not None},
    )
