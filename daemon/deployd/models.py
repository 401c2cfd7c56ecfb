"""Value types shared by the lease stores, the lease manager and the server.

Times come in two kinds. Wall-clock times (``*_at``, seconds since the Unix
epoch) are for people and history only. Validity (``expires_in``) is measured
by the store's own clock when it read or wrote the record, so no
workstation's wall clock decides who holds a lock.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds or waits for a lock: the user, the host, the bound process and the daemon."""

    user: str
    host: str
    pid: int | None
    daemon_id: str


@dataclass(frozen=True, slots=True)
class Purpose:
    """Why a lock is taken: the commit being deployed and a free-text reason."""

    commit: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """A daemon's request to the store for one grant of a lock.

    ``acquisition_id`` is random per attempt; after an ambiguous store error
    the store re-reads the lock and decides by it whether the grant applied.
    ``waiter_id`` names the caller's waiter entry, if it queued in the store.
    ``waited`` is how long the caller waited before this attempt, for history.
    ``unlocked_since`` is set when the deploy has been running without a lock
    since that wall-clock time (the store was unreachable); its deployment
    record then starts there and is marked degraded.
    """

    lock: str
    holder: str
    acquisition_id: str
    owner: Owner
    purpose: Purpose
    ttl: float
    waiter_id: str | None = None
    force: bool = False
    force_reason: str | None = None
    waited: float = 0.0
    unlocked_since: float | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """A holder's claim on a lock as the store recorded it.

    ``holder`` is the deploy's session id and doubles as the lease id.
    ``token`` is the fencing token: it grows by one on every grant of the lock
    and is never reused. ``version`` is the store's opaque precondition for the
    next change (an SQLite change counter, a Firestore update time).
    """

    lock: str
    holder: str
    acquisition_id: str
    token: int
    owner: Owner
    purpose: Purpose
    ttl: float
    acquired_at: float
    renewed_at: float
    expires_in: float
    version: str

    @property
    def lease_id(self) -> str:
        """Return the lease id, which is the holder's session id."""
        return self.holder

    @property
    def expired(self) -> bool:
        """Return whether the store judged the lease expired when it read it."""
        return self.expires_in <= 0

    def to_json(self) -> dict[str, Any]:
        """Return the lease as a JSON-ready dict for the protocol."""
        data = asdict(self)
        # The session id is public; the lease id with its key goes only to the holder.
        data["session_id"] = self.holder
        del data["version"]
        return data


@dataclass(frozen=True, slots=True)
class Waiter:
    """A deploy queued for a lock in the store, kept alive by its own heartbeat."""

    lock: str
    waiter_id: str
    owner: Owner
    purpose: Purpose
    enqueued_at: float
    expires_in: float

    def to_json(self) -> dict[str, Any]:
        """Return the waiter as a JSON-ready dict for the protocol."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ForceRecord:
    """Who last forced a lock away from its holder, why and when.

    ``token`` is the fencing token the force handed out: a lease with a
    smaller token was forced away (directly or before an earlier holder).
    """

    by: str
    reason: str
    at: float
    token: int


ALL_LOCKS = "*"


@dataclass(frozen=True, slots=True)
class Freeze:
    """A freeze: no new grants of a lock (or of every lock) until it is lifted or ends.

    ``scope`` is a lock name or ALL_LOCKS. ``at`` and ``until`` are seconds
    since the epoch; ``until`` None means until someone unfreezes.
    """

    scope: str
    reason: str
    by: str
    at: float
    until: float | None = None

    def covers(self, lock: str) -> bool:
        """Return whether the freeze applies to ``lock``."""
        return self.scope in (ALL_LOCKS, lock)

    def active(self, now: float) -> bool:
        """Return whether the freeze is still in force at ``now``."""
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        """Return the freeze as a JSON-ready dict for the protocol."""
        return asdict(self)


def applicable_freeze(freezes: list[Freeze], lock: str, now: float) -> Freeze | None:
    """Return the active freeze that applies to ``lock``, the lock's own before a global one."""
    active = [freeze for freeze in freezes if freeze.covers(lock) and freeze.active(now)]
    active.sort(key=lambda freeze: freeze.scope == ALL_LOCKS)
    return active[0] if active else None


