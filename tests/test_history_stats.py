"""``deployd history`` and ``deployd stats`` after real deploys of every outcome, on both stores.

One test makes a known mix of deploys with real daemons, processes and
signals. They succeed, fail with an exit code, are killed (abandoned), are
forced away by ``run --force`` and by ``force-unlock``, or expire: their
daemon is killed, and a daemon sharing the store takes the lease over after
a short TTL. One still runs, and on Firestore one ran without the lock while
the emulator was down. Then the test checks every field of ``history
--json`` and ``stats --json`` against what it did, and the text output. Slack is the
fake in ``slack_server``, which rejects the first message, so the delivery
rate is below one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProcess, ShellHolder, Workstation, wait_until
from report_rigs import (
    HOST,
    STORE_KINDS,
    USER,
    SharedStore,
    deployd_json,
    record_of,
    run_deploy,
    seed_deploys,
    shared_store_for,
    wait_for_outcome,
)
from slack_server import SlackServer

RECORD_FIELDS = {
    "session_id",
    "lock",
    "token",
    "owner",
    "purpose",
    "started_at",
    "finished_at",
    "duration",
    "waited",
    "outcome",
    "exit_code",
    "revision",
    "degraded",
    "takeover",
    "detail",
    "extra",
}
STATS_FIELDS = {
    "schema",
    "since",
    "until",
    "deploys",
    "finished",
    "running",
    "outcomes",
    "degraded",
    "blocked",
    "blocked_share",
    "stale_share",
    "notifications",
    "acquire_latency",
    "locks",
}
WEEK = 7 * 86400.0
# The TTL of the lease whose daemon is killed: it expires soon after.
SHORT_TTL = "3s"


@dataclass
class Expected:
    """What one deploy's record must contain; ``waited`` is whether it waited for a holder."""

    session_id: str
    lock: str
    token: int
    owner_pid: int
    daemon_id: str
    outcome: str | None
    takeover: str
    commit: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    revision: str | None = None
    degraded: bool = False
    detail: str | None = None
    waited: bool = False
    # Parts of a detail that names things the test does not know in full.
    detail_parts: tuple[str, ...] = ()


@pytest.fixture(params=STORE_KINDS)
def stores(request: pytest.FixtureRequest) -> SharedStore:
    """Return workstations sharing one store; the Firestore one has an emulator of its own."""
    return shared_store_for(request, request.param, private=True)


@pytest.fixture
def slack() -> Iterator[SlackServer]:
    with SlackServer() as server:
        yield server


def slack_settings(workstation: Workstation, slack: SlackServer) -> dict[str, Any]:
    token_file = workstation.root / "slack-token"
    token_file.write_text(slack.token + "\n")
    token_file.chmod(0o600)
    return {"token_file": str(token_file), "api_url": slack.api_url, "timeout": "2s"}


def daemon_id(workstation: Workstation) -> str:
    result: str = workstation.request("hello")["result"]["daemon_id"]
    return result


