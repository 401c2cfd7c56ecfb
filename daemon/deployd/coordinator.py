"""The lease manager's decisions, as plain code over in-memory state.

The Coordinator owns every lock this daemon deals with: the lease it holds
(if any), the local first-come-first-served queue of callers, renewal
schedules and deadlines. Each method takes the current time on the daemon's
monotonic clock, changes the state and returns the actions that must follow:
calls to the store, answers to callers, events to push. It performs no I/O
and never awaits, so it can be tested exactly with an injected clock, and a
cancelled store call cannot leave it half-updated. ``deployd.service`` runs
the actions and feeds their results back.

Only the head of a lock's local queue talks to the store; the others wait
in memory until the head is served.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from deployd.config import LeaseTimings
from deployd.errors import (
    DeploydError,
    Frozen,
    LeaseLost,
    LockBusy,
    StoreBusy,
    StoreError,
    WaitTimedOut,
)
from deployd.models import (
    ALL_LOCKS,
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
from deployd_client.display import clock_time
from deployd_client.durations import format_duration

# How long a caller that is not waiting keeps retrying a store error before it
# is refused, and the longest pause between attempts while a store is failing.
STORE_RETRY_MAX_DELAY = 2.0


@dataclass(eq=False)
class Ticket:
    """One caller's request for a lock, from its arrival until it is granted, refused or cancelled.

    ``wait_until`` is the deadline on the monotonic clock, or None when the
    caller does not wait. ``binding`` is whatever the service attaches to the
    lease once granted; the coordinator passes it through untouched.
    """

    id: int
    lock: str
    session_id: str
    owner: Owner
    purpose: Purpose
    timings: LeaseTimings
    arrived_at: float
    wait_until: float | None
    force: bool = False
    force_reason: str | None = None
    binding: object = None

    # Progress, owned by the coordinator.
    attempt_in_flight: bool = False
    next_attempt_at: float | None = None
    enqueued_in_store: bool = False
    enqueue_in_flight: bool = False
    next_heartbeat_at: float | None = None
    store_failures: int = 0
    last_seen: LockState | None = None
    queued_ahead_in_store: int = 0
    # Whether the caller had to wait for another holder, a queue or a freeze.
    blocked: bool = False
    cancelled: bool = False
    done: bool = False

    def waits(self) -> bool:
        """Return whether the caller asked to wait for the lock."""
        return self.wait_until is not None


@dataclass(eq=False)
class HeldLease:
    """A lease this daemon holds for one of its callers.

    ``confirmed_at`` is when the last successful grant or renewal was sent to
    the store. The store measures the lease's TTL from a moment after that,
    so the lease cannot expire for others before ``confirmed_at + ttl``.
    """

    lease: Lease
    timings: LeaseTimings
    binding: object
    confirmed_at: float
    next_renew_at: float
    granted_at: float
    waited: float
    takeover: Takeover = Takeover.FREE
    renew_in_flight: bool = False
    renew_failures: int = 0
    lost: bool = False
    # Running without a lock (the store was unreachable and on_store_error is
    # "open"): since when, on the wall clock, and until the real lease was
    # taken, if it has been.
    unlocked_since: float | None = None
    unlocked_until: float | None = None
    unlocked_reason: str | None = None
    next_upgrade_at: float | None = None
    upgrade_in_flight: bool = False
    upgrade_failures: int = 0
    overlap_reported: bool = False
    # The lease this grant replaced (expired or forced away), if any.
    replaced: Lease | None = None
    force_reason: str | None = None

    @property
    def degraded(self) -> bool:
        """Return whether the lease exists only in this daemon, without the store."""
        return self.unlocked_since is not None and self.unlocked_until is None

    @property
    def lock(self) -> str:
        """Return the lock's name."""
        return self.lease.lock

    @property
    def lease_id(self) -> str:
        """Return the lease id."""
        return self.lease.holder

    def renew_deadline(self) -> float:
        """Return the monotonic time at which the lease counts as lost without a renewal."""
        return self.confirmed_at + self.timings.renew_deadline


# --- actions: what the service must do next ---


@dataclass(frozen=True, slots=True)
class Attempt:
    """Call ``store.try_acquire(request)`` for the ticket, then ``attempt_done``."""

    ticket: Ticket
    request: LeaseRequest


