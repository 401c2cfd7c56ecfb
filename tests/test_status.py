"""``deployd status`` with real daemons: held, late, expired, frozen and contended locks.

Late and expired leases come from a holder whose daemon is stopped with
SIGSTOP, read by another daemon that shares the store (an SQLite file, or
a namespace of the Firestore emulator). Contention is a holder and waiters
on two daemons sharing one SQLite file. Each test checks ``status --json``
and the text output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProcess, Gate, ShellHolder, Workstation, wait_until
from report_rigs import (
    HOST,
    USER,
    SharedStore,
    deployd_json,
    run_deploy,
    shared_store,  # noqa: F401 - a fixture
    shared_store_for,
)

from deployd_client.display import clock_time

STATUS_FIELDS = {
    "schema",
    "daemon",
    "store",
    "locks",
    "freezes",
    "leases",
    "latest",
    "notifications",
}
LOCK_FIELDS = {"lock", "token", "held", "lease", "waiters", "forced", "frozen", "local_queue"}
LEASE_FIELDS = {
    "lock",
    "holder",
    "session_id",
    "acquisition_id",
    "token",
    "owner",
    "purpose",
    "ttl",
    "acquired_at",
    "renewed_at",
    "expires_in",
    "age",
    "health",
    "last_renewal_age",
    "time_left",
}
# The TTL of the lease whose daemon is stopped: "late" after half of it, expired after it.
STOPPED_TTL = 6.0


def lock_of(status: dict[str, Any], lock: str) -> dict[str, Any]:
    """Return the entry of ``lock`` in a status result."""
    for entry in status["locks"]:
        if entry["lock"] == lock:
            found: dict[str, Any] = entry
            return found
    raise AssertionError(f"{lock} is not in status: {[e['lock'] for e in status['locks']]}")


def row_of(text: str, lock: str) -> list[str]:
    """Return the cells of the row of ``lock`` in the status table, split on whitespace."""
    for line in text.splitlines():
        if line.split(" ", 1)[0] == lock:
            return line.split()
    raise AssertionError(f"no row for {lock} in:\n{text}")


def holder_pid(workstation: Workstation, lock: str) -> int | None:
    lease = lock_of(workstation.status(), lock)["lease"]
    return lease["owner"]["pid"] if lease else None


def health_of(workstation: Workstation, lock: str) -> str | None:
    lease = lock_of(workstation.status(), lock)["lease"]
    return lease["health"] if lease else None


def test_status_of_held_lock(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    daemon = start(workstation)
    deployed = run_deploy(workstation, tmp_path / "first", "api", "--commit", "c0")
    holder = ShellHolder(
        workstation, tmp_path / "holder", "api", "--commit", "c1", "--reason", "rollout"
    )
    try:
        lease = holder.lease()
        before = time.time()
        status = deployd_json(workstation, "status")
        text = workstation.deployd("status")
    finally:
        holder.kill()

    assert set(status) == STATUS_FIELDS
    assert status["schema"] == 1
    assert status["daemon"]["pid"] == daemon.pid
    assert status["daemon"]["socket"] == str(workstation.socket)
    assert status["daemon"]["config_file"] == str(workstation.config_file)
    assert status["daemon"]["store"] == {
        "kind": "sqlite",
        "location": str(workstation.store_file),
    }
    store = status["store"]
    assert store["kind"] == "sqlite"
    assert store["location"] == str(workstation.store_file)
    assert store["reachable"] is True
    assert 0 <= store["latency"] < 5
    assert store["clock_offset"] == 0.0
    assert "error" not in store
    assert status["freezes"] == []
    assert status["notifications"]["configured"] is False

    entry = lock_of(status, "api")
    assert set(entry) == LOCK_FIELDS
    assert entry["held"] is True
    assert entry["token"] == 2
    assert entry["waiters"] == []
    assert entry["local_queue"] == []
    assert entry["forced"] is None
    assert entry["frozen"] is None
    reported = entry["lease"]
    assert set(reported) == LEASE_FIELDS
    assert reported["session_id"] == lease["session_id"]
    assert reported["holder"] == lease["session_id"]
    assert reported["token"] == 2
    assert reported["owner"]["user"] == USER
    assert reported["owner"]["host"] == HOST
    assert reported["owner"]["pid"] == holder.pid
    assert reported["purpose"] == {"commit": "c1", "reason": "rollout"}
    assert reported["ttl"] == 30.0
    assert reported["health"] == "healthy"
    assert 0 <= reported["age"] <= before - reported["acquired_at"] + 5
    assert 0 <= reported["last_renewal_age"] < 15
    assert 15 < reported["time_left"] <= 30
    assert reported["time_left"] == round(reported["expires_in"], 3)

    [held] = status["leases"]
    assert held["lock"] == "api"
    assert held["session_id"] == lease["session_id"]
    assert held["token"] == 2
    assert held["ttl"] == 30.0
    assert held["degraded"] is False
    assert held["renew_failures"] == 0
    assert 0 <= held["last_renewal_age"] < 15
    assert held["binding"]["kind"] == "process"
    assert [record["session_id"] for record in status["latest"]] == [
        lease["session_id"],
        deployed.session_id,
    ]

    assert text.returncode == 0, text.stderr
    row = row_of(text.stdout, "api")
    assert row[:3] == ["api", USER, HOST]
    assert row[4:] == ["ago", "healthy", row[6], "2", "-", "c1", "rollout"]
    assert re.fullmatch(r"\d+s|\d\.\ds", row[6]), row
    assert "\nlatest deploys\n" in text.stdout


def test_status_of_late_then_expired_lease(
    shared_store: SharedStore,  # noqa: F811 - the fixture imported above
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """A holder whose daemon is stopped: first late, then expired, as another daemon reads it."""
    stopped = shared_store.make(lease={"ttl": f"{STOPPED_TTL:g}s"})
    observer = shared_store.make()
    stopped_daemon = start(stopped)
    start(observer)
    holder = ShellHolder(stopped, tmp_path / "holder", "api")
    try:
        lease = holder.lease()
        wait_until(lambda: health_of(observer, "api") == "healthy")
        os.kill(stopped_daemon.pid, signal.SIGSTOP)
        wait_until(lambda: health_of(observer, "api") == "late", timeout=STOPPED_TTL + 10)
        late = deployd_json(observer, "status")
        late_text = observer.deployd("status")
        wait_until(lambda: health_of(observer, "api") == "expired", timeout=STOPPED_TTL + 10)
        expired = deployd_json(observer, "status")
        expired_text = observer.deployd("status")
    finally:
        # A stopped daemon cannot handle the SIGTERM of the fixture's teardown.
        stopped_daemon.kill()
        holder.kill()

    late_entry = lock_of(late, "api")
    assert late_entry["held"] is True
    late_lease = late_entry["lease"]
    assert late_lease["session_id"] == lease["session_id"]
    assert late_lease["health"] == "late"
    assert STOPPED_TTL / 2 < late_lease["last_renewal_age"] < STOPPED_TTL
    assert 0 < late_lease["time_left"] < STOPPED_TTL / 2
    assert late["leases"] == []
    assert row_of(late_text.stdout, "api")[5] == "late"

    expired_entry = lock_of(expired, "api")
    assert expired_entry["held"] is False
    expired_lease = expired_entry["lease"]
    assert expired_lease["session_id"] == lease["session_id"]
    assert expired_lease["health"] == "expired"
    assert expired_lease["last_renewal_age"] >= STOPPED_TTL
    assert expired_lease["time_left"] == 0
    assert expired_lease["expires_in"] <= 0
    assert row_of(expired_text.stdout, "api")[5] == "expired"

    offset = expired["store"]["clock_offset"]
    if shared_store.kind == "sqlite":
        assert offset == 0.0
    else:
        # The emulator runs on this machine: its clock is this machine's.
        assert isinstance(offset, float)
        assert abs(offset) < 2.0


def test_status_of_frozen_locks(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    for lock in ("api", "web"):
        assert run_deploy(workstation, tmp_path / lock, lock).returncode == 0
    requested = time.time()
    assert workstation.deployd("freeze", "api", "--reason", "own").returncode == 0
    assert (
        workstation.deployd("freeze", "--all", "--reason", "global", "--until", "90m").returncode
        == 0
    )

    status = deployd_json(workstation, "status")
    text = workstation.deployd("status")

    everything, api_only = status["freezes"]
    assert everything["scope"] == "*"
    assert everything["reason"] == "global"
    assert requested + 5400 - 1 <= everything["until"] <= time.time() + 5400
    assert api_only["scope"] == "api"
    assert api_only["until"] is None
    # A lock's own freeze comes before the freeze of all locks.
    assert lock_of(status, "api")["frozen"] == api_only
    assert lock_of(status, "web")["frozen"] == everything
    until = clock_time(everything["until"])
    assert f"frozen   all locks by {USER}@{HOST} since " in text.stdout
    assert f" until {until}: 'global'\n" in text.stdout
    assert f"frozen   api by {USER}@{HOST} since " in text.stdout
    assert row_of(text.stdout, "api")[:3] == ["api", "frozen", "-"]
    assert row_of(text.stdout, "web")[:3] == ["web", "frozen", "-"]


def blocked_run(workstation: Workstation, gate: Gate) -> subprocess.Popen[str]:
    """Start ``deployd run api --wait 60s`` whose command waits for ``gate``."""
    return workstation.spawn(
        "run",
        "api",
        "--wait",
        "60s",
        "--",
        "sh",
        "-c",
        'read line < "$0"',
        str(gate.path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_status_of_contended_lock(
    request: pytest.FixtureRequest,
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """A holder on one daemon, waiters on both: the store's queue and each daemon's own."""
    stores = shared_store_for(request, "sqlite")
    holding = stores.make()
    other = stores.make()
    start(holding)
    start(other)
    holder = ShellHolder(holding, tmp_path / "holder", "api")
    gates = [Gate(tmp_path / f"gate-{index}") for index in range(3)]
    waiters: list[subprocess.Popen[str]] = []
    try:
        lease = holder.lease()
        waiters.append(blocked_run(other, gates[0]))
        wait_until(lambda: len(lock_of(holding.status(), "api")["waiters"]) == 1)
        waiters.append(blocked_run(holding, gates[1]))
        wait_until(lambda: len(lock_of(holding.status(), "api")["waiters"]) == 2)
        waiters.append(blocked_run(holding, gates[2]))
        wait_until(lambda: len(holding.local_queue("api")) == 2)
        status_holding = deployd_json(holding, "status")
        status_other = deployd_json(other, "status")
        text_holding = holding.deployd("status")
        text_other = other.deployd("status")

        # The holder ends: the first in line, on the other daemon, goes next.
        holder.kill()
        wait_until(lambda: holder_pid(holding, "api") == waiters[0].pid)
        after = deployd_json(holding, "status")
    finally:
        holder.kill()
        for waiter in waiters:
            # SIGTERM, which the run passes on to its command; SIGKILL would
            # leave the command behind, blocked on its gate.
            if waiter.poll() is None:
                waiter.terminate()
            try:
                waiter.wait(10)
            except subprocess.TimeoutExpired:
                waiter.kill()
                waiter.wait(10)

    entry = lock_of(status_holding, "api")
    assert entry["lease"]["session_id"] == lease["session_id"]
    assert [waiter["owner"]["pid"] for waiter in entry["waiters"]] == [
        waiters[0].pid,
        waiters[1].pid,
    ]
    for waiter in entry["waiters"]:
        assert set(waiter) == {"lock", "waiter_id", "owner", "purpose", "enqueued_at", "expires_in"}
        assert waiter["lock"] == "api"
        assert waiter["expires_in"] > 0
    first, second = entry["waiters"]
    assert first["enqueued_at"] <= second["enqueued_at"]
    assert first["owner"]["daemon_id"] != second["owner"]["daemon_id"]
    queue = entry["local_queue"]
    assert [item["pid"] for item in queue] == [waiters[1].pid, waiters[2].pid]
    assert queue[0]["session_id"] == second["waiter_id"]
    for item in queue:
        assert set(item) == {"session_id", "user", "pid", "waiting_for"}
        assert item["user"] == USER
    assert queue[0]["waiting_for"] > queue[1]["waiting_for"] >= 0
    assert [item["pid"] for item in lock_of(status_other, "api")["local_queue"]] == [waiters[0].pid]

    # The holder's daemon shows three in line (two in the store, one more of its own); the
    # other daemon shows the two in the store.
    assert row_of(text_holding.stdout, "api")[8] == "3"
    assert row_of(text_other.stdout, "api")[8] == "2"
    [line_holding] = [
        line for line in text_holding.stdout.splitlines() if line.startswith("waiting for")
    ]
    assert re.fullmatch(
        rf"waiting for api: 1\. {USER}@{HOST} \(\S+ ago\)  2\. {USER}@{HOST} \(\S+ ago\)"
        rf"  3\. {USER} here \(\S+\)",
        line_holding,
    ), line_holding
    [line_other] = [
        line for line in text_other.stdout.splitlines() if line.startswith("waiting for")
    ]
    assert re.fullmatch(
        rf"waiting for api: 1\. {USER}@{HOST} \(\S+ ago\)  2\. {USER}@{HOST} \(\S+ ago\)",
        line_other,
    ), line_other

    next_entry = lock_of(after, "api")
    assert next_entry["token"] == lease["token"] + 1
    assert [waiter["owner"]["pid"] for waiter in next_entry["waiters"]] == [waiters[1].pid]
    assert [item["pid"] for item in next_entry["local_queue"]] == [
        waiters[1].pid,
        waiters[2].pid,
    ]
