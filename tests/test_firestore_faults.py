"""Real daemons on the Firestore emulator while it fails: death, outages, lost replies.

The emulator is killed and restarted (a private one per test, so the
session's emulator keeps serving the others), or a loopback proxy
(tcp_proxy.TcpProxy) sits between one daemon and the emulator and loses a
reply or forwards nothing. Every check on timing is a wide bound that
distinguishes mechanisms: within the store's deadline rather than after a
minute, before the lease's TTL rather than after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from firestore_emulator import FirestoreEmulator, FirestoreNamespace
from firestore_stations import (
    STORE_TIMEOUT,
    RunClient,
    StoreReader,
    ledger_records,
    log_lines,
    recorder_command,
    session_of,
    stays_by_lease,
    wait_for_entry,
    wait_for_log,
)
from harness import DaemonProcess, Gate, Workstation, iter_ledger, wait_until
from tcp_proxy import TcpProxy
from test_exclusion import ledger_intervals

pytestmark = pytest.mark.firestore

# The maximum time a request to a daemon may take when its store does not respond:
# a few store deadlines (the daemon may read again after a failed write),
# plus the start of the client. Far below the minute that would mean the
# deadline did not apply.
ANSWER_BOUND = 3 * STORE_TIMEOUT + 5.0
# The TTL of the test that kills the emulator: long enough that "the holder
# gave up before the TTL" shows a margin of three seconds (the renew deadline
# is six).
LONG_TTL = 9.0
UNLOCKED_WARNING = "WITHOUT a team-wide lock on api"


@pytest.fixture
def proxy(firestore_namespace: FirestoreNamespace) -> Iterator[TcpProxy]:
    """Yield a proxy in front of the session's emulator, and close it at the end."""
    with TcpProxy(firestore_namespace.host) as started:
        yield started


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """Yield a process for ``acquire --pid`` to bind leases to, and kill it at the end."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait()


def _timed(call: Callable[[], subprocess.CompletedProcess[str]]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def _kill_emulator(emulator: FirestoreEmulator) -> None:
    """Kill the emulator's process group with SIGKILL, then reap it."""
    assert emulator.process is not None
    os.killpg(emulator.process.pid, signal.SIGKILL)
    emulator.stop()


# --- the emulator stopped and restarted ---


def test_emulator_death_loses_lease_before_ttl(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    private_emulator: FirestoreEmulator,
    firestore_namespace: FirestoreNamespace,
    tmp_path: Path,
) -> None:
    """The emulator killed under a lease: the holder stops before the TTL, a waiter goes after.

    The restarted emulator starts empty, so the waiter's grant has fencing
    token 1 again, which a real Firestore database, never emptied, would not
    hand out twice. The order of the two commands comes from the ledger.
    """
    host = private_emulator.host
    holder_station = make_firestore_workstation(emulator_host=host, lease={"ttl": f"{LONG_TTL:g}s"})
    waiter_station = make_firestore_workstation(emulator_host=host, on_store_error="closed")
    start(holder_station)
    start(waiter_station)
    reader = StoreReader(host, firestore_namespace.project, firestore_namespace.namespace)
    ledger = tmp_path / "ledger.jsonl"
    gate = Gate(tmp_path / "gate")
    holder = RunClient(
        holder_station,
        tmp_path / "holder.stderr",
        "api",
        "--on-lost",
        "terminate",
        command=recorder_command(ledger, gate.path),
    )
    waiter = None
    try:
        entered = wait_for_entry(ledger)
        waiter = RunClient(
            waiter_station,
            tmp_path / "waiter.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger),
        )
        wait_until(lambda: len(reader.waiter_ids("api")) == 1)
        first = reader.lock_read("api")
        renewed = wait_until(
            lambda: (reading := reader.lock_read("api")).updated_at != first.updated_at and reading,
            timeout=LONG_TTL,
        )
        _kill_emulator(private_emulator)
        assert renewed.updated_at is not None

        assert holder.wait(3 * LONG_TTL) == 76, holder.stderr()
        [left] = ledger_records(ledger, "leave")
        restarted_at = time.time()
        private_emulator.start()
        assert waiter.wait() == 0, waiter.stderr()
        takeover_entry = wait_for_entry(ledger, lease_count=2)

        gave_up_after = left["wall"] - renewed.updated_at
        print(f"the command was stopped {gave_up_after:.2f}s after the last renewal")
        assert "LEASE LOST" in holder.stderr()
        assert left["signal"] == signal.SIGTERM
        assert left["wall"] < renewed.updated_at + LONG_TTL
        assert entered["token"] == 1
        assert takeover_entry["token"] == 1
        assert takeover_entry["wall"] > restarted_at > left["wall"]
    finally:
        reader.close()
        holder.stop()
        if waiter is not None:
            waiter.stop()


