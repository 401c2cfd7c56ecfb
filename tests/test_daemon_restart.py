"""Daemon death, stop and restart while a lease is held, with real signals and real stores.

The tests read the SQLite lease store and the daemon's state file directly,
next to the running daemons. The store judges expiry on CLOCK_BOOTTIME
(``deployd.clock.MachineClock``), so the tests read that clock to tell whether
a lease had expired at a given moment.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    DaemonProcess,
    Gate,
    ShellHolder,
    Workstation,
    query_sqlite,
    terminate,
    wait_until,
)

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
PID_REUSE_ATTEMPTS = 5

# A deploy command that writes its lease id and fencing token to $1, then waits
# for the test to open the named pipe $2, and exits 0.
DEPLOY_UNTIL_GATE = """
printf '%s %s\\n' "$DEPLOYD_LEASE_ID" "$DEPLOYD_FENCING_TOKEN" > "$1.partial"
mv "$1.partial" "$1"
read line < "$2"
"""


def machine_clock() -> float:
    """Return the reading of the clock that the SQLite store judges expiry by."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def lock_row(store_file: Path, lock: str) -> dict[str, Any]:
    rows = query_sqlite(store_file, "SELECT * FROM locks WHERE name = ?", lock)
    assert len(rows) == 1, rows
    return rows[0]


def grant_time(row: dict[str, Any]) -> float:
    """Return when the store granted the lease in ``row``, on the machine clock.

    The store sets ``expires_at`` to the grant time plus the TTL and moves it on
    each renewal, so this holds only before the first renewal.
    """
    assert row["renewed_at"] == row["acquired_at"], "the lease was renewed since its grant"
    return float(row["expires_at"]) - float(row["ttl"])


def deployments(store_file: Path, session_id: str) -> list[dict[str, Any]]:
    return query_sqlite(store_file, "SELECT * FROM deployments WHERE session_id = ?", session_id)


def kept_lease_ids(workstation: Workstation) -> list[str]:
    rows = query_sqlite(workstation.kept_leases_file, "SELECT lease_id FROM kept_leases")
    return [row["lease_id"] for row in rows]


def log_since(workstation: Workstation, offset: int) -> str:
    return workstation.log_file.read_bytes()[offset:].decode(errors="replace")


class LeaseWatch(threading.Thread):
    """Read a lock's row in the store every 10 ms; note each reading where the lease was not live.

    A reading counts as live when the row names ``lease_id`` as holder and its
    expiry lies after the moment just before the read.
    """

    def __init__(self, store_file: Path, lock: str, lease_id: str) -> None:
        super().__init__(daemon=True)
        self.store_file = store_file
        self.lock = lock
        self.lease_id = lease_id
        self.problems: list[str] = []
        self.readings = 0
        self._stopping = threading.Event()
        self._boot_id = boot_id()

    def run(self) -> None:
        import sqlite3

        connection = sqlite3.connect(self.store_file, timeout=10.0, isolation_level=None)
        try:
            while not self._stopping.wait(0.01):
                # The clock is read first: a row that shows an expiry before
                # this moment was expired when it was read.
                now = machine_clock()
                row = connection.execute(
                    "SELECT holder, boot_id, expires_at FROM locks WHERE name = ?", (self.lock,)
                ).fetchone()
                self.readings += 1
                if row is None or row[0] != self.lease_id:
                    self.problems.append(f"held by {row[0] if row else None} at {now:.3f}")
                elif row[1] != self._boot_id or row[2] <= now:
                    self.problems.append(f"expired at {row[2]:.3f}, read at {now:.3f}")
        finally:
            connection.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)


class AcquireProbe(threading.Thread):
    """Run ``deployd acquire LOCK`` without waiting, again and again, and keep the exit codes."""

    def __init__(self, workstation: Workstation, lock: str) -> None:
        super().__init__(daemon=True)
        self.workstation = workstation
        self.lock = lock
        self.exit_codes: list[int] = []
        self.grants: list[str] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            result = self.workstation.deployd("acquire", self.lock, timeout=30)
            self.exit_codes.append(result.returncode)
            if result.returncode == 0:
                self.grants.append(result.stdout)

    def stop(self) -> None:
        self._stopping.set()
        self.join(60)