def test_history_and_stats_of_every_outcome(
    stores: SharedStore,
    start: Callable[..., DaemonProcess],
    slack: SlackServer,
    tmp_path: Path,
) -> None:
    main = stores.make(on_store_error="open")
    main.write_config({**main.settings, "slack": slack_settings(main, slack)})
    slack.fail_next(1, error="msg_too_long", methods={"chat.postMessage"})
    began = time.time()
    start(main)
    main_id = daemon_id(main)
    expected: list[Expected] = []
    holders: list[ShellHolder] = []
    other_daemon: DaemonProcess | None = None
    try:
        if stores.emulator is not None:
            # Deployed while the store is out of reach, recorded once it is back.
            stores.emulator.stop()
            unlocked = run_deploy(main, tmp_path / "unlocked", "api", "--commit", "u0")
            stores.emulator.start()
            assert unlocked.returncode == 0, unlocked.stderr
            assert "WITHOUT a team-wide lock on api" in unlocked.stderr
            assert unlocked.session_id is not None
            wait_until(lambda: record_of(main, unlocked.session_id or ""), 90, 0.2)
            expected.append(
                Expected(
                    unlocked.session_id,
                    "api",
                    0,
                    unlocked.pid,
                    main_id,
                    "succeeded",
                    "unlocked",
                    commit="u0",
                    exit_code=0,
                    degraded=True,
                    detail_parts=("ran without a lock: ", "failed try_acquire of lock 'api'"),
                )
            )

        succeeded = run_deploy(
            main,
            tmp_path / "succeeded",
            "api",
            "--commit",
            "c1",
            "--reason",
            "ship login fix",
            script="$DEPLOYD event api deployed --revision rev-1 || exit 9",
        )
        assert succeeded.returncode == 0, succeeded.stderr
        assert succeeded.session_id is not None
        expected.append(
            Expected(
                succeeded.session_id,
                "api",
                1,
                succeeded.pid,
                main_id,
                "succeeded",
                "free",
                commit="c1",
                reason="ship login fix",
                exit_code=0,
                revision="rev-1",
            )
        )

        failed = run_deploy(main, tmp_path / "failed", "api", "--commit", "c2", script="exit 3")
        assert failed.returncode == 3, failed.stderr
        assert failed.session_id is not None
        expected.append(
            Expected(
                failed.session_id,
                "api",
                2,
                failed.pid,
                main_id,
                "failed",
                "free",
                "c2",
                exit_code=3,
            )
        )

        killed = ShellHolder(main, tmp_path / "killed", "api", "--commit", "c3")
        holders.append(killed)
        killed_lease = killed.lease()
        killed.kill()
        wait_for_outcome(main, killed_lease["session_id"])
        expected.append(
            Expected(
                killed_lease["session_id"],
                "api",
                3,
                killed.pid,
                main_id,
                "abandoned",
                "free",
                "c3",
                detail=f"holder gone: its process {killed.pid} exited",
            )
        )

        # run --force takes the lock from a live holder.
        displaced = ShellHolder(main, tmp_path / "displaced", "api", "--commit", "c4")
        holders.append(displaced)
        displaced_lease = displaced.lease()
        forcing = run_deploy(
            main,
            tmp_path / "forcing",
            "api",
            "--force",
            "--yes",
            "--reason",
            "hotfix now",
            "--commit",
            "c5",
        )
        assert forcing.returncode == 0, forcing.stderr
        assert forcing.session_id is not None
        expected.append(
            Expected(
                displaced_lease["session_id"],
                "api",
                4,
                displaced.pid,
                main_id,
                "forced",
                "free",
                "c4",
                detail=f"forced away by {forcing.session_id}: hotfix now",
            )
        )
        expected.append(
            Expected(
                forcing.session_id,
                "api",
                5,
                forcing.pid,
                main_id,
                "succeeded",
                "forced",
                "c5",
                "hotfix now",
                exit_code=0,
            )
        )

        # force-unlock frees it and hands out the next token without taking it.
        unlocked_by_force = ShellHolder(main, tmp_path / "force-unlocked", "api", "--commit", "c6")
        holders.append(unlocked_by_force)
        force_unlocked_lease = unlocked_by_force.lease()
        forced = main.deployd("force-unlock", "api", "--reason", "stuck deploy", "--yes")
        assert forced.returncode == 0, forced.stderr
        expected.append(
            Expected(
                force_unlocked_lease["session_id"],
                "api",
                6,
                unlocked_by_force.pid,
                main_id,
                "forced",
                "free",
                "c6",
                detail=f"forced away by {USER}@{HOST}: stuck deploy",
            )
        )

        # A daemon killed with its lease held: the lease expires and a waiter takes it over.
        other = stores.make(lease={"ttl": SHORT_TTL})
        other_daemon = start(other)
        other_id = daemon_id(other)
        orphan = ShellHolder(other, tmp_path / "orphan", "api", "--commit", "c7")
        holders.append(orphan)
        orphan_lease = orphan.lease()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                run_deploy, main, tmp_path / "taker", "api", "--wait", "60s", "--commit", "c8"
            )
            wait_until(lambda: len(main.local_queue("api")) == 1, 30)
            other_daemon.kill()
            taker = waiting.result(timeout=90)
        assert taker.returncode == 0, taker.stderr
        assert taker.session_id is not None
        expected.append(
            Expected(
                orphan_lease["session_id"],
                "api",
                8,
                orphan.pid,
                other_id,
                "expired",
                "free",
                "c7",
                detail=f"lease expired without release; taken over by {taker.session_id}",
            )
        )
        expected.append(
            Expected(
                taker.session_id,
                "api",
                9,
                taker.pid,
                main_id,
                "succeeded",
                "expired",
                "c8",
                exit_code=0,
                waited=True,
            )
        )

        web = run_deploy(main, tmp_path / "web", "web", "--commit", "w1")
        assert web.returncode == 0, web.stderr
        assert web.session_id is not None
        expected.append(
            Expected(
                web.session_id, "web", 1, web.pid, main_id, "succeeded", "free", "w1", exit_code=0
            )
        )

        running = ShellHolder(main, tmp_path / "running", "db", "--reason", "migration")
        holders.append(running)
        running_lease = running.lease()
        expected.append(
            Expected(
                running_lease["session_id"],
                "db",
                1,
                running.pid,
                main_id,
                None,
                "free",
                reason="migration",
            )
        )

        wait_until(lambda: outbox_settled(main), 60, 0.1)
        result = deployd_json(main, "history", "--limit", "1000")
        stats_started = time.time()
        stats = deployd_json(main, "stats")
        finished = time.time()
        notifications = main.status()["notifications"]
        history_text = main.deployd("history", "--limit", "1000")
        stats_text = main.deployd("stats")
    finally:
        for holder in holders:
            holder.kill()
        if other_daemon is not None:
            other_daemon.kill()

    check_history(result, expected, began, finished)
    check_stats(stats, result["deployments"], expected, stats_started, finished, notifications)
    check_history_text(history_text.stdout, history_text.returncode, expected)
    check_stats_text(stats_text.stdout, stats_text.returncode, stores.kind)


