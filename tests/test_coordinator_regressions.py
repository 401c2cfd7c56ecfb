"""Coordinator decisions that were once wrong, driven with an exact clock and no I/O."""

from __future__ import annotations

from test_coordinator import Harness, only

from deployd.coordinator import Attempt, Grant, Lost
from deployd.errors import StoreUnavailable
from deployd.models import Outcome, OutcomeStatus, Takeover


def test_forced_grant_over_local_holder_is_granted_once() -> None:
    """Regression: the forced ticket, still at the head of the queue, went to the store again.

    Dropping the displaced holder served the queue before the forced ticket
    left it, so the ticket was granted twice: two "started" announcements
    and two acquire latencies for one deploy.
    """
    harness = Harness()
    (attempt,) = only(harness.coordinator.submit(harness.ticket(), now=0.0), Attempt)
    harness.grant(attempt, now=0.0)
    forced = harness.ticket(now=1.0, force=True, force_reason="prod is down")
    (force_attempt,) = only(harness.coordinator.submit(forced, now=1.0), Attempt)

    actions = harness.grant(force_attempt, now=1.1, takeover=Takeover.FORCED)

    assert len(only(actions, Lost)) == 1
    assert len(only(actions, Grant)) == 1
    assert only(actions, Attempt) == []
    assert harness.coordinator.queue("api") == []


def test_forced_grant_keeps_waiter_queued() -> None:
    harness = Harness()
    (attempt,) = only(harness.coordinator.submit(harness.ticket(), now=0.0), Attempt)
    harness.grant(attempt, now=0.0)
    waiter = harness.ticket(wait=60.0, now=0.5)
    harness.coordinator.submit(waiter, now=0.5)
    forced = harness.ticket(now=1.0, force=True, force_reason="prod is down")
    (force_attempt,) = only(harness.coordinator.submit(forced, now=1.0), Attempt)

    actions = harness.grant(force_attempt, now=1.1, takeover=Takeover.FORCED)
    (grant,) = only(actions, Grant)

    assert only(actions, Attempt) == []
    assert harness.coordinator.holder_of("api") is grant.held
    assert harness.coordinator.queue("api") == [waiter]


def test_unlocked_grant_without_holder_has_not_waited() -> None:
    """Regression: the time the failed store call took was recorded as a wait for a holder."""
    harness = Harness()
    harness.coordinator.on_store_error = "open"
    (attempt,) = only(harness.coordinator.submit(harness.ticket(now=0.0), now=0.0), Attempt)

    actions = harness.coordinator.attempt_done(
        attempt.ticket, StoreUnavailable("no reply within 2s"), sent_at=0.0, now=2.0
    )
    (grant,) = only(actions, Grant)

    assert grant.held.degraded
    assert grant.held.waited == 0.0


def test_unlocked_grant_after_holder_has_waited() -> None:
    harness = Harness()
    harness.coordinator.on_store_error = "open"
    (first,) = only(harness.coordinator.submit(harness.ticket(), now=0.0), Attempt)
    (holder,) = only(harness.grant(first, now=0.0), Grant)
    waiter = harness.ticket(wait=60.0, now=1.0)
    harness.coordinator.submit(waiter, now=1.0)
    harness.coordinator.release(holder.held.lease_id, Outcome(OutcomeStatus.SUCCEEDED), 5.0)
    (attempt,) = only(harness.coordinator.release_done("api", 5.0), Attempt)
    assert attempt.ticket is waiter

    actions = harness.coordinator.attempt_done(
        waiter, StoreUnavailable("no reply within 2s"), sent_at=5.0, now=7.0
    )
    (grant,) = only(actions, Grant)

    assert grant.held.degraded
    assert grant.held.waited == 6.0