def test_unreachable_store_follows_policy(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    private_emulator: FirestoreEmulator,
    sleeper: subprocess.Popen[bytes],
) -> None:
    """Stopped emulator: "open" grants with a warning, "closed" exits 69, both within the deadline.

    Once the emulator is back, the next acquire of each daemon is granted
    by the store, with no daemon restart.
    """
    host = private_emulator.host
    open_station = make_firestore_workstation(emulator_host=host, on_store_error="open")
    closed_station = make_firestore_workstation(emulator_host=host, on_store_error="closed")
    start(open_station)
    start(closed_station)
    pid = str(sleeper.pid)
    private_emulator.stop()

    unlocked, unlocked_took = _timed(
        lambda: open_station.deployd("acquire", "api", "--pid", pid, "--format", "json")
    )
    refused, refused_took = _timed(lambda: closed_station.deployd("acquire", "api", "--pid", pid))
    status_text = open_station.deployd("status").stdout
    private_emulator.start()
    granted = [
        station.deployd("acquire", lock, "--pid", pid, "--format", "json")
        for station, lock in ((open_station, "web"), (closed_station, "db"))
    ]

    assert unlocked.returncode == 0, unlocked.stderr
    assert UNLOCKED_WARNING in unlocked.stderr
    assert json.loads(unlocked.stdout)["degraded"] is True
    assert unlocked_took < ANSWER_BOUND
    assert "UNLOCKED api: session " in status_text
    assert "deploys WITHOUT the team-wide lock" in status_text
    assert refused.returncode == 69, refused.stderr
    assert "failed try_acquire of lock 'api'" in refused.stderr
    assert refused_took < ANSWER_BOUND
    for result in granted:
        assert result.returncode == 0, result.stderr
        lease = json.loads(result.stdout)
        assert lease["degraded"] is False
        assert lease["token"] >= 1


# --- waiters ---