def outbox_settled(workstation: Workstation) -> bool:
    """Return whether the daemon's Slack outbox has nothing queued or waiting for a retry."""
    health = workstation.status()["notifications"]
    return bool(health["queued"] == 0 and health["sent"] > 0 and not health.get("retry_in"))


def check_history(
    result: dict[str, Any], expected: list[Expected], began: float, finished: float
) -> None:
    assert result["schema"] == 1
    assert result["lock"] is None
    assert result["limit"] == 1000
    assert result["since"] is None
    records = result["deployments"]
    # Newest first: the reverse of the order the deploys started in.
    assert [record["session_id"] for record in records] == [
        item.session_id for item in reversed(expected)
    ]
    by_session = {record["session_id"]: record for record in records}
    for item in expected:
        record = by_session[item.session_id]
        context = f"record of {item.session_id}: {record}"
        assert set(record) == RECORD_FIELDS, context
        assert record["lock"] == item.lock, context
        assert record["token"] == item.token, context
        assert record["owner"] == {
            "user": USER,
            "host": HOST,
            "pid": item.owner_pid,
            "daemon_id": item.daemon_id,
        }, context
        assert record["purpose"] == {"commit": item.commit, "reason": item.reason}, context
        assert record["outcome"] == item.outcome, context
        assert record["exit_code"] == item.exit_code, context
        assert record["revision"] == item.revision, context
        assert record["degraded"] is item.degraded, context
        assert record["takeover"] == item.takeover, context
        if item.detail_parts:
            assert record["detail"].startswith(item.detail_parts[0]), context
            for part in item.detail_parts[1:]:
                assert part in record["detail"], context
        else:
            assert record["detail"] == item.detail, context
        assert record["extra"] == {}, context
        assert began <= record["started_at"] <= finished, context
        if item.outcome is None:
            assert record["finished_at"] is None, context
            assert record["duration"] is None, context
        else:
            assert record["started_at"] <= record["finished_at"] <= finished, context
            assert record["duration"] == pytest.approx(
                record["finished_at"] - record["started_at"], abs=1e-6
            ), context
        if item.waited:
            assert record["waited"] > 0, context
        else:
            assert record["waited"] == 0.0, context


