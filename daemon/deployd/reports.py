"""History, stats and lock health: what deployd reports about deploys.

Plain functions over deployment records and lock states, so they give the
same answers on every store and can be tested without a daemon. The JSON
shapes they return carry ``schema`` and are documented in docs/json.md.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

from deployd.models import Deployment, Lease, OutcomeStatus

# Versions of the JSON shapes described in docs/json.md. Each grows when a
# field is removed or changes meaning; new fields keep the version.
REPORT_SCHEMA = 1  # status, locks, history, stats, freeze, unfreeze
LEASE_SCHEMA = 1  # the lease that acquire and hold return
EVENT_SCHEMA = 1  # events pushed to a client: queue_position, lease_renewed, ...
# A lease is "late" when its last renewal is older than this share of its TTL:
# with renewals every third of the TTL, one renewal is overdue by then.
LATE_SHARE = 0.5


def lease_health(lease: Lease) -> str:
    """Return ``healthy``, ``late`` (a renewal is overdue) or ``expired``, as the store sees it."""
    if lease.expired:
        return "expired"
    since_renewal = lease.ttl - lease.expires_in
    return "late" if since_renewal > lease.ttl * LATE_SHARE else "healthy"


def lease_report(lease: Lease, now: float | None = None) -> dict[str, Any]:
    """Return a lease for ``status``: the lease itself plus age, health and time left."""
    now = time.time() if now is None else now
    return {
        **lease.to_json(),
        "age": round(max(0.0, now - lease.acquired_at), 3),
        "health": lease_health(lease),
        "last_renewal_age": round(max(0.0, lease.ttl - lease.expires_in), 3),
        "time_left": round(max(0.0, lease.expires_in), 3),
    }


def history_report(
    records: Sequence[Deployment], lock: str | None, limit: int, since: float | None
) -> dict[str, Any]:
    """Return the JSON of ``deployd history``."""
    return {
        "schema": REPORT_SCHEMA,
        "lock": lock,
        "limit": limit,
        "since": since,
        "deployments": [record.to_json() for record in records],
    }


def percentile(values: Sequence[float], share: float) -> float | None:
    """Return the ``share`` percentile (0..1) of ``values`` by the nearest-rank method."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(share * len(ordered))))
    return ordered[rank - 1]


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def stats_report(
    records: Sequence[Deployment],
    since: float,
    now: float,
    acquire_latencies: Sequence[float] = (),
    notifications: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the JSON of ``deployd stats`` for the deploys started since ``since``.

    ``blocked_share`` is the share of deploys that had to wait for another
    holder; ``stale_share`` the share of ended leases that expired instead of
    being released; ``acquire_latency`` covers grants this daemon made without
    waiting. Shares and medians are None when there is nothing to divide.
    """
    deploys = [record for record in records if record.started_at >= since]
    finished = [record for record in deploys if record.outcome is not None]
    outcomes: dict[str, int] = {}
    for record in finished:
        assert record.outcome is not None
        outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
    blocked = sum(1 for record in deploys if record.waited > 0)
    expired = outcomes.get(OutcomeStatus.EXPIRED.value, 0)

    locks: dict[str, dict[str, Any]] = {}
    for lock in sorted({record.lock for record in deploys}):
        mine = [record for record in deploys if record.lock == lock]
        durations = [duration for record in mine if (duration := record.duration) is not None]
        locks[lock] = {
            "deploys": len(mine),
            "succeeded": sum(1 for record in mine if record.outcome == "succeeded"),
            "failed": sum(1 for record in mine if record.outcome == "failed"),
            "median_duration": _rounded(_median(durations)),
            "median_wait": _rounded(_median(record.waited for record in mine)),
        }

    return {
        "schema": REPORT_SCHEMA,
        "since": since,
        "until": now,
        "deploys": len(deploys),
        "finished": len(finished),
        "running": len(deploys) - len(finished),
        "outcomes": outcomes,
        "degraded": sum(1 for record in deploys if record.degraded),
        "blocked": blocked,
        "blocked_share": _share(blocked, len(deploys)),
        "stale_share": _share(expired, len(finished)),
        "notifications": notifications,
        "acquire_latency": {
            "samples": len(acquire_latencies),
            "p50": _rounded(percentile(acquire_latencies, 0.5)),
            "p95": _rounded(percentile(acquire_latencies, 0.95)),
        },
        "locks": locks,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def eta(median_duration: float | None, holder_age: float, position: int) -> float | None:
    """Estimate the seconds until a waiter at ``position`` gets the lock.

    The holder is expected to need the lock's median deploy duration in all
    (at least a few seconds more, if it has already taken longer), and every
    waiter ahead as long again. None when the lock has no finished deploys.
    """
    if median_duration is None:
        return None
    remaining = max(median_duration - holder_age, min(5.0, median_duration))
    return round(remaining + max(0, position - 1) * median_duration, 1)