def test_waiter_killed_while_queued_leaves_queue(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """A waiting ``deployd run`` killed with SIGKILL leaves both queues and is never granted."""
    holder_station, dead_station, live_station = (make_firestore_workstation() for _ in range(3))
    for station in (holder_station, dead_station, live_station):
        start(station)
    ledger = tmp_path / "ledger.jsonl"
    gate = Gate(tmp_path / "gate")
    holder = RunClient(
        holder_station,
        tmp_path / "holder.stderr",
        "api",
        command=recorder_command(ledger, gate.path),
    )
    dead = live = None
    try:
        entered = wait_for_entry(ledger)
        dead = RunClient(
            dead_station,
            tmp_path / "dead.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger),
        )
        [dead_session] = wait_until(lambda: store_reader.waiter_ids("api"))
        live = RunClient(
            live_station,
            tmp_path / "live.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger),
        )
        wait_until(lambda: len(store_reader.waiter_ids("api")) == 2)
        assert len(dead_station.local_queue("api")) == 1

        dead.process.kill()
        dead.process.wait()
        wait_until(lambda: dead_session not in store_reader.waiter_ids("api"))
        wait_for_log(dead_station, f"acquire withdrawn: lock=api session={dead_session}")
        assert dead_station.local_queue("api") == []

        gate.open()
        assert holder.wait() == 0, holder.stderr()
        assert live.wait() == 0, live.stderr()
        intervals, problems = ledger_intervals(iter_ledger(ledger))
        assert problems == []
        assert [interval.token for interval in intervals] == [
            entered["token"],
            entered["token"] + 1,
        ]
        assert store_reader.deployment_of("api", dead_session) is None
        assert log_lines(dead_station, "lease granted") == []
        assert store_reader.waiter_ids("api") == []
    finally:
        holder.stop()
        for client in (dead, live):
            if client is not None:
                client.stop()


# --- replies lost between a daemon and the store ---


def test_grant_with_lost_reply_is_granted_once(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    proxy: TcpProxy,
    sleeper: subprocess.Popen[bytes],
) -> None:
    """The reply to the grant's commit is lost: the caller still gets the lease, with one token."""
    station = make_firestore_workstation(emulator_host=proxy.address)
    start(station)
    assert proxy.requests == 0
    proxy.lose_reply(2)  # the read of the lock, then the commit

    acquired = station.deployd("acquire", "api", "--pid", str(sleeper.pid), "--format", "json")

    assert acquired.returncode == 0, acquired.stderr
    lease = json.loads(acquired.stdout)
    state = store_reader.lock("api")
    assert proxy.lost_replies == 1
    assert lease["token"] == 1
    assert state.token == 1
    assert state.lease is not None
    assert state.lease.holder == lease["session_id"]
    assert [record.token for record in store_reader.deployments("api")] == [1]
    assert log_lines(station, f"grant of lock api by {lease['session_id']} had applied")
    assert station.status()["leases"][0]["token"] == 1


def test_lease_of_exited_process_logs_grant_first(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    proxy: TcpProxy,
) -> None:
    """The bound process exits while the grant's RPCs are in flight: the grant is logged first."""
    station = make_firestore_workstation(emulator_host=proxy.address)
    start(station)
    proxy.reply_latency(1.0)
    process = subprocess.Popen(["sleep", "600"])
    try:
        acquiring = station.spawn("acquire", "api", "--pid", str(process.pid), "--format", "json")
        # The daemon identifies the process before its first RPC, the read of the lock.
        wait_until(lambda: proxy.requests >= 1)
    finally:
        process.kill()
        process.wait()
    _, stderr = acquiring.communicate(timeout=ANSWER_BOUND)
    assert acquiring.returncode == 0, stderr

    wait_for_log(station, "lease ended: lock=api")
    lines = [
        line
        for line in station.log_file.read_text(errors="replace").splitlines()
        if "lease granted: lock=api" in line or "lease ended: lock=api" in line
    ]
    assert len(lines) == 2, lines
    assert "lease granted" in lines[0], lines
    assert "outcome=abandoned" in lines[1], lines


def test_renewal_with_lost_reply_keeps_lease(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    proxy: TcpProxy,
    sleeper: subprocess.Popen[bytes],
) -> None:
    """The reply to a renewal is lost: the daemon learns it applied and goes on renewing."""
    station = make_firestore_workstation(emulator_host=proxy.address)
    start(station)
    acquired = station.deployd(
        "acquire", "api", "--pid", str(sleeper.pid), "--ttl", "3s", "--format", "json"
    )
    assert acquired.returncode == 0, acquired.stderr
    lease = json.loads(acquired.stdout)
    session = lease["session_id"]
    proxy.lose_reply(1)  # the holder's next renewal

    wait_until(lambda: proxy.lost_replies == 1)
    wait_for_log(station, f"renewal of lock api by {session} had applied")
    after_loss = store_reader.lock("api").renewal_id
    wait_until(lambda: store_reader.lock("api").renewal_id != after_loss)
    released = station.deployd("release", lease["lease_id"], "--exit-code", "0")

    assert released.returncode == 0, released.stderr
    assert log_lines(station, "lease lost") == []
    state = store_reader.lock("api")
    assert state.lease is None
    assert state.token == lease["token"]
    record = store_reader.deployment_of("api", session)
    assert record is not None
    assert record.outcome == "succeeded"


def test_release_with_lost_reply_frees_lock(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    proxy: TcpProxy,
    sleeper: subprocess.Popen[bytes],
) -> None:
    """The reply to a release is lost: the release succeeds once and records the outcome."""
    station = make_firestore_workstation(emulator_host=proxy.address)
    start(station)
    # The default TTL of 30 s puts the first renewal 10 s after the grant, so
    # the next request through the proxy is the release.
    acquired = station.deployd("acquire", "api", "--pid", str(sleeper.pid), "--format", "json")
    assert acquired.returncode == 0, acquired.stderr
    lease = json.loads(acquired.stdout)
    proxy.lose_reply(1)

    released = station.deployd("release", lease["lease_id"], "--exit-code", "3")

    assert released.returncode == 0, released.stderr
    assert "released api" in released.stderr
    assert proxy.lost_replies == 1
    assert log_lines(station, f"release of lock api by {lease['session_id']} had applied")
    state = store_reader.lock("api")
    assert state.lease is None
    assert state.token == lease["token"]
    [record] = store_reader.deployments("api")
    assert record.outcome == "failed"
    assert record.exit_code == 3


def test_blackholed_store_bounds_acquire_time(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    proxy: TcpProxy,
    sleeper: subprocess.Popen[bytes],
) -> None:
    """A store that never replies: acquire returns within the store deadline under both policies."""
    open_station = make_firestore_workstation(emulator_host=proxy.address, on_store_error="open")
    closed_station = make_firestore_workstation(
        emulator_host=proxy.address, on_store_error="closed"
    )
    start(open_station)
    start(closed_station)
    pid = str(sleeper.pid)
    proxy.blackhole()

    unlocked, unlocked_took = _timed(lambda: open_station.deployd("acquire", "api", "--pid", pid))
    refused, refused_took = _timed(lambda: closed_station.deployd("acquire", "web", "--pid", pid))
    print(f"unlocked grant after {unlocked_took:.2f}s, refusal after {refused_took:.2f}s")

    assert unlocked.returncode == 0, unlocked.stderr
    assert UNLOCKED_WARNING in unlocked.stderr
    assert unlocked_took < ANSWER_BOUND
    assert refused.returncode == 69, refused.stderr
    assert f"no reply within {STORE_TIMEOUT:g}s" in refused.stderr
    assert refused_took < ANSWER_BOUND


# --- deploys without the lock ---


def test_unlocked_deploys_are_serialized_recorded_and_checked(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    """on_store_error = "open" with the store out of reach, for one daemon only.

    Its deploys run without the lock and still one at a time. Another
    daemon, which reaches the store, deploys the same lock meanwhile. Once
    the store is back, the first daemon records its deploys as degraded and
    reports the overlap in its log and to the deploy still running.
    """
    cut_off = make_firestore_workstation(
        emulator_host=proxy.address, on_store_error="open", log={"level": "debug"}
    )
    connected = make_firestore_workstation()
    start(cut_off)
    start(connected)
    ledger = tmp_path / "ledger.jsonl"
    gate = Gate(tmp_path / "gate")
    proxy.blackhole()
    short = cut_off.deployd("run", "api", "--", *recorder_command(ledger))
    running = RunClient(
        cut_off, tmp_path / "running.stderr", "api", command=recorder_command(ledger, gate.path)
    )
    queued = None
    try:
        assert short.returncode == 0, short.stderr
        running_entry = wait_for_entry(ledger, lease_count=2)
        queued = RunClient(
            cut_off,
            tmp_path / "queued.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger),
        )
        wait_until(lambda: len(log_lines(cut_off, "acquire requested: lock=api")) == 3)
        other = connected.deployd("run", "api", "--", *recorder_command(ledger))
        assert other.returncode == 0, other.stderr
        [short_entry, _, other_entry] = ledger_records(ledger, "enter")
        running_session = session_of(running_entry["lease_id"])
        other_session = session_of(other_entry["lease_id"])

        proxy.blackhole(False)
        wait_until(
            lambda: [
                line
                for line in log_lines(cut_off, "lease taken in the store after running without")
                if f"session={running_session}" in line
            ]
        )
        [overlap] = wait_until(
            lambda: [line for line in log_lines(cut_off, "overlap: ") if other_session in line]
        )
        wait_until(lambda: other_session in running.stderr())
        gate.open()
        assert running.wait() == 0, running.stderr()
        assert queued.wait() == 0, queued.stderr()
        short_record = wait_until(
            lambda: store_reader.deployment_of("api", session_of(short_entry["lease_id"])),
            timeout=90,
        )

        assert UNLOCKED_WARNING in short.stderr
        assert UNLOCKED_WARNING in running.stderr()
        assert short_entry["token"] == running_entry["token"] == 0
        assert other_entry["token"] == 1
        assert " WARNING " in overlap
        assert running_session in overlap
        stays = stays_by_lease(ledger)
        on_cut_off = sorted(
            stay for lease_id, stay in stays.items() if lease_id != other_entry["lease_id"]
        )
        assert len(on_cut_off) == 3
        assert on_cut_off[0][1] < on_cut_off[1][0]
        assert on_cut_off[1][1] < on_cut_off[2][0]
        running_record = store_reader.deployment_of("api", running_session)
        other_record = store_reader.deployment_of("api", other_session)
        assert short_record.degraded is True
        assert short_record.outcome == "succeeded"
        assert running_record is not None
        assert running_record.degraded is True
        assert running_record.outcome == "succeeded"
        assert other_record is not None
        assert other_record.degraded is False
    finally:
        running.stop()
        if queued is not None:
            queued.stop()
