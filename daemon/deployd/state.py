"""The daemon's local state file: leases kept across a restart.

When the daemon stops while a holder still runs, it writes the lease here
instead of releasing it; the next daemon on the same socket reads it back
and resumes renewing. The file is an SQLite database in the state
directory, private to this workstation's daemon. The Slack notifier keeps
its outbox in the same file, in tables of its own
(``deployd.notifiers.outbox``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from deployd.clock import MachineClock
from deployd.config import LeaseTimings
from deployd.models import Deployment, Lease, Owner, Purpose, Takeover, deployment_from_json
from deployd.processes import ProcessIdentity

logger = logging.getLogger("deployd.state")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kept_leases (
    lease_id TEXT PRIMARY KEY,
    lock TEXT NOT NULL,
    data TEXT NOT NULL,
    kept_at REAL NOT NULL,
    socket TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS owed_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class KeptLease:
    """A lease handed from a stopping daemon to the next one.

    ``confirmed_at`` is on the system-wide monotonic clock of boot
    ``boot_id``; a record from another boot is stale.
    """

    lease: Lease
    timings: LeaseTimings
    binding_kind: str
    processes: tuple[ProcessIdentity, ...]
    confirmed_at: float
    boot_id: str
    waited: float
    takeover: Takeover
    unlocked_since: float | None = None
    unlocked_reason: str | None = None
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return the record for the state file."""
        lease = self.lease
        return {
            "lease": {
                "lock": lease.lock,
                "holder": lease.holder,
                "acquisition_id": lease.acquisition_id,
                "token": lease.token,
                "owner": {
                    "user": lease.owner.user,
                    "host": lease.owner.host,
                    "pid": lease.owner.pid,
                    "daemon_id": lease.owner.daemon_id,
                },
                "purpose": {"commit": lease.purpose.commit, "reason": lease.purpose.reason},
                "ttl": lease.ttl,
                "acquired_at": lease.acquired_at,
                "renewed_at": lease.renewed_at,
                "expires_in": lease.expires_in,
                "version": lease.version,
            },
            "timings": {
                "ttl": self.timings.ttl,
                "renew_every": self.timings.renew_every,
                "renew_deadline": self.timings.renew_deadline,
            },
            "binding_kind": self.binding_kind,
            "processes": [identity.to_json() for identity in self.processes],
            "confirmed_at": self.confirmed_at,
            "boot_id": self.boot_id,
            "waited": self.waited,
            "takeover": str(self.takeover),
            "unlocked_since": self.unlocked_since,
            "unlocked_reason": self.unlocked_reason,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeptLease:
        """Rebuild a record written by ``to_json``."""
        lease = dict(data["lease"])
        lease["owner"] = Owner(**lease["owner"])
        lease["purpose"] = Purpose(**lease["purpose"])
        return cls(
            lease=Lease(**lease),
            timings=LeaseTimings(**data["timings"]),
            binding_kind=data["binding_kind"],
            processes=tuple(ProcessIdentity.from_json(item) for item in data["processes"]),
            confirmed_at=float(data["confirmed_at"]),
            boot_id=data["boot_id"],
            waited=float(data["waited"]),
            takeover=Takeover(data["takeover"]),
            unlocked_since=data.get("unlocked_since"),
            unlocked_reason=data.get("unlocked_reason"),
            key=str(data.get("key") or ""),
        )


class LocalState:
    """The daemon's private SQLite database in the state directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._connection = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        os.chmod(path, 0o600)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.executescript(_SCHEMA)
        columns = {row[1] for row in self._connection.execute("PRAGMA table_info(kept_leases)")}
        if "socket" not in columns:
            self._connection.execute(
                "ALTER TABLE kept_leases ADD COLUMN socket TEXT NOT NULL DEFAULT ''"
            )

    @staticmethod
    def boot_id() -> str:
        """Return the id of this boot, which tags monotonic times in the file."""
        return MachineClock().boot_id

    def save_kept(self, socket: str, kept: list[KeptLease]) -> None:
        """Replace the leases kept for the next daemon on ``socket`` with ``kept``.

        Leases are kept per socket, because daemons on different sockets (a
        shell with another XDG_RUNTIME_DIR, say) may share one state directory.
        """
        now = time.time()
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.execute("DELETE FROM kept_leases WHERE socket = ?", (socket,))
            self._connection.executemany(
                "INSERT OR REPLACE INTO kept_leases (lease_id, lock, data, kept_at, socket) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (item.lease.holder, item.lease.lock, json.dumps(item.to_json()), now, socket)
                    for item in kept
                ],
            )

    def take_kept(self, socket: str) -> list[KeptLease]:
        """Return and delete the leases kept for ``socket``, logging and dropping bad ones."""
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            rows = self._connection.execute(
                "SELECT lease_id, data FROM kept_leases WHERE socket = ?", (socket,)
            ).fetchall()
            self._connection.execute("DELETE FROM kept_leases WHERE socket = ?", (socket,))
        kept = []
        for lease_id, data in rows:
            try:
                kept.append(KeptLease.from_json(json.loads(data)))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("dropping an unreadable kept lease: session=%s: %s", lease_id, exc)
        return kept

    def save_owed(self, records: list[Deployment]) -> None:
        """Replace the deployment records still owed to the store with ``records``."""
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.execute("DELETE FROM owed_records")
            self._connection.executemany(
                "INSERT INTO owed_records (data) VALUES (?)",
                [(json.dumps(record.to_json()),) for record in records],
            )

    def take_owed(self) -> list[Deployment]:
        """Return and delete the owed records; unreadable ones are logged and dropped."""
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            rows = self._connection.execute("SELECT data FROM owed_records ORDER BY id").fetchall()
            self._connection.execute("DELETE FROM owed_records")
        records = []
        for (data,) in rows:
            try:
                records.append(deployment_from_json(json.loads(data)))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("dropping an unreadable owed deployment record: %s", exc)
        return records

    def close(self) -> None:
        """Close the database."""
        self._connection.close()