def check_stats(
    stats: dict[str, Any],
    records: list[dict[str, Any]],
    expected: list[Expected],
    requested_at: float,
    finished: float,
    notifications: dict[str, Any],
) -> None:
    assert set(stats) == STATS_FIELDS
    assert stats["schema"] == 1
    # The client asks for the week before the call.
    assert requested_at - WEEK - 1 <= stats["since"] <= finished - WEEK
    assert requested_at <= stats["until"] <= finished

    ended = [item for item in expected if item.outcome is not None]
    outcomes: dict[str, int] = {}
    for item in ended:
        assert item.outcome is not None
        outcomes[item.outcome] = outcomes.get(item.outcome, 0) + 1
    unlocked = sum(1 for item in expected if item.degraded)
    assert stats["deploys"] == len(expected)
    assert stats["finished"] == len(ended)
    assert stats["running"] == 1
    assert stats["outcomes"] == outcomes
    assert outcomes == {
        "succeeded": 4 + unlocked,
        "failed": 1,
        "abandoned": 1,
        "forced": 2,
        "expired": 1,
    }
    assert stats["degraded"] == unlocked
    assert stats["blocked"] == 1
    assert stats["blocked_share"] == round(1 / len(expected), 4)
    assert stats["stale_share"] == round(1 / len(ended), 4)

    # Grants by the stats daemon that did not wait: all of its deploys but the one that waited.
    latency = stats["acquire_latency"]
    assert set(latency) == {"samples", "p50", "p95"}
    assert latency["samples"] == len(expected) - 2
    assert 0 < latency["p50"] <= latency["p95"]

    delivery = stats["notifications"]
    assert set(delivery) == {
        "sent",
        "failed",
        "skipped",
        "queued",
        "parked",
        "delivery_rate",
        "problem",
    }
    assert delivery["sent"] == notifications["sent"]
    assert delivery["failed"] == notifications["failed"]
    assert delivery["skipped"] == notifications["skipped"]
    assert delivery["failed"] >= 1
    assert delivery["queued"] == 0
    assert delivery["parked"] == 0
    assert delivery["problem"] is None
    assert delivery["delivery_rate"] == round(
        delivery["sent"] / (delivery["sent"] + delivery["failed"] + delivery["skipped"]), 4
    )

    assert set(stats["locks"]) == {"api", "web", "db"}
    for lock, entry in stats["locks"].items():
        mine = [record for record in records if record["lock"] == lock]
        durations = [record["duration"] for record in mine if record["duration"] is not None]
        assert entry == {
            "deploys": len(mine),
            "succeeded": sum(1 for record in mine if record["outcome"] == "succeeded"),
            "failed": sum(1 for record in mine if record["outcome"] == "failed"),
            "median_duration": round(statistics.median(durations), 3) if durations else None,
            "median_wait": round(statistics.median(record["waited"] for record in mine), 3),
        }, lock
    assert stats["locks"]["api"]["deploys"] == 8 + unlocked
    assert stats["locks"]["db"]["median_duration"] is None


def check_history_text(text: str, returncode: int, expected: list[Expected]) -> None:
    assert returncode == 0
    lines = text.splitlines()
    assert lines[0].split() == [
        "STARTED",
        "LOCK",
        "WHO",
        "COMMIT",
        "OUTCOME",
        "TOOK",
        "WAITED",
        "TOKEN",
        "REVISION",
    ]
    assert len(lines) == 1 + len(expected)
    for item, line in zip(reversed(expected), lines[1:], strict=True):
        assert f"{USER}@{HOST}" in line, line
        assert f" {item.lock} " in line, line
        if item.outcome is None:
            assert "running" in line, line
        elif item.exit_code:
            assert f"{item.outcome} ({item.exit_code})" in line, line
        else:
            assert item.outcome in line, line
        if item.degraded:
            assert "- unlocked" in line, line
        if item.revision:
            assert line.endswith(item.revision), line