@dataclass(frozen=True, slots=True)
class Enqueue:
    """Create or refresh the ticket's waiter entry in the store, then ``enqueue_done``."""

    ticket: Ticket


@dataclass(frozen=True, slots=True)
class Dequeue:
    """Remove a waiter entry from the store; a failure only needs logging (entries expire)."""

    lock: str
    waiter_id: str


@dataclass(frozen=True, slots=True)
class Renew:
    """Call ``store.renew(lease)``, then ``renew_done``."""

    held: HeldLease


@dataclass(frozen=True, slots=True)
class Release:
    """Call ``store.release(lease, outcome)``, then ``release_done``."""

    held: HeldLease
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Handoff:
    """Call ``store.release_and_acquire`` with the lease and the next caller's attempt.

    Then call ``handoff_done``. The store releases ``held`` and tries
    ``attempt.request`` in one change, so the next caller in line is served
    without a second store call.
    """

    held: HeldLease
    outcome: Outcome
    attempt: Attempt


@dataclass(frozen=True, slots=True)
class Renewed:
    """A renewal succeeded; tell the holder's connections, which watch for confirmations."""

    held: HeldLease


@dataclass(frozen=True, slots=True)
class Grant:
    """Answer the ticket's caller with the held lease."""

    ticket: Ticket
    held: HeldLease


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the ticket's caller with an error."""

    ticket: Ticket
    error: DeploydError


@dataclass(frozen=True, slots=True)
class Position:
    """Tell a waiting caller its place in line and who holds the lock.

    ``position`` counts from 1 for the next in line; ``holder`` is the lease
    in the way, when known; ``frozen`` is the freeze in the way, if the store
    reported one.
    """

    ticket: Ticket
    position: int
    holder: Lease | None
    frozen: Freeze | None = None


@dataclass(frozen=True, slots=True)
class Lost:
    """Tell the lease's holder that the lease is lost, and why."""

    held: HeldLease
    error: LeaseLost


@dataclass(frozen=True, slots=True)
class Upgrade:
    """Try to take the real lease for a lease running without a lock, then ``upgrade_done``."""

    held: HeldLease
    request: LeaseRequest


@dataclass(frozen=True, slots=True)
class Upgraded:
    """A lease that ran without a lock now holds the real lease; look for overlapping deploys."""

    held: HeldLease


@dataclass(frozen=True, slots=True)
class Overlap:
    """Another holder has the lock in the store while this lease runs without one."""

    held: HeldLease
    state: LockState


@dataclass(frozen=True, slots=True)
class RecordUnlocked:
    """Record the deploy of a lease that never got the store's lock, once the store answers."""

    held: HeldLease
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Ended:
    """A lease ended; the service drops its binding. Sent once per lease."""

    held: HeldLease
    outcome: Outcome


Action = (
    Attempt
    | Enqueue
    | Dequeue
    | Renew
    | Release
    | Handoff
    | Grant
    | Refuse
    | Position
    | Lost
    | Ended
    | Renewed
    | Upgrade
    | Upgraded
    | Overlap
    | RecordUnlocked
)


@dataclass(eq=False)
class _Slot:
    """One lock as this daemon sees it."""

    name: str
    queue: deque[Ticket] = field(default_factory=deque)
    holder: HeldLease | None = None
    releasing: bool = False


