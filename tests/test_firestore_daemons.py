"""Real daemons on the Firestore emulator: exclusion, clock skew, forced and lost leases, restarts.

Each workstation runs its own ``deployd serve`` on the Firestore store, in
the test's namespace of the session's emulator. The tests read the store's
documents directly (firestore_stations.StoreReader), so what they check is
what every other workstation would see. Expiry is judged by the emulator's
time, which on this machine is the wall clock of the test process.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from firestore_emulator import FirestoreNamespace
from firestore_stations import (
    RunClient,
    StoreReader,
    ledger_records,
    recorder_command,
    session_of,
    wait_for_entry,
    wait_for_log,
)
from harness import (
    DEPLOYD,
    DaemonProcess,
    Gate,
    Workstation,
    iter_ledger,
    terminate,
    wait_until,
)
from test_exclusion import RECORDER, RunResult, exclusion_violations, ledger_intervals

from deployd.sessions import short_hostname

pytestmark = pytest.mark.firestore

LOCKS = ("api", "web")
WORKSTATIONS = 4
CLIENTS_PER_WORKSTATION = 8
RUNS_PER_CLIENT = 10
HOLD_SECONDS = 0.01

# The TTL of the tests that wait for a lease to expire. Renewals come every
# 2 s, and a holder declares its lease lost after 4 s without one. So the
# holder's command is stopped 2 s before anyone else can take the lock: the
# margin that the ledger checks rely on when the machine is loaded.
SHORT_TTL = 6.0
# How long after its TTL an abandoned lease may take to pass to a waiter:
# the waiter's poll interval and the latency of the daemons and the emulator,
# with a wide margin for a loaded machine. A clock ten minutes off would be
# far outside it.
TAKEOVER_SLACK = 15.0


def _run_race(workstations: list[Workstation], ledger: Path) -> tuple[list[RunResult], float]:
    """Run every client loop at once, and return the results and the seconds the race took."""

    def client_loop(client: int) -> list[RunResult]:
        # Clients take turns among the workstations, and each one alternates
        # between the locks, so every daemon queues callers for both locks.
        station = client % len(workstations)
        results = []
        for run in range(RUNS_PER_CLIENT):
            lock = LOCKS[(client // len(workstations) + run) % len(LOCKS)]
            command = [sys.executable, "-I", "-S", "-c", RECORDER, str(ledger), str(HOLD_SECONDS)]
            finished = workstations[station].deployd(
                "run", lock, "--wait", "5m", "--quiet", "--", *command, timeout=280
            )
            results.append(RunResult(station, lock, finished.returncode, finished.stderr))
        return results

    clients = len(workstations) * CLIENTS_PER_WORKSTATION
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        loops = list(pool.map(client_loop, range(clients)))
    return [result for loop in loops for result in loop], time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_runs_on_four_daemons_never_overlap(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """320 grants to 32 concurrent clients of four daemons: one holder per lock at any time."""
    workstations = [make_firestore_workstation() for _ in range(WORKSTATIONS)]
    for workstation in workstations:
        start(workstation)
    ledger = tmp_path / "ledger.jsonl"

    results, elapsed = _run_race(workstations, ledger)
    clients = WORKSTATIONS * CLIENTS_PER_WORKSTATION
    print(f"{len(results)} runs by {clients} concurrent clients took {elapsed:.1f}s")

    failed = [result for result in results if result.exit_code != 0]
    assert failed == [], f"{len(failed)} runs failed, the first: {failed[0]}"
    assert len(results) == WORKSTATIONS * CLIENTS_PER_WORKSTATION * RUNS_PER_CLIENT

    intervals, problems = ledger_intervals(iter_ledger(ledger))
    assert problems == []
    assert len(intervals) == len(results)
    assert exclusion_violations(intervals) == []
    for lock in LOCKS:
        tokens = sorted(interval.token for interval in intervals if interval.lock == lock)
        granted = sum(1 for result in results if result.lock == lock)
        assert tokens == list(range(1, granted + 1)), lock

        records = store_reader.deployments(lock)
        assert sorted(record.token for record in records) == tokens, lock
        assert {record.outcome for record in records} == {"succeeded"}, lock
        assert store_reader.lock(lock).lease is None, lock
        assert store_reader.waiter_ids(lock) == [], lock


# --- clock skew ---


def _last_update_while_held(reader: StoreReader, lock: str, session: str) -> float:
    """Read the lock until ``session`` no longer holds it, and return its last update time seen.

    A renewal that was on its way when its daemon stopped may still land, so
    the reading goes on until another holder has the lock.
    """
    last_update = 0.0
    while True:
        reading = reader.lock_read(lock)
        lease = reading.document.lease
        if lease is None or lease.holder != session:
            return last_update
        last_update = max(last_update, reading.updated_at or 0.0)
        time.sleep(0.02)


def test_fast_clock_waits_for_live_lease(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """A daemon ten minutes ahead neither takes nor queues past a lease that is renewed."""
    holder_station = make_firestore_workstation(lease={"ttl": f"{SHORT_TTL:g}s"})
    fast_station = make_firestore_workstation(clock_offset="10m")
    start(holder_station)
    start(fast_station)
    ledger = tmp_path / "ledger.jsonl"
    gate = Gate(tmp_path / "gate")
    sleeper = subprocess.Popen(["sleep", "600"])
    holder = RunClient(
        holder_station,
        tmp_path / "holder.stderr",
        "api",
        command=recorder_command(ledger, gate.path),
    )
    waiter = None
    try:
        entered = wait_for_entry(ledger)
        lease = store_reader.lock("api").lease
        assert lease is not None

        busy = fast_station.deployd("acquire", "api", "--pid", str(sleeper.pid))
        locks = fast_station.request("locks")["result"]["locks"]
        [seen] = [entry["lease"] for entry in locks if entry["lock"] == "api"]
        waiter = RunClient(
            fast_station,
            tmp_path / "waiter.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger),
        )
        wait_until(lambda: len(store_reader.waiter_ids("api")) == 1)
        # Two TTLs of server time: the holder's first lease would have expired twice.
        wait_until(
            lambda: store_reader.server_time("api") > lease.acquired_at + 2 * SHORT_TTL,
            timeout=30,
        )
        renewed_lease = store_reader.lock("api").lease

        assert busy.returncode == 75, busy.stderr
        assert "api is locked by" in busy.stderr
        assert seen["session_id"] == lease.holder
        assert 0 < seen["expires_in"] <= SHORT_TTL
        assert renewed_lease is not None
        assert renewed_lease.holder == lease.holder
        assert not renewed_lease.expired
        assert renewed_lease.renewed_at > lease.acquired_at
        assert len(ledger_records(ledger, "enter")) == 1
        assert waiter.process.poll() is None

        gate.open()
        assert holder.wait() == 0, holder.stderr()
        assert waiter.wait() == 0, waiter.stderr()
        intervals, problems = ledger_intervals(iter_ledger(ledger))
        assert problems == []
        tokens = [interval.token for interval in intervals]
        assert tokens == [entered["token"], entered["token"] + 1]
        assert exclusion_violations(intervals) == []
    finally:
        holder.stop()
        if waiter is not None:
            waiter.stop()
        sleeper.kill()
        sleeper.wait()


def test_slow_clock_holder_loses_lease_after_ttl(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """A stopped daemon ten minutes behind keeps its lease for the TTL by server time, no longer.

    The holder's daemon is frozen with SIGSTOP right after a renewal. Its
    ``deployd run`` client sees no renewal confirmed within the renew
    deadline and terminates the command, before the waiter of another daemon
    takes the lock over.
    """
    slow_station = make_firestore_workstation(clock_offset="-10m", lease={"ttl": f"{SHORT_TTL:g}s"})
    waiter_station = make_firestore_workstation()
    slow_daemon = start(slow_station)
    start(waiter_station)
    ledger = tmp_path / "ledger.jsonl"
    gate = Gate(tmp_path / "gate")
    holder = RunClient(
        slow_station, tmp_path / "holder.stderr", "api", command=recorder_command(ledger, gate.path)
    )
    waiter = None
    stopped = False
    try:
        entered = wait_for_entry(ledger)
        holder_session = session_of(entered["lease_id"])
        waiter = RunClient(
            waiter_station,
            tmp_path / "waiter.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger),
        )
        wait_until(lambda: len(store_reader.waiter_ids("api")) == 1)
        first = store_reader.lock("api")
        wait_until(lambda: store_reader.lock("api").renewal_id != first.renewal_id)
        os.kill(slow_daemon.pid, signal.SIGSTOP)
        stopped = True

        last_renewal = _last_update_while_held(store_reader, "api", holder_session)
        assert waiter.wait() == 0, waiter.stderr()
        takeover_record = store_reader.deployments("api")[-1]

        assert holder.wait() == 76, holder.stderr()
        assert "LEASE LOST" in holder.stderr()
        assert takeover_record.session_id != holder_session
        assert takeover_record.token == entered["token"] + 1
        assert takeover_record.takeover == "expired"
        assert last_renewal + SHORT_TTL <= takeover_record.started_at
        assert takeover_record.started_at < last_renewal + SHORT_TTL + TAKEOVER_SLACK
        intervals, problems = ledger_intervals(iter_ledger(ledger))
        assert problems == []
        assert exclusion_violations(intervals) == []

        os.kill(slow_daemon.pid, signal.SIGCONT)
        stopped = False
        wait_for_log(slow_station, f"lease lost: lock=api session={holder_session}")
        after = store_reader.lock("api")
        holder_record = store_reader.deployment_of("api", holder_session)
        assert after.token == takeover_record.token
        assert holder_record is not None
        assert holder_record.outcome == "expired"
    finally:
        if stopped:
            os.kill(slow_daemon.pid, signal.SIGCONT)
        holder.stop()
        if waiter is not None:
            waiter.stop()


# --- forced and lost leases ---


def _me() -> str:
    """Return ``user@host`` as the daemons name the user of this test."""
    return f"{pwd.getpwuid(os.getuid()).pw_name}@{short_hostname()}"


def test_force_unlock_from_other_daemon_stops_run(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """force-unlock on another workstation: the holder's run reports who forced it and why."""
    holder_station = make_firestore_workstation(lease={"ttl": f"{SHORT_TTL:g}s"})
    other_station = make_firestore_workstation()
    start(holder_station)
    start(other_station)
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
    try:
        entered = wait_for_entry(ledger)
        holder_session = session_of(entered["lease_id"])

        forced = other_station.deployd("force-unlock", "api", "--reason", "hotfix 42", "--yes")
        exit_code = holder.wait(30)

        stderr = holder.stderr()
        assert forced.returncode == 0, forced.stderr
        assert f"forced api away from {_me().split('@')[0]} on" in forced.stderr
        assert exit_code == 76, stderr
        assert "LEASE LOST" in stderr
        assert f"forced away by {_me()}" in stderr
        assert "hotfix 42" in stderr
        [left] = ledger_records(ledger, "leave")
        assert left["signal"] == signal.SIGTERM
        lost = wait_for_log(holder_station, f"lease lost: lock=api session={holder_session}")
        state = store_reader.lock("api")
        assert " WARNING " in lost
        assert state.lease is None
        assert state.token == entered["token"] + 1
        assert state.forced is not None
        assert state.forced.by == _me()
        assert state.forced.reason == "hotfix 42"
        record = store_reader.deployment_of("api", holder_session)
        assert record is not None
        assert record.outcome == "forced"
    finally:
        holder.stop()


