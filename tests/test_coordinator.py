"""The lease manager's decisions, driven exactly with an injected clock and no I/O."""

from __future__ import annotations

import itertools

from deployd.config import LeaseTimings
from deployd.coordinator import (
    Action,
    Attempt,
    Coordinator,
    Dequeue,
    Ended,
    Enqueue,
    Grant,
    Handoff,
    HeldLease,
    Lost,
    Position,
    Refuse,
    Release,
    Renew,
    Ticket,
    Upgrade,
    Upgraded,
)
from deployd.errors import LeaseLost, LockBusy, StoreUnavailable, WaitTimedOut
from deployd.models import (
    Acquired,
    Busy,
    Freeze,
    Lease,
    LeaseRequest,
    LockState,
    Outcome,
    OutcomeStatus,
    Owner,
    Purpose,
    Takeover,
)

TIMINGS = LeaseTimings(ttl=30.0, renew_every=10.0, renew_deadline=25.0)
OWNER = Owner("ana", "build-7", 100, "daemon-a")


class Harness:
    """A coordinator with a numbered ticket factory and a fake store's tokens.

    ``handoff`` builds the coordinator for a store that releases and grants in one change.
    """

    def __init__(self, handoff: bool = False) -> None:
        ids = itertools.count(1)
        self.coordinator = Coordinator(
            poll_interval=0.5, new_acquisition_id=lambda: f"acq{next(ids)}", handoff=handoff
        )
        self.tokens = itertools.count(1)

    def ticket(
        self, lock: str = "api", wait: float | None = None, now: float = 0.0, **kwargs: object
    ) -> Ticket:
        number = self.coordinator.next_ticket_id()
        return Ticket(
            id=number,
            lock=lock,
            session_id=f"ana@build-7_20260204T101500Z_s{number}",
            owner=OWNER,
            purpose=Purpose("abc1234", "test"),
            timings=TIMINGS,
            arrived_at=now,
            wait_until=None if wait is None else now + wait,
            **kwargs,  # type: ignore[arg-type]
        )

    def lease_for(self, attempt: Attempt, expires_in: float = 30.0) -> Lease:
        return self.lease_for_request(attempt.request, expires_in)

    def lease_for_request(self, request: LeaseRequest, expires_in: float = 30.0) -> Lease:
        return Lease(
            lock=request.lock,
            holder=request.holder,
            acquisition_id=request.acquisition_id,
            token=next(self.tokens),
            owner=request.owner,
            purpose=request.purpose,
            ttl=request.ttl,
            acquired_at=1_700_000_000.0,
            renewed_at=1_700_000_000.0,
            expires_in=expires_in,
            version="1",
        )

    def grant(
        self, attempt: Attempt, now: float, takeover: Takeover = Takeover.FREE
    ) -> list[Action]:
        result = Acquired(self.lease_for(attempt), takeover)
        return self.coordinator.attempt_done(attempt.ticket, result, now, now)


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [action for action in actions if isinstance(action, kind)]


def other_holder(lock: str = "api", expires_in: float = 20.0) -> LockState:
    lease = Lease(
        lock=lock,
        holder="bob@build-9_20260204T101000Z_zzzzzz",
        acquisition_id="other",
        token=7,
        owner=Owner("bob", "build-9", 200, "daemon-b"),
        purpose=Purpose(None, "hotfix"),
        ttl=30.0,
        acquired_at=1_700_000_000.0,
        renewed_at=1_700_000_000.0,
        expires_in=expires_in,
        version="3",
    )
    return LockState(lock, 7, lease)


def test_first_caller_goes_to_store() -> None:
    harness = Harness()
    actions = harness.coordinator.submit(harness.ticket(), now=0.0)
    assert len(actions) == 1
    assert isinstance(actions[0], Attempt)
    assert actions[0].request.waiter_id is None


def test_grant_answers_caller_and_schedules_renewal() -> None:
    harness = Harness()
    ticket = harness.ticket()
    (attempt,) = harness.coordinator.submit(ticket, now=0.0)
    actions = harness.grant(attempt, now=0.1)
    (grant,) = only(actions, Grant)
    assert grant.ticket is ticket
    assert harness.coordinator.holder_of("api") is grant.held
    assert harness.coordinator.next_deadline() == 0.1 + TIMINGS.renew_every