class Coordinator:
    """Decide grants, queueing, renewals, expiry of waits and lost leases.

    ``poll_interval`` is how often the head of a queue re-reads a lock held
    by another daemon. ``new_acquisition_id`` makes the random id of each
    attempt; tests pass a deterministic one. ``on_store_error`` is the policy
    when the store cannot be reached at acquire: "closed" refuses, "open"
    grants a lease that serializes this daemon's callers only and keeps
    trying to take the real lease. ``wall`` is the wall clock, for the times
    shown to people. With ``handoff``, a release with a caller of this
    daemon next in line becomes one store call that releases the lease and
    tries the next caller's grant (a Handoff action), instead of a Release
    followed by an Attempt. Set it only for a store whose
    ``release_and_acquire`` is one atomic change.
    """

    def __init__(
        self,
        poll_interval: float,
        new_acquisition_id: Callable[[], str],
        on_store_error: str = "closed",
        wall: Callable[[], float] = time.time,
        handoff: bool = False,
    ) -> None:
        self._poll_interval = poll_interval
        self._new_acquisition_id = new_acquisition_id
        self.on_store_error = on_store_error
        self._wall = wall
        self._handoff = handoff
        self._slots: dict[str, _Slot] = {}
        self._leases: dict[str, HeldLease] = {}
        self._tickets: dict[int, Ticket] = {}
        self._ticket_ids = itertools.count(1)

    # --- queries ---

    def next_ticket_id(self) -> int:
        """Return a fresh ticket id."""
        return next(self._ticket_ids)

    def lease(self, lease_id: str) -> HeldLease | None:
        """Return the held lease with this id, if this daemon holds it."""
        return self._leases.get(lease_id)

    def leases(self) -> list[HeldLease]:
        """Return every lease this daemon holds, oldest grant first."""
        return sorted(self._leases.values(), key=lambda held: held.granted_at)

    def holder_of(self, lock: str) -> HeldLease | None:
        """Return this daemon's lease on ``lock``, if it holds one."""
        slot = self._slots.get(lock)
        return slot.holder if slot else None

    def queue(self, lock: str) -> list[Ticket]:
        """Return the callers waiting for ``lock`` here, next in line first."""
        slot = self._slots.get(lock)
        return list(slot.queue) if slot else []

    def waiting_tickets(self) -> Iterator[Ticket]:
        """Yield every ticket not yet granted or refused."""
        yield from self._tickets.values()

    def next_deadline(self) -> float | None:
        """Return the earliest monotonic time at which ``tick`` has work to do."""
        times: list[float] = []
        for held in self._leases.values():
            if held.lost:
                continue
            if held.degraded:
                if held.next_upgrade_at is not None and not held.upgrade_in_flight:
                    times.append(held.next_upgrade_at)
                continue
            times.append(held.renew_deadline())
            if not held.renew_in_flight:
                times.append(held.next_renew_at)
        for ticket in self._tickets.values():
            if ticket.done or ticket.attempt_in_flight:
                # tick() leaves these alone until the store answers; counting their
                # deadlines here would wake the loop for nothing, again and again.
                continue
            if ticket.wait_until is not None:
                times.append(ticket.wait_until)
            if ticket.next_attempt_at is not None and not ticket.attempt_in_flight:
                times.append(ticket.next_attempt_at)
            if ticket.next_heartbeat_at is not None and not ticket.enqueue_in_flight:
                times.append(ticket.next_heartbeat_at)
        return min(times, default=None)

    # --- callers ---

    def submit(self, ticket: Ticket, now: float) -> list[Action]:
        """Queue a caller's request; try the store at once if nobody is ahead.

        A caller that does not wait is refused at once when the lock is held
        here or others are queued ahead; it is queued when the lock's release
        is still on its way to the store. A forced request skips the queue.
        """
        slot = self._slot(ticket.lock)
        self._tickets[ticket.id] = ticket

        if ticket.force:
            slot.queue.appendleft(ticket)
            return [self._attempt(ticket, now)]

        # A release still on its way to the store is no reason to refuse: the
        # caller is queued and tries as soon as the store has freed the lock.
        if not ticket.waits() and (slot.holder is not None or slot.queue):
            del self._tickets[ticket.id]
            ticket.done = True
            return [Refuse(ticket, self._busy_here(slot))]

        slot.queue.append(ticket)
        if len(slot.queue) == 1 and slot.holder is None and not slot.releasing:
            return [self._attempt(ticket, now)]

        ticket.blocked = slot.holder is not None or len(slot.queue) > 1 or ticket.blocked
        actions: list[Action] = [self._position(slot, ticket)]
        if slot.queue[0] is ticket and slot.holder is not None:
            actions.extend(self._heartbeat(ticket, now))
        return actions

    def cancel(self, ticket_id: int, now: float) -> list[Action]:
        """Withdraw a ticket whose caller went away before it was answered."""
        ticket = self._tickets.get(ticket_id)
        if ticket is None or ticket.done:
            return []
        ticket.cancelled = True
        if ticket.attempt_in_flight:
            # attempt_done releases the lease if that attempt was granted.
            return []
        return self._drop_ticket(ticket, now)

    def release(self, lease_id: str, outcome: Outcome, now: float) -> list[Action]:
        """End a held lease: release it in the store, then serve the next in line."""
        held = self._leases.get(lease_id)
        if held is None:
            return []
        return self._end(held, outcome, now)

    def displace(self, lease_id: str, error: LeaseLost, now: float) -> list[Action]:
        """Drop a lease that was forced away in the store; its holder is told at once."""
        held = self._leases.get(lease_id)
        if held is None:
            return []
        return self._lose(held, error, now, release_in_store=False)

    def adopt(self, held: HeldLease) -> list[Action]:
        """Take over a lease kept by a previous daemon run; it is renewed at once."""
        slot = self._slot(held.lock)
        slot.holder = held
        self._leases[held.lease_id] = held
        return []

    # --- store results ---

    def attempt_done(
        self, ticket: Ticket, result: Acquired | Busy | StoreError, sent_at: float, now: float
    ) -> list[Action]:
        """Apply the store's answer to ``try_acquire``."""
        ticket.attempt_in_flight = False
        if isinstance(result, Acquired):
            return self._granted(ticket, result, sent_at, now)
        if ticket.cancelled:
            return self._drop_ticket(ticket, now)
        if isinstance(result, Busy):
            return self._busy(ticket, result, now)
        return self._store_failed(ticket, result, now)

    def enqueue_done(self, ticket: Ticket, error: StoreError | None, now: float) -> list[Action]:
        """Record that the ticket's waiter entry was written, or schedule a retry."""
        ticket.enqueue_in_flight = False
        if ticket.done:
            return [Dequeue(ticket.lock, ticket.session_id)] if error is None else []
        if error is None:
            ticket.enqueued_in_store = True
            ticket.next_heartbeat_at = now + ticket.timings.renew_every
        else:
            ticket.next_heartbeat_at = now + min(STORE_RETRY_MAX_DELAY, ticket.timings.renew_every)
        return []

    def renew_done(
        self, held: HeldLease, result: Lease | LeaseLost | StoreError, sent_at: float, now: float
    ) -> list[Action]:
        """Apply the store's answer to ``renew``."""
        held.renew_in_flight = False
        if held.lost or self._leases.get(held.lease_id) is not held:
            return []
        if isinstance(result, Lease):
            held.lease = result
            held.confirmed_at = sent_at
            held.renew_failures = 0
            held.next_renew_at = sent_at + held.timings.renew_every
            return [Renewed(held)]
        if isinstance(result, LeaseLost):
            return self._lose(held, result, now, release_in_store=False)
        held.renew_failures += 1
        retry_delay = min(STORE_RETRY_MAX_DELAY, held.timings.renew_every / 2)
        held.next_renew_at = now + retry_delay
        return []

    def release_done(self, lock: str, now: float) -> list[Action]:
        """Serve the next caller in line once the store has released the lock."""
        slot = self._slot(lock)
        slot.releasing = False
        return self._serve_next(slot, now)

    def handoff_done(
        self, ticket: Ticket, result: Acquired | Busy | StoreError, sent_at: float, now: float
    ) -> list[Action]:
        """Apply the result of a Handoff to the next caller's attempt, as ``attempt_done`` does.

        A StoreError means that the store made neither change: the released
        lease stays in the store until its TTL runs out, as after a failed
        Release, and the next caller tries the store again at once.
        """
        slot = self._slot(ticket.lock)
        slot.releasing = False
        if not isinstance(result, StoreError):
            return self.attempt_done(ticket, result, sent_at, now)
        ticket.attempt_in_flight = False
        if ticket.cancelled:
            return self._drop_ticket(ticket, now)
        return self._serve_next(slot, now)

    # --- time ---

    def tick(self, now: float) -> list[Action]:
        """Start due renewals and attempts; expire waits and leases past their deadline."""
        actions: list[Action] = []
        for held in list(self._leases.values()):
            if held.lost:
                continue
            if held.degraded:
                actions.extend(self._try_upgrade(held, now))
                continue
            if now >= held.renew_deadline():
                reason = (
                    f"lease on {held.lock} lost: no renewal succeeded for "
                    f"{format_duration(held.timings.renew_deadline)}, so it may expire for others"
                )
                actions.extend(
                    self._lose(held, LeaseLost(held.lock, reason), now, release_in_store=True)
                )
            elif not held.renew_in_flight and now >= held.next_renew_at:
                held.renew_in_flight = True
                actions.append(Renew(held))

        for ticket in list(self._tickets.values()):
            if ticket.done or ticket.attempt_in_flight:
                continue
            if ticket.wait_until is not None and now >= ticket.wait_until:
                actions.extend(self._time_out(ticket, now))
                continue
            if ticket.next_attempt_at is not None and now >= ticket.next_attempt_at:
                actions.append(self._attempt(ticket, now))
            if (
                ticket.next_heartbeat_at is not None
                and not ticket.enqueue_in_flight
                and now >= ticket.next_heartbeat_at
            ):
                actions.extend(self._heartbeat(ticket, now))
        return actions

    def upgrade_done(
        self, held: HeldLease, result: Acquired | Busy | StoreError, sent_at: float, now: float
    ) -> list[Action]:
        """Apply the store's answer to the attempt to take the real lease for ``held``."""
        held.upgrade_in_flight = False
        if self._leases.get(held.lease_id) is not held:
            # The deploy ended while the attempt was on its way: give the lease back.
            if isinstance(result, Acquired):
                outcome = Outcome(OutcomeStatus.RELEASED, detail="ended before the store answered")
                lost = HeldLease(
                    result.lease, held.timings, held.binding, sent_at, sent_at, now, 0.0
                )
                return [Release(lost, outcome)]
            return []
        if isinstance(result, Acquired):
            held.lease = result.lease
            held.takeover = result.takeover
            held.unlocked_until = self._wall()
            held.confirmed_at = sent_at
            held.next_renew_at = sent_at + held.timings.renew_every
            held.next_upgrade_at = None
            return [Upgraded(held)]
        actions: list[Action] = []
        if isinstance(result, Busy):
            held.upgrade_failures = 0
            if result.state.held and not held.overlap_reported:
                held.overlap_reported = True
                actions.append(Overlap(held, result.state))
            held.next_upgrade_at = now + self._poll_interval
        else:
            held.upgrade_failures += 1
            held.next_upgrade_at = now + min(
                STORE_RETRY_MAX_DELAY, self._poll_interval * 2**held.upgrade_failures
            )
        return actions

    # --- internals ---

    def _grant_unlocked(self, ticket: Ticket, error: StoreError, now: float) -> list[Action]:
        """Let the caller deploy without the store's lock, serialized only within this daemon.

        The lease has fencing token 0, is never renewed, and keeps trying to
        become the real lease; its deploy is recorded as unlocked.
        """
        slot = self._slot(ticket.lock)
        wall_now = self._wall()
        lease = Lease(
            lock=ticket.lock,
            holder=ticket.session_id,
            acquisition_id=self._new_acquisition_id(),
            token=0,
            owner=ticket.owner,
            purpose=ticket.purpose,
            ttl=ticket.timings.ttl,
            acquired_at=wall_now,
            renewed_at=wall_now,
            expires_in=ticket.timings.ttl,
            version="unlocked",
        )
        held = HeldLease(
            lease=lease,
            timings=ticket.timings,
            binding=ticket.binding,
            confirmed_at=now,
            next_renew_at=now,
            granted_at=now,
            # The failed store call is no wait for a holder, so only a blocked caller waited.
            waited=max(0.0, now - ticket.arrived_at) if ticket.blocked else 0.0,
            unlocked_since=wall_now,
            unlocked_reason=str(error),
            next_upgrade_at=now + self._poll_interval,
        )
        actions: list[Action] = []
        if ticket.enqueued_in_store:
            actions.append(Dequeue(ticket.lock, ticket.session_id))
        self._remove_ticket(slot, ticket)
        slot.holder = held
        self._leases[held.lease_id] = held
        if ticket.cancelled:
            outcome = Outcome(OutcomeStatus.ABANDONED, detail="caller left")
            return actions + self._end(held, outcome, now)
        actions.append(Grant(ticket, held))
        actions.extend(self._positions(slot))
        return actions

    def _try_upgrade(self, held: HeldLease, now: float) -> list[Action]:
        if held.upgrade_in_flight or held.next_upgrade_at is None or now < held.next_upgrade_at:
            return []
        held.upgrade_in_flight = True
        request = LeaseRequest(
            lock=held.lock,
            holder=held.lease_id,
            acquisition_id=self._new_acquisition_id(),
            owner=held.lease.owner,
            purpose=held.lease.purpose,
            ttl=held.timings.ttl,
            waited=held.waited,
            unlocked_since=held.unlocked_since,
        )
        return [Upgrade(held, request)]

    def _slot(self, lock: str) -> _Slot:
        slot = self._slots.get(lock)
        if slot is None:
            slot = self._slots[lock] = _Slot(lock)
        return slot

    def _attempt(self, ticket: Ticket, now: float) -> Attempt:
        ticket.attempt_in_flight = True
        ticket.next_attempt_at = None
        request = LeaseRequest(
            lock=ticket.lock,
            holder=ticket.session_id,
            acquisition_id=self._new_acquisition_id(),
            owner=ticket.owner,
            purpose=ticket.purpose,
            ttl=ticket.timings.ttl,
            waiter_id=ticket.session_id if ticket.enqueued_in_store else None,
            force=ticket.force,
            force_reason=ticket.force_reason,
            waited=max(0.0, now - ticket.arrived_at) if ticket.blocked else 0.0,
        )
        return Attempt(ticket, request)

    def _heartbeat(self, ticket: Ticket, now: float) -> list[Action]:
        """Write the head's waiter entry, so other daemons' waiters queue behind it."""
        if ticket.enqueue_in_flight or ticket.done:
            return []
        holder = self._slot(ticket.lock).holder
        if holder is not None and holder.degraded:
            # The holder deploys without the store's lock and keeps trying to
            # take it. An entry of its own waiter would queue ahead of those
            # attempts and keep the lock free in the store, so it waits.
            ticket.next_heartbeat_at = now + self._poll_interval
            return []
        ticket.enqueue_in_flight = True
        ticket.next_heartbeat_at = None
        return [Enqueue(ticket)]

    def _granted(
        self, ticket: Ticket, result: Acquired, sent_at: float, now: float
    ) -> list[Action]:
        slot = self._slot(ticket.lock)
        held = HeldLease(
            lease=result.lease,
            timings=ticket.timings,
            binding=ticket.binding,
            confirmed_at=sent_at,
            next_renew_at=sent_at + ticket.timings.renew_every,
            granted_at=now,
            waited=max(0.0, now - ticket.arrived_at) if ticket.blocked else 0.0,
            takeover=result.takeover,
            replaced=result.previous,
            force_reason=ticket.force_reason,
        )
        actions: list[Action] = []
        displaced = slot.holder
        # The new holder takes the slot before the displaced one is dropped, so
        # that dropping it does not send the granted ticket to the store again.
        self._remove_ticket(slot, ticket)
        slot.holder = held
        self._leases[held.lease_id] = held
        if displaced is not None and displaced.lease_id != held.lease_id:
            # A forced grant took the lock from this daemon's own holder.
            message = (
                f"lease on {held.lock} was forced away by {held.lease.owner.user}@"
                f"{held.lease.owner.host} (reason: {ticket.force_reason or 'none given'})"
            )
            state = LockState(held.lock, held.lease.token, held.lease)
            actions.extend(self._lose(displaced, LeaseLost(held.lock, message, state), now, False))

        if ticket.cancelled:
            # The caller left while the grant was on its way: give the lock back.
            actions.extend(
                self._end(held, Outcome(OutcomeStatus.ABANDONED, detail="caller left"), now)
            )
            return actions
        actions.append(Grant(ticket, held))
        actions.extend(self._positions(slot))
        return actions

    def _busy(self, ticket: Ticket, result: Busy, now: float) -> list[Action]:
        ticket.blocked = True
        ticket.last_seen = result.state
        ticket.queued_ahead_in_store = result.queued_ahead
        ticket.store_failures = 0
        if not ticket.waits():
            return self._refuse(ticket, self._busy_error(result), now)

        actions: list[Action] = []
        if not ticket.enqueued_in_store:
            actions.extend(self._heartbeat(ticket, now))
        delay = self._poll_interval
        lease = result.state.lease
        if lease is not None and 0 < lease.expires_in < delay:
            delay = lease.expires_in
        ticket.next_attempt_at = now + delay
        actions.append(self._position(self._slot(ticket.lock), ticket))
        return actions

    def _store_failed(self, ticket: Ticket, error: StoreError, now: float) -> list[Action]:
        if self.on_store_error == "open" and not isinstance(error, StoreBusy):
            return self._grant_unlocked(ticket, error, now)
        ticket.store_failures += 1
        if not ticket.waits():
            return self._refuse(ticket, error, now)
        delay = min(STORE_RETRY_MAX_DELAY, self._poll_interval * 2**ticket.store_failures)
        ticket.next_attempt_at = now + delay
        return []

    def _time_out(self, ticket: Ticket, now: float) -> list[Action]:
        waited = format_duration(now - ticket.arrived_at)
        holder = self._holder_for(ticket)
        frozen = self._freeze_for(ticket)
        if frozen is not None:
            who = f" ({describe_freeze(ticket.lock, frozen)})"
        elif holder is not None:
            who = f" (held by {_describe(holder)})"
        else:
            who = ""
        error = WaitTimedOut(
            f"gave up waiting for {ticket.lock} after {waited}{who}; "
            "retry with a longer --wait, or see 'deployd status'",
            ticket.last_seen,
        )
        return self._refuse(ticket, error, now)

    def _refuse(self, ticket: Ticket, error: DeploydError, now: float) -> list[Action]:
        actions = self._drop_ticket(ticket, now)
        actions.insert(0, Refuse(ticket, error))
        return actions

    def _drop_ticket(self, ticket: Ticket, now: float) -> list[Action]:
        """Take a ticket out of its queue; serve the next caller if it was at the head."""
        slot = self._slot(ticket.lock)
        was_head = bool(slot.queue) and slot.queue[0] is ticket
        self._remove_ticket(slot, ticket)
        actions: list[Action] = []
        if ticket.enqueued_in_store:
            actions.append(Dequeue(ticket.lock, ticket.session_id))
        if was_head:
            actions.extend(self._serve_next(slot, now))
        else:
            actions.extend(self._positions(slot))
        return actions

    def _remove_ticket(self, slot: _Slot, ticket: Ticket) -> None:
        ticket.done = True
        ticket.next_attempt_at = None
        ticket.next_heartbeat_at = None
        self._tickets.pop(ticket.id, None)
        if ticket in slot.queue:
            slot.queue.remove(ticket)

    def _serve_next(self, slot: _Slot, now: float) -> list[Action]:
        """Let the head of the queue try the store, unless the lock is still busy here."""
        actions: list[Action] = []
        if slot.holder is None and not slot.releasing and slot.queue:
            head = slot.queue[0]
            if not head.attempt_in_flight:
                actions.append(self._attempt(head, now))
        elif slot.holder is not None and slot.queue:
            actions.extend(self._heartbeat(slot.queue[0], now))
        actions.extend(self._positions(slot))
        return actions

    def _end(self, held: HeldLease, outcome: Outcome, now: float) -> list[Action]:
        slot = self._slot(held.lock)
        self._leases.pop(held.lease_id, None)
        if slot.holder is held:
            slot.holder = None
        if held.degraded:
            # Nothing to release in the store: the next caller may go at once.
            actions: list[Action] = [Ended(held, outcome), RecordUnlocked(held, outcome)]
            return actions + self._serve_next(slot, now)
        slot.releasing = True
        head = slot.queue[0] if slot.queue else None
        if self._handoff and head is not None and not head.attempt_in_flight:
            return [Ended(held, outcome), Handoff(held, outcome, self._attempt(head, now))]
        return [Ended(held, outcome), Release(held, outcome)]

    def _lose(
        self, held: HeldLease, error: LeaseLost, now: float, release_in_store: bool
    ) -> list[Action]:
        """Stop claiming a lease and tell its holder; serve the queue.

        With ``release_in_store`` the store is asked to free the lease if it is
        still ours (it is, when only our renewals failed), so others need not
        wait for its TTL once the store answers again.
        """
        held.lost = True
        slot = self._slot(held.lock)
        self._leases.pop(held.lease_id, None)
        if slot.holder is held:
            slot.holder = None
        outcome = Outcome(OutcomeStatus.LOST, detail=str(error))
        actions: list[Action] = [Lost(held, error), Ended(held, outcome)]
        if release_in_store:
            slot.releasing = True
            actions.append(Release(held, outcome))
        else:
            actions.extend(self._serve_next(slot, now))
        return actions

    def _position(self, slot: _Slot, ticket: Ticket) -> Position:
        index = next((i for i, queued in enumerate(slot.queue) if queued is ticket), 0)
        position = index + 1 + slot.queue[0].queued_ahead_in_store if slot.queue else 1
        return Position(ticket, position, self._holder_for(ticket), self._freeze_for(ticket))

    def _positions(self, slot: _Slot) -> list[Action]:
        """Return a Position for every waiting caller of the lock, in one pass over the queue."""
        if not slot.queue:
            return []
        ahead_in_store = slot.queue[0].queued_ahead_in_store
        holder = self._holder_for(slot.queue[0])
        frozen = self._freeze_for(slot.queue[0])
        return [
            Position(ticket, index + 1 + ahead_in_store, holder, frozen)
            for index, ticket in enumerate(slot.queue)
            if ticket.waits()
        ]

    def _holder_for(self, ticket: Ticket) -> Lease | None:
        slot = self._slots.get(ticket.lock)
        if slot is not None and slot.holder is not None:
            return slot.holder.lease
        if slot is not None and slot.queue and slot.queue[0].last_seen is not None:
            return slot.queue[0].last_seen.lease
        return ticket.last_seen.lease if ticket.last_seen else None

    def _freeze_for(self, ticket: Ticket) -> Freeze | None:
        """Return the freeze that the store last reported for the lock's queue head."""
        slot = self._slots.get(ticket.lock)
        head = slot.queue[0] if slot is not None and slot.queue else ticket
        seen = head.last_seen or ticket.last_seen
        return seen.frozen if seen is not None else None

    def _busy_here(self, slot: _Slot) -> LockBusy:
        if slot.holder is not None:
            lease = slot.holder.lease
            state = LockState(slot.name, lease.token, lease)
            return LockBusy(busy_message(slot.name, lease), state)
        ahead = len(slot.queue)
        return LockBusy(
            f"{slot.name} is busy: {ahead} caller(s) of this daemon are queued for it; "
            "retry with --wait DURATION to queue behind them"
        )

    def _busy_error(self, result: Busy) -> LockBusy:
        frozen = result.state.frozen
        if frozen is not None:
            return Frozen(frozen_message(result.state.lock, frozen), result.state)
        lease = result.state.lease
        if lease is not None and not lease.expired:
            return LockBusy(busy_message(result.state.lock, lease), result.state)
        ahead = result.queued_ahead
        waiters = "1 waiter is" if ahead == 1 else f"{ahead} waiters are"
        return LockBusy(
            f"{result.state.lock} is free but {waiters} queued for it; "
            "retry with --wait DURATION to queue behind them",
            result.state,
        )