# A deploy script that takes the lock for itself with the deployd command $1
# and writes the lease to $2. It waits for the named pipe $3, releases by the
# lock's name as a script does in its exit trap, and writes the exit code to $4.
ACQUIRE_THEN_RELEASE = """
deployd=$1 lease=$2 gate=$3 code=$4
$deployd acquire api --format json > "$lease.partial" || exit $?
mv "$lease.partial" "$lease"
read line < "$gate"
$deployd release api
echo $? > "$code.partial" && mv "$code.partial" "$code"
"""


def test_release_of_lost_lease_names_new_holder(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """Releasing a lease that was forced away exits 76, names the new holder and spares it.

    The script that took the lease releases it by the lock's name, and the
    test releases it by its lease id, given directly or in DEPLOYD_LEASE_ID.
    """
    holder_station = make_firestore_workstation(lease={"ttl": f"{SHORT_TTL:g}s"})
    other_station = make_firestore_workstation()
    start(holder_station)
    start(other_station)
    lease_file, code_file = tmp_path / "lease.json", tmp_path / "release.code"
    gate = Gate(tmp_path / "gate")
    script_stderr = tmp_path / "script.stderr"
    deployd = shlex.join(DEPLOYD)
    with open(script_stderr, "wb") as stderr:
        script = subprocess.Popen(
            [
                "sh",
                "-c",
                ACQUIRE_THEN_RELEASE,
                "sh",
                deployd,
                *map(str, (lease_file, gate.path, code_file)),
            ],
            env=holder_station.env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        wait_until(lambda: lease_file.exists() or script.poll() is not None)
        lease = json.loads(lease_file.read_text())
        forced = other_station.deployd("force-unlock", "api", "--reason", "stuck", "--yes")
        assert forced.returncode == 0, forced.stderr
        retaken = other_station.deployd(
            "acquire", "api", "--pid", str(sleeper.pid), "--format", "json"
        )
        assert retaken.returncode == 0, retaken.stderr
        new_lease = json.loads(retaken.stdout)
        wait_for_log(holder_station, f"lease lost: lock=api session={lease['session_id']}")
        before = store_reader.lock("api")

        gate.open()
        assert script.wait(60) == 0, script_stderr.read_text()
        by_id = holder_station.deployd("release", lease["lease_id"], "--exit-code", "0")
        by_lock = holder_station.deployd(
            "release",
            "api",
            env=holder_station.env(DEPLOYD_LEASE_ID=lease["lease_id"], DEPLOYD_LOCK="api"),
        )

        after = store_reader.lock("api")
        by_script = (int(code_file.read_text()), script_stderr.read_text())
        results = {
            "by the script": by_script,
            "by id": (by_id.returncode, by_id.stderr),
            "by lock": (by_lock.returncode, by_lock.stderr),
        }
        for how, (exit_code, message) in results.items():
            assert exit_code == 76, f"release {how}: {message}"
            assert "api" in message, how
            assert f"session {new_lease['session_id']}" in message, how
            assert "left untouched" in message, how
            assert len(message.strip().splitlines()) == 1, f"release {how}: {message}"
        assert before.lease is not None
        assert before.lease.holder == new_lease["session_id"]
        assert after.lease is not None
        assert after.lease.holder == new_lease["session_id"]
        assert after.lease.token == new_lease["token"] == lease["token"] + 2
        assert not after.lease.expired
        record = store_reader.deployment_of("api", new_lease["session_id"])
        assert record is not None
        assert record.outcome is None
    finally:
        terminate(script)
        sleeper.kill()
        sleeper.wait()


def test_holder_back_after_takeover_stops_run(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """A daemon frozen past its lease's TTL learns on SIGCONT that the lease is lost.

    It never renews or releases the lease of the daemon that took over, and
    its ``deployd run`` terminates the command, as ``--on-lost terminate`` requests.
    """
    holder_station = make_firestore_workstation(
        lease={"ttl": f"{SHORT_TTL:g}s"}, log={"level": "debug"}
    )
    other_station = make_firestore_workstation()
    holder_daemon = start(holder_station)
    start(other_station)
    ledger = tmp_path / "ledger.jsonl"
    gates = [Gate(tmp_path / "gate-1"), Gate(tmp_path / "gate-2")]
    holder = RunClient(
        holder_station,
        tmp_path / "holder.stderr",
        "api",
        "--on-lost",
        "terminate",
        command=recorder_command(ledger, gates[0].path),
    )
    taker = None
    stopped = False
    try:
        entered = wait_for_entry(ledger)
        holder_session = session_of(entered["lease_id"])
        os.kill(holder_daemon.pid, signal.SIGSTOP)
        stopped = True
        taker = RunClient(
            other_station,
            tmp_path / "taker.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger, gates[1].path),
        )
        takeover_entry = wait_for_entry(ledger, lease_count=2)
        assert holder.wait(30) == 76, holder.stderr()
        log_offset = holder_station.log_file.stat().st_size
        taken_state = store_reader.lock("api")

        os.kill(holder_daemon.pid, signal.SIGCONT)
        stopped = False
        wait_for_log(holder_station, f"lease lost: lock=api session={holder_session}")
        # The holder's daemon tries to release its lease, which must change nothing.
        wait_until(lambda: holder_station.status()["leases"] == [])
        after_back = store_reader.lock("api")
        gates[1].open()
        assert taker.wait() == 0, taker.stderr()

        log_after_stop = holder_station.log_file.read_bytes()[log_offset:].decode()
        assert "LEASE LOST" in holder.stderr()
        assert takeover_entry["token"] == entered["token"] + 1
        assert taken_state.lease is not None
        assert taken_state.lease.holder == session_of(takeover_entry["lease_id"])
        assert after_back.lease is not None
        assert after_back.lease.holder == taken_state.lease.holder
        assert after_back.lease.acquisition_id == taken_state.lease.acquisition_id
        assert after_back.token == takeover_entry["token"]
        assert f"renewed lock api for {holder_session}" not in log_after_stop
        assert f"released lock api by {holder_session}" not in log_after_stop
        intervals, problems = ledger_intervals(iter_ledger(ledger))
        assert problems == []
        assert exclusion_violations(intervals) == []
        record = store_reader.deployment_of("api", holder_session)
        assert record is not None
        assert record.outcome == "expired"
    finally:
        if stopped:
            os.kill(holder_daemon.pid, signal.SIGCONT)
        holder.stop()
        if taker is not None:
            taker.stop()


# --- daemon stop and restart ---


class LeaseWatch(threading.Thread):
    """Read a lock document every 20 ms and note each reading where ``session`` had no live lease.

    Liveness is judged as every daemon judges it: by the snapshot's read time
    against the document's update time plus the lease's TTL.
    """

    def __init__(self, namespace: FirestoreNamespace, lock: str, session: str) -> None:
        super().__init__(daemon=True)
        self.namespace = namespace
        self.lock = lock
        self.session = session
        self.problems: list[str] = []
        self.readings = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        reader = StoreReader(self.namespace.host, self.namespace.project, self.namespace.namespace)
        try:
            while not self._stopping.wait(0.02):
                lease = reader.lock(self.lock).lease
                self.readings += 1
                if lease is None or lease.holder != self.session:
                    self.problems.append(f"held by {lease.holder if lease else None}")
                elif lease.expired:
                    self.problems.append(f"expired {-lease.expires_in:.3f}s ago")
        finally:
            reader.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)


class AcquireProbe(threading.Thread):
    """Run ``deployd acquire LOCK`` without waiting, again and again, and keep the exit codes."""

    def __init__(self, workstation: Workstation, lock: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.workstation = workstation
        self.lock = lock
        self.pid = pid
        self.exit_codes: list[int] = []
        self.grants: list[str] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            result = self.workstation.deployd("acquire", self.lock, "--pid", str(self.pid))
            self.exit_codes.append(result.returncode)
            if result.returncode == 0:
                self.grants.append(result.stdout)

    def stop(self) -> None:
        self._stopping.set()
        self.join(60)


def test_restart_keeps_run_locked(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    firestore_namespace: FirestoreNamespace,
    tmp_path: Path,
) -> None:
    """SIGTERM and an immediate restart during ``deployd run``: the lock never comes free.

    The deploy runs on past the moment at which the lease that the first
    daemon left would have expired without the new daemon's renewals.
    """
    station = make_firestore_workstation(lease={"ttl": f"{SHORT_TTL:g}s"})
    other_station = make_firestore_workstation()
    first = start(station)
    start(other_station)
    ledger = tmp_path / "ledger.jsonl"
    gate = Gate(tmp_path / "gate")
    sleeper = subprocess.Popen(["sleep", "600"])
    run = RunClient(
        station, tmp_path / "run.stderr", "api", command=recorder_command(ledger, gate.path)
    )
    watch = probe = None
    try:
        entered = wait_for_entry(ledger)
        session = session_of(entered["lease_id"])
        # The client binds the command's pid after starting it, so wait for the binding.
        wait_until(lambda: len(station.status()["leases"][0]["binding"]["pids"]) == 2)
        watch = LeaseWatch(firestore_namespace, "api", session)
        probe = AcquireProbe(other_station, "api", sleeper.pid)
        watch.start()
        probe.start()

        assert first.stop() == 0
        updated_at_stop = store_reader.lock_read("api").updated_at
        log_offset = station.log_file.stat().st_size
        start(station)
        wait_until(lambda: "re-attached to the lease on api" in run.stderr(), timeout=30)
        assert updated_at_stop is not None
        wait_until(
            lambda: store_reader.server_time("api") > updated_at_stop + SHORT_TTL + 1,
            timeout=30,
        )
        watch.stop()
        probe.stop()

        log = station.log_file.read_bytes()[log_offset:].decode(errors="replace")
        assert watch.readings > 0
        assert watch.problems == []
        assert probe.grants == []
        # 69: the store did not respond within its timeout on a loaded machine.
        assert set(probe.exit_codes) <= {69, 75}
        assert 75 in probe.exit_codes
        assert f"lease resumed after restart: lock=api session={session}" in log

        gate.open()
        assert run.wait() == 0, run.stderr()
        record = store_reader.deployment_of("api", session)
        assert record is not None
        assert record.token == entered["token"]
        assert record.outcome == "succeeded"
        assert store_reader.lock("api").lease is None
    finally:
        if watch is not None:
            watch.stop()
        if probe is not None:
            probe.stop()
        run.stop()
        sleeper.kill()
        sleeper.wait()


def test_daemon_that_stays_down_frees_lock_after_ttl(
    make_firestore_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    store_reader: StoreReader,
    tmp_path: Path,
) -> None:
    """SIGTERM, no restart: the kept lease lasts its TTL by server time, then another daemon has it.

    The stopped daemon's ``deployd run`` client hears no renewal within the
    renew deadline and terminates its command before the other grant.
    """
    station = make_firestore_workstation(lease={"ttl": f"{SHORT_TTL:g}s"})
    other_station = make_firestore_workstation()
    stopped = start(station)
    start(other_station)
    ledger = tmp_path / "ledger.jsonl"
    gate = Gate(tmp_path / "gate")
    run = RunClient(
        station, tmp_path / "run.stderr", "api", command=recorder_command(ledger, gate.path)
    )
    waiter = None
    try:
        entered = wait_for_entry(ledger)
        session = session_of(entered["lease_id"])
        wait_until(lambda: len(station.status()["leases"][0]["binding"]["pids"]) == 2)
        waiter = RunClient(
            other_station,
            tmp_path / "waiter.stderr",
            "api",
            "--wait",
            "2m",
            command=recorder_command(ledger),
        )
        wait_until(lambda: len(store_reader.waiter_ids("api")) == 1)

        assert stopped.stop() == 0
        last_update = _last_update_while_held(store_reader, "api", session)
        assert waiter.wait() == 0, waiter.stderr()
        takeover_record = store_reader.deployments("api")[-1]

        assert run.wait(30) == 76, run.stderr()
        assert "LEASE LOST" in run.stderr()
        assert "lease kept for the next daemon: lock=api" in station.log_file.read_text()
        assert takeover_record.token == entered["token"] + 1
        assert takeover_record.takeover == "expired"
        assert last_update + SHORT_TTL <= takeover_record.started_at
        assert takeover_record.started_at < last_update + SHORT_TTL + TAKEOVER_SLACK
        intervals, problems = ledger_intervals(iter_ledger(ledger))
        assert problems == []
        assert exclusion_violations(intervals) == []
        record = store_reader.deployment_of("api", session)
        assert record is not None
        assert record.outcome == "expired"
    finally:
        run.stop()
        if waiter is not None:
            waiter.stop()