def test_killed_daemon_lease_expires_then_regrant(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """After a daemon's SIGKILL, a new one on its socket grants the lock only after expiry."""
    # The TTL leaves the new daemon time to start and queue the waiter before the
    # old lease expires, and the test checks that it did.
    workstation = make_workstation(lease={"ttl": "4s"})
    killed = start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    waiter = None
    try:
        lease = holder.lease()
        killed.kill()

        assert stat.S_ISSOCK(workstation.socket.lstat().st_mode)
        old = lock_row(workstation.store_file, "api")
        assert old["holder"] == lease["session_id"]
        log_offset = workstation.log_file.stat().st_size

        restarted = start(workstation)
        assert restarted.pid != killed.pid
        assert workstation.request("hello")["result"]["pid"] == restarted.pid
        assert "removing stale socket file" in log_since(workstation, log_offset)

        # The waiter requests a long TTL, so its lease is not renewed before the
        # test reads its grant time from the store.
        waiter = queued = ShellHolder(
            workstation, tmp_path / "waiter", "api", "--wait", "30s", "--ttl", "60s"
        )
        wait_until(lambda: workstation.local_queue("api") or queued.lease_file.exists())
        queued_at = machine_clock()
        assert queued_at < old["expires_at"], (
            "the waiter queued only after the old lease had expired, so the test cannot show "
            f"that the grant waited for expiry ({queued_at - old['expires_at']:.3f}s late)"
        )
        new_lease = waiter.lease()

        new = lock_row(workstation.store_file, "api")
        assert new["holder"] == new_lease["session_id"]
        assert grant_time(new) >= old["expires_at"]
        assert new_lease["token"] == lease["token"] + 1
        assert holder.process.poll() is None
        assert [
            row["outcome"] for row in deployments(workstation.store_file, lease["session_id"])
        ] == ["expired"]
    finally:
        holder.kill()
        if waiter is not None:
            waiter.kill()


def test_restart_keeps_running_deploy_locked(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """SIGTERM and an immediate restart during ``deployd run``: the lock never comes free.

    The TTL is short, and the deploy runs on past the moment its lease would
    have expired without the new daemon's renewals.
    """
    workstation = make_workstation(lease={"ttl": "5s"})
    first = start(workstation)
    lease_file = tmp_path / "lease.txt"
    stderr_file = tmp_path / "run.stderr"
    gate = Gate(tmp_path / "gate")
    with open(stderr_file, "w") as stderr:
        run = workstation.spawn(
            "run",
            "api",
            "--",
            "sh",
            "-c",
            DEPLOY_UNTIL_GATE,
            "sh",
            str(lease_file),
            str(gate.path),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    watch = probe = None
    try:
        wait_until(lease_file.exists)
        handed_out_id, token_text = lease_file.read_text().split()
        # DEPLOYD_LEASE_ID is the session id, "+" and the holder's key.
        lease_id = handed_out_id.rpartition("+")[0]
        token = int(token_text)
        # The client binds the command's pid after starting it, so wait for the binding.
        wait_until(lambda: len(workstation.status()["leases"][0]["binding"]["pids"]) == 2)
        watch = LeaseWatch(workstation.store_file, "api", lease_id)
        probe = AcquireProbe(workstation, "api")
        watch.start()
        probe.start()

        assert first.stop() == 0
        assert kept_lease_ids(workstation) == [lease_id]
        expiry_at_stop = lock_row(workstation.store_file, "api")["expires_at"]
        log_offset = workstation.log_file.stat().st_size
        start(workstation)
        wait_until(lambda: "re-attached to the lease on api" in stderr_file.read_text())
        # Let the deploy outlive the lease that the first daemon left behind.
        wait_until(lambda: machine_clock() > expiry_at_stop + 1.0, timeout=30)
        watch.stop()
        probe.stop()

        assert watch.readings > 0
        assert watch.problems == []
        assert probe.grants == []
        assert set(probe.exit_codes) <= {69, 75}
        assert 75 in probe.exit_codes
        assert "lease resumed after restart: lock=api" in log_since(workstation, log_offset)

        gate.open()
        assert run.wait(30) == 0, stderr_file.read_text()
        records = deployments(workstation.store_file, lease_id)
        assert len(records) == 1
        assert records[0]["token"] == token
        assert records[0]["outcome"] == "succeeded"
        assert records[0]["exit_code"] == 0
        assert lock_row(workstation.store_file, "api")["holder"] is None
    finally:
        if watch is not None:
            watch.stop()
        if probe is not None:
            probe.stop()
        # The client forwards SIGTERM to the command's process group.
        terminate(run)


def test_stopped_daemon_lease_expires_for_other_daemon(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """SIGTERM, no restart: a live holder's lease lasts its TTL, then another daemon gets it."""
    shared_store = tmp_path / "locks.sqlite3"
    stopped = make_workstation(store={"path": str(shared_store)}, lease={"ttl": "2s"})
    other = make_workstation(store={"path": str(shared_store)})
    stopped_daemon = start(stopped)
    start(other)
    holder = ShellHolder(stopped, tmp_path / "holder", "api")
    waiter = None
    try:
        lease = holder.lease()
        waiter = ShellHolder(other, tmp_path / "waiter", "api", "--wait", "30s", "--ttl", "60s")
        wait_until(lambda: len(other.local_queue("api")) == 1)

        assert stopped_daemon.stop() == 0
        assert kept_lease_ids(stopped) == [lease["session_id"]]
        old = lock_row(shared_store, "api")
        assert old["holder"] == lease["session_id"]
        new_lease = waiter.lease()

        new = lock_row(shared_store, "api")
        assert new["holder"] == new_lease["session_id"]
        assert grant_time(new) >= old["expires_at"]
        assert new_lease["token"] == lease["token"] + 1
        assert holder.process.poll() is None
        assert [row["outcome"] for row in deployments(shared_store, lease["session_id"])] == [
            "expired"
        ]
    finally:
        holder.kill()
        if waiter is not None:
            waiter.kill()


def test_stop_releases_lease_of_dead_holder(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """SIGTERM after the holder died frees the lock before the daemon exits, long before the TTL.

    The daemon is frozen with SIGSTOP while the holder is killed and SIGTERM is
    sent, so on SIGCONT it finds both at once. Either its process watcher or its
    stop sequence may release the lease, but the release must reach the store.
    """
    daemon = start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    try:
        lease = holder.lease()
        assert lease["timings"]["ttl"] == 30.0

        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            holder.kill()
            os.kill(daemon.pid, signal.SIGTERM)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert daemon.process.wait(30) == 0
        released_at_stop = "lease released at stop" in workstation.log_file.read_text()
        print(f"released by the {'stop sequence' if released_at_stop else 'process watcher'}")

        row = lock_row(workstation.store_file, "api")
        assert row["holder"] is None
        assert row["token"] == lease["token"]
        assert kept_lease_ids(workstation) == []
        records = deployments(workstation.store_file, lease["session_id"])
        assert [record["outcome"] for record in records] == ["abandoned"]
    finally:
        holder.kill()


def _skip_unless_pid_reuse_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("forcing pid reuse writes ns_last_pid, which needs root")
    if not NS_LAST_PID.exists():
        pytest.skip(f"{NS_LAST_PID} is missing (kernel without CONFIG_CHECKPOINT_RESTORE)")
    try:
        NS_LAST_PID.write_text(NS_LAST_PID.read_text())
    except OSError as exc:
        pytest.skip(f"writing {NS_LAST_PID} was rejected: {exc}")


def _start_with_pid(pid: int) -> subprocess.Popen[bytes]:
    """Start an unrelated ``sleep`` that gets ``pid`` unless another process takes it first."""
    NS_LAST_PID.write_text(str(pid - 1))
    return subprocess.Popen(["sleep", "600"])


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(10)


def test_reused_holder_pid_ends_kept_lease(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    """A kept lease whose holder's pid now belongs to another process is released, not resumed.

    The kernel gives the old pid to an unrelated process for real, through
    ns_last_pid. Another process on the machine may take the pid first, so the
    scenario is retried a few times.
    """
    _skip_unless_pid_reuse_possible()
    impostor = holder = None
    try:
        for _ in range(PID_REUSE_ATTEMPTS):
            daemon = start(workstation)
            holder = subprocess.Popen(["sleep", "600"])
            acquired = workstation.deployd("acquire", "api", "--pid", str(holder.pid))
            assert acquired.returncode == 0, acquired.stderr
            lease_id = lock_row(workstation.store_file, "api")["holder"]
            assert daemon.stop() == 0
            assert kept_lease_ids(workstation) == [lease_id]

            old_pid = holder.pid
            _stop(holder)
            impostor = _start_with_pid(old_pid)
            if impostor.pid == old_pid:
                break
            _stop(impostor)
            impostor = None
        else:
            pytest.fail(f"no process got an old pid back in {PID_REUSE_ATTEMPTS} attempts")

        log_offset = workstation.log_file.stat().st_size
        start(workstation)

        row = lock_row(workstation.store_file, "api")
        assert row["holder"] is None
        assert workstation.status()["leases"] == []
        assert impostor.poll() is None
        assert (
            f"not resuming kept lease: lock=api session={lease_id}: its holder exited"
            in log_since(workstation, log_offset)
        )
        records = deployments(workstation.store_file, lease_id)
        assert [record["outcome"] for record in records] == ["abandoned"]
    finally:
        _stop(impostor)
        _stop(holder)


def test_restart_keeps_two_leases_until_holders_exit(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """SIGTERM and a restart with two live holders: both locks stay held, then free at their exit.

    The TTL is short and the holders run on past the moment their leases would
    have expired without the new daemon's renewals.
    """
    workstation = make_workstation(lease={"ttl": "5s"})
    first = start(workstation)
    locks = ("api", "web")
    holders = [ShellHolder(workstation, tmp_path / lock, lock) for lock in locks]
    watches: list[LeaseWatch] = []
    try:
        leases = {lock: holder.lease() for lock, holder in zip(locks, holders, strict=True)}
        watches = [
            LeaseWatch(workstation.store_file, lock, lease["session_id"])
            for lock, lease in leases.items()
        ]
        for watch in watches:
            watch.start()

        assert first.stop() == 0
        assert sorted(kept_lease_ids(workstation)) == sorted(
            lease["session_id"] for lease in leases.values()
        )
        expiry_at_stop = max(lock_row(workstation.store_file, lock)["expires_at"] for lock in locks)
        log_offset = workstation.log_file.stat().st_size
        start(workstation)
        for lock in locks:
            wait_until(
                lambda lock=lock: (
                    f"lease resumed after restart: lock={lock}"
                    in log_since(workstation, log_offset)
                )
            )
        # Let both deploys outlive the leases that the first daemon left behind.
        wait_until(lambda: machine_clock() > expiry_at_stop + 1.0, timeout=30)
        for watch in watches:
            watch.stop()

        for watch in watches:
            assert watch.readings > 0, watch.lock
            assert watch.problems == [], watch.lock

        for holder in holders:
            holder.kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: all(lock_row(workstation.store_file, lock)["holder"] is None for lock in locks),
            timeout=10,
        )
        assert time.monotonic() - killed_at < 1.0
        for lock, lease in leases.items():
            records = deployments(workstation.store_file, lease["session_id"])
            assert [record["outcome"] for record in records] == ["abandoned"], lock
            assert records[0]["token"] == lease["token"], lock
    finally:
        for watch in watches:
            watch.stop()
        for holder in holders:
            holder.kill()