def test_busy_here_refuses_caller_without_wait() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    harness.grant(attempt, now=0.0)
    actions = harness.coordinator.submit(harness.ticket(), now=1.0)
    (refuse,) = only(actions, Refuse)
    assert isinstance(refuse.error, LockBusy)
    assert "ana on build-7" in str(refuse.error)
    assert not only(actions, Attempt)


def test_local_waiter_queues_without_store_polling() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    harness.grant(attempt, now=0.0)
    actions = harness.coordinator.submit(harness.ticket(wait=60.0, now=1.0), now=1.0)
    assert not only(actions, Attempt)
    (position,) = only(actions, Position)
    assert position.position == 1
    assert position.holder is not None
    # The head of the queue registers in the store so other daemons queue behind it.
    assert len(only(actions, Enqueue)) == 1


def test_release_serves_next_after_store_release() -> None:
    harness = Harness()
    first = harness.ticket()
    (attempt,) = harness.coordinator.submit(first, now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held
    second = harness.ticket(wait=60.0, now=1.0)
    harness.coordinator.submit(second, now=1.0)

    actions = harness.coordinator.release(held.lease_id, Outcome.from_exit_code(0), now=2.0)
    assert only(actions, Release)
    assert only(actions, Ended)
    assert not only(actions, Attempt), "the next caller must wait for the store release"

    actions = harness.coordinator.release_done("api", now=2.1)
    (next_attempt,) = only(actions, Attempt)
    assert next_attempt.ticket is second


def test_queue_is_first_come_first_served() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held
    waiters = [harness.ticket(wait=600.0, now=float(i)) for i in range(1, 6)]
    for waiter in waiters:
        harness.coordinator.submit(waiter, now=waiter.arrived_at)

    served = []
    current = held
    for step in range(len(waiters)):
        now = 10.0 + step
        harness.coordinator.release(current.lease_id, Outcome.from_exit_code(0), now)
        (attempt,) = only(harness.coordinator.release_done("api", now), Attempt)
        served.append(attempt.ticket)
        current = only(harness.grant(attempt, now), Grant)[0].held
    assert served == waiters


def test_waiter_positions_follow_queue() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    harness.grant(attempt, now=0.0)
    first = harness.ticket(wait=60.0, now=1.0)
    second = harness.ticket(wait=60.0, now=2.0)
    harness.coordinator.submit(first, now=1.0)
    (position,) = only(harness.coordinator.submit(second, now=2.0), Position)
    assert position.position == 2

    actions = harness.coordinator.cancel(first.id, now=3.0)
    positions = {action.ticket.id: action.position for action in only(actions, Position)}
    assert positions == {second.id: 1}


def test_free_lock_with_waiters_names_count() -> None:
    messages = {}
    for ahead in (1, 2):
        harness = Harness()
        ticket = harness.ticket()
        harness.coordinator.submit(ticket, now=0.0)
        busy = Busy(LockState("api", 1, None), queued_ahead=ahead)
        (refused,) = only(harness.coordinator.attempt_done(ticket, busy, 0.0, 0.0), Refuse)
        messages[ahead] = str(refused.error)

    assert "api is free but 1 waiter is queued for it" in messages[1]
    assert "api is free but 2 waiters are queued for it" in messages[2]


def test_busy_in_store_polls_until_free() -> None:
    harness = Harness()
    ticket = harness.ticket(wait=60.0)
    (_attempt,) = harness.coordinator.submit(ticket, now=0.0)
    actions = harness.coordinator.attempt_done(ticket, Busy(other_holder()), 0.0, 0.0)
    assert only(actions, Enqueue), "a waiter registers in the store after the first busy answer"
    assert harness.coordinator.next_deadline() == 0.5

    assert not only(harness.coordinator.tick(0.4), Attempt)
    harness.coordinator.enqueue_done(ticket, None, 0.4)
    (retry,) = only(harness.coordinator.tick(0.5), Attempt)
    assert retry.request.waiter_id == ticket.session_id


def test_busy_in_store_polls_at_expiry_when_sooner() -> None:
    harness = Harness()
    ticket = harness.ticket(wait=60.0)
    harness.coordinator.submit(ticket, now=0.0)
    harness.coordinator.attempt_done(ticket, Busy(other_holder(expires_in=0.2)), 0.0, 0.0)
    assert harness.coordinator.next_deadline() == 0.2


def test_busy_in_store_refuses_caller_without_wait() -> None:
    harness = Harness()
    ticket = harness.ticket()
    harness.coordinator.submit(ticket, now=0.0)
    actions = harness.coordinator.attempt_done(ticket, Busy(other_holder()), 0.0, 0.0)
    (refuse,) = only(actions, Refuse)
    message = str(refuse.error)
    assert "bob on build-9" in message
    assert "hotfix" in message


def test_wait_times_out_and_leaves_queue() -> None:
    harness = Harness()
    ticket = harness.ticket(wait=5.0)
    harness.coordinator.submit(ticket, now=0.0)
    harness.coordinator.attempt_done(ticket, Busy(other_holder()), 0.0, 0.0)
    harness.coordinator.enqueue_done(ticket, None, 0.1)
    actions = harness.coordinator.tick(5.0)
    (refuse,) = only(actions, Refuse)
    assert isinstance(refuse.error, WaitTimedOut)
    assert only(actions, Dequeue), "the waiter entry is removed from the store"
    assert list(harness.coordinator.waiting_tickets()) == []


def test_renewal_due_at_interval() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held
    assert not only(harness.coordinator.tick(9.9), Renew)
    (renew,) = only(harness.coordinator.tick(10.0), Renew)
    assert renew.held is held
    assert not only(harness.coordinator.tick(10.5), Renew), "one renewal in flight at a time"


def test_renewal_success_moves_deadline() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held
    harness.coordinator.tick(10.0)
    harness.coordinator.renew_done(held, held.lease, sent_at=10.0, now=10.2)
    assert held.renew_deadline() == 10.0 + TIMINGS.renew_deadline
    assert not only(harness.coordinator.tick(34.0), Lost)


def test_failed_renewals_lose_lease_before_ttl() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held
    now = 10.0
    while now < TIMINGS.renew_deadline:
        for action in harness.coordinator.tick(now):
            if isinstance(action, Renew):
                harness.coordinator.renew_done(held, StoreUnavailable("down"), now, now)
        now += 0.5
    actions = harness.coordinator.tick(TIMINGS.renew_deadline)
    (lost,) = only(actions, Lost)
    assert lost.held is held
    assert TIMINGS.renew_deadline < TIMINGS.ttl
    (release,) = only(actions, Release)
    assert release.outcome.status is OutcomeStatus.LOST
    assert harness.coordinator.holder_of("api") is None


def test_renewal_finding_other_holder_loses_lease_at_once() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held
    harness.coordinator.tick(10.0)
    error = LeaseLost("api", "taken", other_holder())
    actions = harness.coordinator.renew_done(held, error, 10.0, 10.1)
    assert only(actions, Lost)
    assert not only(actions, Release), "never release a lease that is someone else's now"
    assert not only(harness.coordinator.tick(20.0), Renew), "no renewal of a lost lease"


def test_cancel_during_attempt_releases_late_grant() -> None:
    harness = Harness()
    ticket = harness.ticket(wait=60.0)
    (attempt,) = harness.coordinator.submit(ticket, now=0.0)
    assert harness.coordinator.cancel(ticket.id, now=0.1) == []
    actions = harness.grant(attempt, now=0.2)
    assert not only(actions, Grant)
    (release,) = only(actions, Release)
    assert release.outcome.status is OutcomeStatus.ABANDONED


def test_store_error_refuses_caller_without_wait() -> None:
    harness = Harness()
    ticket = harness.ticket()
    harness.coordinator.submit(ticket, now=0.0)
    actions = harness.coordinator.attempt_done(ticket, StoreUnavailable("down"), 0.0, 0.0)
    (refuse,) = only(actions, Refuse)
    assert isinstance(refuse.error, StoreUnavailable)


def test_store_error_retried_for_waiting_caller() -> None:
    harness = Harness()
    ticket = harness.ticket(wait=60.0)
    harness.coordinator.submit(ticket, now=0.0)
    actions = harness.coordinator.attempt_done(ticket, StoreUnavailable("down"), 0.0, 0.0)
    assert not only(actions, Refuse)
    deadline = harness.coordinator.next_deadline()
    assert deadline is not None
    assert 0.0 < deadline <= 2.0
    assert only(harness.coordinator.tick(deadline), Attempt)


def test_force_skips_queue_and_displaces_local_holder() -> None:
    harness = Harness()
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    old = only(harness.grant(attempt, now=0.0), Grant)[0].held
    waiter = harness.ticket(wait=60.0, now=1.0)
    harness.coordinator.submit(waiter, now=1.0)

    forced = harness.ticket(now=2.0, force=True, force_reason="prod is down")
    (force_attempt,) = only(harness.coordinator.submit(forced, now=2.0), Attempt)
    assert force_attempt.request.force
    actions = harness.grant(force_attempt, now=2.1, takeover=Takeover.FORCED)
    (lost,) = only(actions, Lost)
    assert lost.held is old
    assert "prod is down" in str(lost.error)
    (grant,) = only(actions, Grant)
    assert harness.coordinator.holder_of("api") is grant.held
    assert waiter in harness.coordinator.queue("api")


def test_locks_are_independent() -> None:
    harness = Harness()
    (first,) = harness.coordinator.submit(harness.ticket("api"), now=0.0)
    harness.grant(first, now=0.0)
    actions = harness.coordinator.submit(harness.ticket("web"), now=0.0)
    assert only(actions, Attempt)


# --- release that hands the lock to the next caller in the same store call ---


def held_with_waiter(harness: Harness) -> tuple[HeldLease, Ticket]:
    """Grant the lock to a first caller and queue a second one, who waits."""
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held
    waiter = harness.ticket(wait=60.0, now=1.0)
    harness.coordinator.submit(waiter, now=1.0)
    return held, waiter


def release_with_handoff(harness: Harness, held: HeldLease, now: float) -> Handoff:
    actions = harness.coordinator.release(held.lease_id, Outcome.from_exit_code(0), now)
    (handoff,) = only(actions, Handoff)
    return handoff


def test_handoff_release_tries_next_caller() -> None:
    harness = Harness(handoff=True)
    held, waiter = held_with_waiter(harness)

    actions = harness.coordinator.release(held.lease_id, Outcome.from_exit_code(0), now=2.0)

    (handoff,) = only(actions, Handoff)
    assert handoff.held is held
    assert handoff.outcome.status is OutcomeStatus.SUCCEEDED
    assert handoff.attempt.ticket is waiter
    assert handoff.attempt.request.holder == waiter.session_id
    assert only(actions, Ended)
    assert not only(actions, Release), "the hand-off releases the lease itself"
    assert not only(actions, Attempt), "the hand-off carries the next caller's attempt"


def test_handoff_grant_answers_next_caller() -> None:
    harness = Harness(handoff=True)
    held, waiter = held_with_waiter(harness)
    handoff = release_with_handoff(harness, held, now=2.0)

    result = Acquired(harness.lease_for(handoff.attempt), Takeover.FREE)
    actions = harness.coordinator.handoff_done(waiter, result, sent_at=2.0, now=2.5)

    (grant,) = only(actions, Grant)
    assert grant.ticket is waiter
    assert grant.held.waited == 1.5
    assert grant.held.confirmed_at == 2.0
    assert harness.coordinator.holder_of("api") is grant.held
    assert harness.coordinator.queue("api") == []


def test_handoff_without_waiter_releases() -> None:
    harness = Harness(handoff=True)
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    held = only(harness.grant(attempt, now=0.0), Grant)[0].held

    actions = harness.coordinator.release(held.lease_id, Outcome.from_exit_code(0), now=2.0)

    assert only(actions, Release)
    assert not only(actions, Handoff)


def test_handoff_keeps_queue_order() -> None:
    harness = Harness(handoff=True)
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    current = only(harness.grant(attempt, now=0.0), Grant)[0].held
    waiters = [harness.ticket(wait=600.0, now=float(i)) for i in range(1, 6)]
    for waiter in waiters:
        harness.coordinator.submit(waiter, now=waiter.arrived_at)

    served = []
    for step in range(len(waiters)):
        now = 10.0 + step
        handoff = release_with_handoff(harness, current, now)
        served.append(handoff.attempt.ticket)
        result = Acquired(harness.lease_for(handoff.attempt), Takeover.FREE)
        actions = harness.coordinator.handoff_done(handoff.attempt.ticket, result, now, now)
        current = only(actions, Grant)[0].held

    assert served == waiters


def test_handoff_store_error_retries_next_caller() -> None:
    """The store made neither change, so the next caller tries the store again at once."""
    harness = Harness(handoff=True)
    held, waiter = held_with_waiter(harness)
    release_with_handoff(harness, held, now=2.0)

    actions = harness.coordinator.handoff_done(
        waiter, StoreUnavailable("no reply within 2s"), sent_at=2.0, now=4.0
    )

    (attempt,) = only(actions, Attempt)
    assert attempt.ticket is waiter
    assert not only(actions, Grant)
    assert not only(actions, Refuse)


def test_handoff_store_error_grants_no_unlocked_lease() -> None:
    """The released lease may still be in the store, so policy "open" does not step past it."""
    harness = Harness(handoff=True)
    harness.coordinator.on_store_error = "open"
    held, waiter = held_with_waiter(harness)
    release_with_handoff(harness, held, now=2.0)

    actions = harness.coordinator.handoff_done(
        waiter, StoreUnavailable("no reply within 2s"), sent_at=2.0, now=4.0
    )

    assert not only(actions, Grant)
    assert only(actions, Attempt)


def test_handoff_to_departed_caller_passes_lock_on() -> None:
    harness = Harness(handoff=True)
    held, waiter = held_with_waiter(harness)
    third = harness.ticket(wait=60.0, now=1.5)
    harness.coordinator.submit(third, now=1.5)
    handoff = release_with_handoff(harness, held, now=2.0)
    assert harness.coordinator.cancel(waiter.id, now=2.1) == []

    result = Acquired(harness.lease_for(handoff.attempt), Takeover.FREE)
    actions = harness.coordinator.handoff_done(waiter, result, sent_at=2.0, now=2.2)

    assert not only(actions, Grant)
    (next_handoff,) = only(actions, Handoff)
    assert next_handoff.attempt.ticket is third
    assert next_handoff.outcome.status is OutcomeStatus.ABANDONED
    assert next_handoff.held.lease.holder == waiter.session_id


def test_handoff_to_frozen_lock_keeps_caller_waiting() -> None:
    harness = Harness(handoff=True)
    held, waiter = held_with_waiter(harness)
    release_with_handoff(harness, held, now=2.0)
    freeze = Freeze("api", "release freeze", "ana@build-7", 1_700_000_000.0)

    busy = Busy(LockState("api", 1, None, frozen=freeze))
    actions = harness.coordinator.handoff_done(waiter, busy, sent_at=2.0, now=2.1)

    assert not only(actions, Grant)
    (position,) = only(actions, Position)
    assert position.frozen == freeze
    assert harness.coordinator.queue("api") == [waiter]
    assert harness.coordinator.next_deadline() == 2.1 + 0.5


def unlocked_holder(harness: Harness) -> HeldLease:
    """Return a lease granted at 2.0 without the store's lock, which was unreachable."""
    harness.coordinator.on_store_error = "open"
    (attempt,) = harness.coordinator.submit(harness.ticket(), now=0.0)
    actions = harness.coordinator.attempt_done(
        attempt.ticket, StoreUnavailable("no reply within 2s"), sent_at=0.0, now=2.0
    )
    held: HeldLease = only(actions, Grant)[0].held
    return held


def test_waiter_behind_unlocked_holder_stays_out_of_store() -> None:
    """A local waiter's entry in the store would block the unlocked holder's upgrade."""
    harness = Harness()
    held = unlocked_holder(harness)
    waiter = harness.ticket(wait=60.0, now=3.0)

    submitted = harness.coordinator.submit(waiter, now=3.0)
    (upgrade,) = only(harness.coordinator.tick(10.0), Upgrade)
    upgraded = harness.coordinator.upgrade_done(
        held, Acquired(harness.lease_for_request(upgrade.request)), sent_at=10.0, now=10.1
    )
    after = harness.coordinator.tick(10.6)

    assert not only(submitted, Enqueue)
    assert only(upgraded, Upgraded)
    (enqueue,) = only(after, Enqueue)
    assert enqueue.ticket is waiter


def test_handoff_skips_lease_without_store_lock() -> None:
    """A lease that ran without the store's lock has nothing to release there."""
    harness = Harness(handoff=True)
    held = unlocked_holder(harness)
    waiter = harness.ticket(wait=60.0, now=3.0)
    harness.coordinator.submit(waiter, now=3.0)

    actions = harness.coordinator.release(held.lease_id, Outcome.from_exit_code(0), now=4.0)

    assert not only(actions, Handoff)
    (next_attempt,) = only(actions, Attempt)
    assert next_attempt.ticket is waiter