@dataclass(frozen=True, slots=True)
class LockState:
    """One lock as the store sees it: the last token, the lease if any, live waiters in order.

    ``lease`` is None when the lock is free; an expired lease that nobody has
    taken over is still shown, with ``expires_in <= 0``. ``forced`` describes
    the last time the lock was forced away from a holder, if ever. ``frozen``
    is the freeze in force for the lock, if any.
    """

    lock: str
    token: int
    lease: Lease | None
    waiters: tuple[Waiter, ...] = ()
    forced: ForceRecord | None = None
    frozen: Freeze | None = None

    @property
    def held(self) -> bool:
        """Return whether a live lease holds the lock."""
        return self.lease is not None and not self.lease.expired

    def to_json(self) -> dict[str, Any]:
        """Return the lock state as a JSON-ready dict for the protocol."""
        return {
            "lock": self.lock,
            "token": self.token,
            "held": self.held,
            "lease": self.lease.to_json() if self.lease else None,
            "waiters": [waiter.to_json() for waiter in self.waiters],
            "forced": asdict(self.forced) if self.forced else None,
            "frozen": self.frozen.to_json() if self.frozen else None,
        }


class Takeover(enum.StrEnum):
    """How a grant came about when the lock had a previous holder."""

    FREE = "free"
    EXPIRED = "expired"
    FORCED = "forced"


@dataclass(frozen=True, slots=True)
class Acquired:
    """The store granted the lock. ``previous`` is the lease that was replaced, if any."""

    lease: Lease
    takeover: Takeover = Takeover.FREE
    previous: Lease | None = None


@dataclass(frozen=True, slots=True)
class Busy:
    """The store did not grant the lock: it is held, or waiters are queued ahead."""

    state: LockState
    queued_ahead: int = 0


class OutcomeStatus(enum.StrEnum):
    """How a deploy under a lease ended, as history records it."""

    SUCCEEDED = "succeeded"  # the command or script reported exit code 0
    FAILED = "failed"  # it reported a non-zero exit code
    RELEASED = "released"  # released without an exit code
    ABANDONED = "abandoned"  # its process exited without releasing
    LOST = "lost"  # the daemon could not renew it in time
    FORCED = "forced"  # another holder forced it away
    EXPIRED = "expired"  # it was not renewed and someone took it over after its TTL


@dataclass(frozen=True, slots=True)
class Outcome:
    """The outcome recorded when a lease ends."""

    status: OutcomeStatus
    exit_code: int | None = None
    revision: str | None = None
    detail: str | None = None
    output_tail: tuple[str, ...] | None = None

    @classmethod
    def from_exit_code(cls, exit_code: int | None, revision: str | None = None) -> Outcome:
        """Return SUCCEEDED for 0, FAILED for other codes and RELEASED for None."""
        if exit_code is None:
            return cls(OutcomeStatus.RELEASED, None, revision)
        status = OutcomeStatus.SUCCEEDED if exit_code == 0 else OutcomeStatus.FAILED
        return cls(status, exit_code, revision)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One deployment record: written at the grant, completed by the outcome."""

    session_id: str
    lock: str
    token: int
    owner: Owner
    purpose: Purpose
    started_at: float
    waited: float
    finished_at: float | None = None
    outcome: str | None = None
    exit_code: int | None = None
    revision: str | None = None
    degraded: bool = False
    takeover: str | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float | None:
        """Return the deploy's duration in seconds, or None while it runs."""
        if self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict for the protocol."""
        data = asdict(self)
        data["duration"] = self.duration
        return data


def deployment_from_json(data: dict[str, Any]) -> Deployment:
    """Rebuild a Deployment from ``Deployment.to_json()`` output."""
    fields = dict(data)
    fields.pop("duration", None)
    fields["owner"] = Owner(**fields["owner"])
    fields["purpose"] = Purpose(**fields["purpose"])
    return Deployment(**fields)
