"""A daemon that comes back after a kept lease expired ends that lease and completes its record.

While no daemon ran, nothing renewed the lease, so a ``deployd run`` holder
gave it up as lost (exit 76). The restarted daemon releases the
expired lease at once and records the deploy as ``lost``, instead of leaving
a ``running`` record until the next grant of the lock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness import DaemonProcess, ShellHolder, Workstation, wait_until
from test_daemon_restart import deployments, kept_lease_ids, lock_row, machine_clock


def test_restart_after_expiry_records_lost(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    workstation = make_workstation(lease={"ttl": "2s"})
    first = start(workstation)
    holder = ShellHolder(workstation, tmp_path / "holder", "api")
    try:
        lease = holder.lease()
        assert first.stop() == 0
        assert kept_lease_ids(workstation) == [lease["session_id"]]
        expires_at = lock_row(workstation.store_file, "api")["expires_at"]
        wait_until(lambda: machine_clock() > expires_at + 0.5, timeout=30)

        start(workstation)

        row = lock_row(workstation.store_file, "api")
        records = deployments(workstation.store_file, lease["session_id"])
        assert row["holder"] is None
        assert [record["outcome"] for record in records] == ["lost"]
        assert "expired while no daemon renewed it" in records[0]["detail"]
        assert kept_lease_ids(workstation) == []
    finally:
        holder.kill()


def test_restart_after_run_gave_up_records_lost(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
) -> None:
    """A run client that gave its lease up at the renew deadline is recorded as lost, not abandoned.

    With a 9 s TTL the renew deadline is 6 s: the client exits 76 at most
    6 s after the daemon stopped, and the lease stays valid until 9 s.
    """
    workstation = make_workstation(lease={"ttl": "9s"})
    first = start(workstation)
    client = workstation.spawn("run", "api", "--", "sleep", "60")
    try:
        wait_until(lambda: workstation.local_queue("api") == [] and held_session(workstation))
        session_id = held_session(workstation)
        assert first.stop() == 0
        assert client.wait(timeout=30) == 76
        start(workstation)

        records = deployments(workstation.store_file, session_id)
        assert [record["outcome"] for record in records] == ["lost"]
        assert lock_row(workstation.store_file, "api")["holder"] is None
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=30)


def held_session(workstation: Workstation) -> str:
    """Return the session id of the lease on ``api``, or an empty string when it is free."""
    for entry in workstation.status()["locks"]:
        if entry["lock"] == "api" and entry.get("lease"):
            session_id: str = entry["lease"]["session_id"]
            return session_id
    return ""
