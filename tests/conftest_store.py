"""Helpers for the lease store tests: a fake clock, owners, session ids and requests.

The store test modules import this file; pytest does not load it as a
conftest, so nothing here affects other test modules.
"""

from __future__ import annotations

import secrets
from typing import Any

from deployd.clock import ClockReading
from deployd.models import Acquired, Busy, Lease, LeaseRequest, Owner, Purpose
from deployd.stores.base import LeaseStore

TTL = 30.0


class FakeClock:
    """A machine clock and a wall clock that move only when a test moves them.

    Call the object for a machine clock reading, as a store calls MachineClock;
    pass ``wall`` as the store's wall clock.
    """

    def __init__(self) -> None:
        self.boot_id = "boot-1"
        self.seconds = 1000.0
        self.wall_seconds = 1_770_000_000.0
        self._boots = 1

    def __call__(self) -> ClockReading:
        return ClockReading(self.boot_id, self.seconds)

    def wall(self) -> float:
        """Return the fake wall-clock time in seconds since the epoch."""
        return self.wall_seconds

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        self.seconds += seconds
        self.wall_seconds += seconds

    def reboot(self) -> None:
        """Start a new boot: a new boot id and a machine clock that starts again near 0."""
        self._boots += 1
        self.boot_id = f"boot-{self._boots}"
        self.seconds = 5.0
        self.wall_seconds += 60.0


def session_id(user: str) -> str:
    """Return a session id of the form deployd uses, for ``user`` on host build-7."""
    return f"{user}@build-7_20260204T101500Z_{secrets.token_hex(3)}"


def owner_of(holder: str) -> Owner:
    """Return an Owner whose user is the part of ``holder`` before the ``@``."""
    return Owner(user=holder.split("@", 1)[0], host="build-7", pid=4242, daemon_id="build-7-d1")


def make_request(holder: str, lock: str = "api", **changes: Any) -> LeaseRequest:
    """Build a request by ``holder`` for ``lock`` with a fresh acquisition id.

    ``changes`` override any other field of LeaseRequest.
    """
    fields: dict[str, Any] = {
        "lock": lock,
        "holder": holder,
        "acquisition_id": secrets.token_hex(8),
        "owner": owner_of(holder),
        "purpose": Purpose(commit="abc1234", reason=f"deploy by {holder}"),
        "ttl": TTL,
    }
    fields.update(changes)
    return LeaseRequest(**fields)


async def expect_grant(store: LeaseStore, holder: str, lock: str = "api", **changes: Any) -> Lease:
    """Acquire ``lock`` for ``holder`` and return the lease; raise AssertionError if it is busy."""
    result = await store.try_acquire(make_request(holder, lock, **changes))
    if not isinstance(result, Acquired):
        raise AssertionError(f"expected a grant of {lock!r} to {holder}, got {result!r}")
    return result.lease


async def expect_busy(store: LeaseStore, holder: str, lock: str = "api", **changes: Any) -> Busy:
    """Try to acquire ``lock`` for ``holder`` and return Busy; raise AssertionError on a grant."""
    result = await store.try_acquire(make_request(holder, lock, **changes))
    if not isinstance(result, Busy):
        raise AssertionError(f"expected {lock!r} to be busy for {holder}, got {result!r}")
    return result