def check_stats_text(text: str, returncode: int, kind: str) -> None:
    assert returncode == 0
    unlocked = 1 if kind == "firestore" else 0
    deploys = 10 + unlocked
    assert (
        f"deploys      {deploys} (1 abandoned, 1 expired, 1 failed, 2 forced, "
        f"{4 + unlocked} succeeded, 1 running)"
    ) in text
    assert f"blocked      {100 / deploys:.0f}% waited for another holder" in text
    assert f"stale        {100 / (deploys - 1):.0f}% of leases expired unreleased" in text
    assert f"({deploys - 2} grants by this daemon without waiting)" in text
    assert "of messages delivered" in text
    if unlocked:
        assert "unlocked     1 ran without a lock (store unreachable)" in text
    rows = {
        line.split()[0]: line.split()
        for line in text.splitlines()
        if line[:4] in ("api ", "web ", "db  ")
    }
    assert rows["api"][1:4] == [str(8 + unlocked), str(3 + unlocked), "1"]
    assert rows["web"][1:4] == ["1", "1", "0"]
    assert rows["db"][1:4] == ["1", "0", "0"]


# --- nothing to report ---


def test_stats_of_day_without_deploys(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """A store whose only deploy is two days old: the last day has nothing to count."""
    two_days_ago = time.time() - 2 * 86400
    seed_deploys(workstation.store_file, "api", [(two_days_ago, 60.0)])
    start(workstation)

    day = deployd_json(workstation, "stats", "--since", "1d")
    week = deployd_json(workstation, "stats")
    text = workstation.deployd("stats", "--since", "1d")

    assert day["deploys"] == 0
    assert day["finished"] == 0
    assert day["running"] == 0
    assert day["outcomes"] == {}
    assert day["degraded"] == 0
    assert day["blocked"] == 0
    assert day["blocked_share"] is None
    assert day["stale_share"] is None
    assert day["acquire_latency"] == {"samples": 0, "p50": None, "p95": None}
    assert day["notifications"] is None
    assert day["locks"] == {}
    assert week["deploys"] == 1
    assert week["outcomes"] == {"succeeded": 1}
    assert week["locks"]["api"]["median_duration"] == 60.0
    assert text.returncode == 0, text.stderr
    assert text.stderr == ""
    assert text.stdout.splitlines()[2] == "no deploys in this period"
    assert "%" not in text.stdout


def test_stats_with_only_running_deploy(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """One deploy, still running: no finished lease to divide by, and no crash."""
    start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    try:
        holder.lease()
        stats = deployd_json(workstation, "stats")
        text = workstation.deployd("stats")
    finally:
        holder.kill()

    assert stats["deploys"] == 1
    assert stats["finished"] == 0
    assert stats["running"] == 1
    assert stats["blocked_share"] == 0.0
    assert stats["stale_share"] is None
    assert stats["locks"]["api"]["median_duration"] is None
    assert text.returncode == 0, text.stderr
    assert "deploys      1 (1 running)" in text.stdout
    assert "stale        - of leases expired unreleased" in text.stdout


def test_history_of_unknown_lock(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    deployed = run_deploy(workstation, tmp_path / "api", "api")
    assert deployed.returncode == 0, deployed.stderr

    result = deployd_json(workstation, "history", "nosuchlock")
    text = workstation.deployd("history", "nosuchlock")
    everything = workstation.deployd("history")

    assert result == {
        "schema": 1,
        "lock": "nosuchlock",
        "limit": 20,
        "since": None,
        "deployments": [],
    }
    assert text.returncode == 0, text.stderr
    assert text.stdout == "no deploys of nosuchlock recorded\n"
    assert text.stderr == ""
    assert len(everything.stdout.splitlines()) == 2


def test_history_of_empty_store(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)

    result = deployd_json(workstation, "history")
    text = workstation.deployd("history")

    assert result["deployments"] == []
    assert text.returncode == 0, text.stderr
    assert text.stdout == "no deploys recorded\n"