def _describe(lease: Lease) -> str:
    return f"{lease.owner.user}@{lease.owner.host}"


def busy_message(lock: str, lease: Lease) -> str:
    """Return the one-line message for a held lock: holder, host, since when, commit, reason."""
    since = clock_time(lease.acquired_at)
    held_for = format_duration(max(0.0, time.time() - lease.acquired_at))
    details = [f"session {lease.holder}"]
    if lease.purpose.commit:
        details.insert(0, f"commit {lease.purpose.commit}")
    if lease.purpose.reason:
        details.insert(0, f"reason {lease.purpose.reason!r}")
    return (
        f"{lock} is locked by {lease.owner.user} on {lease.owner.host} since {since} "
        f"({held_for} ago; {', '.join(details)}); "
        "wait for it with --wait DURATION, or see 'deployd status'"
    )


def frozen_message(lock: str, freeze: Freeze) -> str:
    """Return the one-line message for a frozen lock: scope, who, since, until, why, what to do."""
    return (
        f"{describe_freeze(lock, freeze)}; "
        "wait for the freeze to end with --wait DURATION, or pass it with --force --reason TEXT"
    )


def describe_freeze(lock: str, freeze: Freeze) -> str:
    """Describe the freeze that stops ``lock``: scope, who, since, until and why."""
    what = "all locks are" if freeze.scope == ALL_LOCKS else f"{lock} is"
    since = clock_time(freeze.at)
    until = f" until {clock_time(freeze.until)}" if freeze.until is not None else ""
    return f"{what} frozen by {freeze.by} since {since}{until}: {freeze.reason!r}"
