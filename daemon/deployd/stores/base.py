"""The lease store contract.

The docstrings of LeaseStore are the specification that every store meets and
that the shared contract suite in ``tests/test_store_contract.py`` checks
against each implementation. Implementations do not repeat them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from deployd.models import (
    Acquired,
    Busy,
    Deployment,
    Freeze,
    Lease,
    LeaseRequest,
    LockState,
    Outcome,
    Owner,
    Purpose,
    Waiter,
)


class LeaseStore(ABC):
    """Where leases, waiter entries and deployment records live.

    Every operation is atomic in the store and bounded by a timeout: it
    returns, or raises StoreUnavailable (or StoreBusy), within its deadline. A
    store never blocks the event loop. Store-specific errors are translated to
    the types in ``deployd.errors`` with the cause chained.

    What a lease guarantees: at any moment at most one holder has a lease on a
    lock that the store considers valid, and every grant has a larger fencing
    token than the grant before it. What it does not guarantee: that a holder
    whose renewals stopped knows it at once. A holder learns of the loss at
    its next renewal or when its daemon's renew deadline passes, which is
    before the lease can expire for others. Steps that must not overlap even
    then should check the fencing token.
    """

    kind: ClassVar[str]
    # Whether release_and_acquire is one atomic change in this store, rather
    # than the default release followed by try_acquire.
    atomic_handoff: ClassVar[bool] = False

    @abstractmethod
    async def open(self) -> None:
        """Connect and create whatever schema or documents the store needs."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections. The store is unusable afterwards."""

    @abstractmethod
    async def try_acquire(self, request: LeaseRequest) -> Acquired | Busy:
        """Grant the lock when it is free, expired, or ``request.force`` is set.

        A grant increments the lock's fencing token, stores the lease with
        ``request.acquisition_id``, removes the caller's waiter entry and writes
        a deployment record, in one atomic change where the store allows it.
        With ``request.unlocked_since`` set, the record starts at that time and
        is marked degraded. A forced grant also records ``LockState.forced``.

        Queued callers are served first come, first served: when live waiter
        entries exist, only the first of them may take the free lock, so a
        request whose ``waiter_id`` is not first, or that has none, gets Busy
        with ``queued_ahead`` set. A freeze in force for the lock gives Busy
        with ``state.frozen`` set. ``force`` skips the holder, the queue and a
        freeze; a grant that passed a freeze says so in its record's detail.

        Returns Busy with the lock's current state when the lock is held by a
        live lease of another holder. A request whose holder already holds the
        lock gets that lease back unchanged.
        """

    @abstractmethod
    async def renew(self, lease: Lease) -> Lease:
        """Extend ``lease`` by its TTL, measured from now on the store's clock.

        Raises LeaseLost, carrying the lock's current state, when the lock is
        no longer held by this lease (same holder and acquisition id); it never
        extends someone else's lease. An expired lease that nobody has taken
        over is still ours and is renewed. Every renewal changes the stored
        record, so its version moves on.
        """

    @abstractmethod
    async def release(self, lease: Lease, outcome: Outcome) -> bool:
        """Free the lock if ``lease`` still holds it and complete its deployment record.

        Returns False, and changes nothing, when the lock is held by someone
        else or already free. The fencing token is kept, so the next grant
        still gets a larger one.
        """

    async def release_and_acquire(
        self, lease: Lease, outcome: Outcome, request: LeaseRequest
    ) -> tuple[bool, Acquired | Busy]:
        """Release ``lease`` as ``release`` does, then try ``request`` as ``try_acquire`` does.

        Returns what ``release`` and ``try_acquire`` return. A store with
        ``atomic_handoff`` makes both changes in one atomic change, so an
        error means that it made neither. This default calls the two
        operations one after the other: after an error the release may have
        been made without the grant.
        """
        released = await self.release(lease, outcome)
        return released, await self.try_acquire(request)

    @abstractmethod
    async def force_unlock(self, lock: str, by: Owner, reason: str) -> LockState:
        """Free the lock whoever holds it, live or expired, and return its state from before.

        The fencing token grows by one, so the displaced holder's token is
        superseded at once, and ``LockState.forced`` records ``by`` (as
        ``user@host``), the reason, the time and that token; the displaced
        holder's next renewal raises LeaseLost naming them. The displaced
        deployment record is completed as ``forced``. A free lock is left as
        it is and its state returned.
        """

    @abstractmethod
    async def freeze(self, scope: str, reason: str, by: Owner, until: float | None) -> Freeze:
        """Stop new grants of lock ``scope`` (ALL_LOCKS: every lock) until unfrozen or ``until``.

        Replaces an earlier freeze of the same scope. ``until`` is seconds since
        the epoch, judged by the store's clock. Held leases are not affected.
        """

    @abstractmethod
    async def unfreeze(self, scope: str) -> Freeze | None:
        """Lift the freeze of ``scope``; return it, or None when there was none."""

    @abstractmethod
    async def freezes(self) -> list[Freeze]:
        """Return the freezes in force, the global one first, then by lock name."""

    @abstractmethod
    async def record_deployment(self, deployment: Deployment) -> None:
        """Write a deployment record that no grant wrote: a deploy that ran without the lock.

        Recording the same ``session_id`` again changes nothing, so a retry
        after an ambiguous failure is safe.
        """

    @abstractmethod
    async def inspect(self, lock: str) -> LockState:
        """Return the lock's state; a lock never granted has token 0 and no lease."""

    @abstractmethod
    async def list_locks(self) -> list[LockState]:
        """Return every lock the store has seen, in name order, held or not."""

    @abstractmethod
    async def enqueue(
        self, lock: str, waiter_id: str, owner: Owner, purpose: Purpose, ttl: float
    ) -> Waiter:
        """Create the caller's waiter entry, or refresh its heartbeat if it exists.

        A refresh keeps the entry's place in the queue. An entry not refreshed
        within ``ttl`` is no longer live: it is ignored and may be deleted.
        """

    @abstractmethod
    async def dequeue(self, lock: str, waiter_id: str) -> None:
        """Remove the caller's waiter entry; removing a missing entry is not an error."""

    @abstractmethod
    async def history(
        self, lock: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[Deployment]:
        """Return deployment records, newest first, optionally for one lock and since a time."""
