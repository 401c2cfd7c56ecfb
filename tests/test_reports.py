"""History, stats and health reports, computed from records without a daemon."""

from __future__ import annotations

from deployd.models import Deployment, Lease, Owner, Purpose
from deployd.reports import eta, history_report, lease_health, percentile, stats_report

OWNER = Owner("ana", "build-7", 100, "d1")
START = 1_770_000_000.0


def record(
    session: str,
    lock: str = "api",
    *,
    started: float = START,
    duration: float | None = 60.0,
    outcome: str | None = "succeeded",
    waited: float = 0.0,
    token: int = 1,
    degraded: bool = False,
) -> Deployment:
    return Deployment(
        session_id=session,
        lock=lock,
        token=token,
        owner=OWNER,
        purpose=Purpose(),
        started_at=started,
        waited=waited,
        finished_at=None if duration is None else started + duration,
        outcome=outcome,
        degraded=degraded,
    )


def lease(ttl: float, expires_in: float) -> Lease:
    return Lease("api", "s", "a", 1, OWNER, Purpose(), ttl, START, START, expires_in, "1")


def test_health_by_renewal_age() -> None:
    assert lease_health(lease(30, 29)) == "healthy"
    assert lease_health(lease(30, 16)) == "healthy"
    assert lease_health(lease(30, 10)) == "late"
    assert lease_health(lease(30, 0)) == "expired"
    assert lease_health(lease(30, -5)) == "expired"


def test_stats_of_empty_day() -> None:
    stats = stats_report([], since=START, now=START + 86400)

    assert stats["deploys"] == 0
    assert stats["finished"] == 0
    assert stats["outcomes"] == {}
    assert stats["blocked_share"] is None
    assert stats["stale_share"] is None
    assert stats["acquire_latency"] == {"samples": 0, "p50": None, "p95": None}
    assert stats["locks"] == {}


def test_stats_counts_outcomes_and_shares() -> None:
    records = [
        record("a", outcome="succeeded", duration=60, waited=0),
        record("b", outcome="failed", duration=30, waited=12.5, token=2),
        record("c", outcome="expired", duration=90, waited=0, token=3),
        record("d", outcome=None, duration=None, waited=3, token=4),
        record("e", lock="web", outcome="succeeded", duration=10, degraded=True),
        record("old", started=START - 100, outcome="succeeded"),
    ]

    stats = stats_report(records, since=START, now=START + 1000, acquire_latencies=[0.01, 0.03])

    assert stats["deploys"] == 5
    assert stats["finished"] == 4
    assert stats["running"] == 1
    assert stats["outcomes"] == {"succeeded": 2, "failed": 1, "expired": 1}
    assert stats["degraded"] == 1
    assert stats["blocked"] == 2
    assert stats["blocked_share"] == 0.4
    assert stats["stale_share"] == 0.25
    assert stats["acquire_latency"] == {"samples": 2, "p50": 0.01, "p95": 0.03}
    assert stats["locks"]["api"] == {
        "deploys": 4,
        "succeeded": 1,
        "failed": 1,
        "median_duration": 60.0,
        "median_wait": 1.5,
    }
    assert stats["locks"]["web"]["deploys"] == 1


def test_history_report_shape() -> None:
    report = history_report([record("a")], "api", 10, None)

    assert report["schema"] == 1
    assert report["lock"] == "api"
    [entry] = report["deployments"]
    assert entry["session_id"] == "a"
    assert entry["duration"] == 60.0


def test_percentile_nearest_rank() -> None:
    values = [float(number) for number in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([], 0.5) is None


def test_eta_from_median_duration() -> None:
    assert eta(None, 10, 1) is None
    assert eta(120, 20, 1) == 100
    assert eta(120, 20, 3) == 340
    # A holder past the median still needs a little while.
    assert eta(120, 500, 1) == 5
