"""Workstations whose daemons share a Firestore emulator, and what the tests need around them.

``make_firestore_workstation`` builds workstations whose daemons use the
Firestore store in the test's namespace. ``StoreReader`` reads the lock,
queue and deployment documents directly with the library's synchronous
client, as a third workstation would, so the tests check what the store
holds, not what a daemon reports. ``private_emulator`` starts an emulator
that a test may stop and start again without disturbing the session's.

The commands that the tests run under a lock are small Python scripts that
append JSON lines to a ledger with one write() each (see test_exclusion.py),
stamped on CLOCK_MONOTONIC and on the wall clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
from firestore_emulator import FirestoreEmulator, FirestoreNamespace
from harness import Workstation, iter_ledger, terminate, wait_until

if TYPE_CHECKING:
    from deployd.models import Deployment
    from deployd.stores.firestore_documents import LockDocument, QueueDocument

# The store settings of every test daemon. A short poll interval makes a lock
# pass between daemons faster than the default 500 ms. A short store timeout
# keeps the fault tests short, and is still far above the emulator's latency.
STORE_TIMEOUT = 2.0
POLL_INTERVAL = "100ms"

# A deploy command: appends an enter record, waits until the named pipe argv[2]
# is opened for writing (a harness.Gate), or when argv[2] is "-" goes on at
# once, then appends a leave record. SIGTERM or SIGINT ends the wait with a
# leave record that names the signal. Each record holds the lock, the fencing
# token, the lease id, the pid and both clocks.
GATED_RECORDER = """
import json, os, signal, sys, time
ledger = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def record(event, signum=None):
    line = json.dumps({
        "event": event,
        "signal": signum,
        "lock": os.environ["DEPLOYD_LOCK"],
        "token": int(os.environ["DEPLOYD_FENCING_TOKEN"]),
        "lease_id": os.environ["DEPLOYD_LEASE_ID"],
        "pid": os.getpid(),
        "t": time.monotonic_ns(),
        "wall": time.time(),
    })
    os.write(ledger, (line + "\\n").encode())
def stop(signum, frame):
    record("leave", signum)
    os._exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
record("enter")
if sys.argv[2] != "-":
    with open(sys.argv[2]) as gate:
        gate.read()
record("leave")
"""


def recorder_command(ledger: Path, gate: Path | None = None) -> list[str]:
    """Return the command that records its stay under the lock in ``ledger``."""
    return [sys.executable, "-I", "-S", "-c", GATED_RECORDER, str(ledger), str(gate or "-")]


def ledger_records(ledger: Path, event: str | None = None) -> list[dict[str, Any]]:
    """Return the ledger's records, or only those of ``event``, and none before the file exists."""
    if not ledger.exists():
        return []
    return [record for record in iter_ledger(ledger) if event is None or record["event"] == event]


def wait_for_entry(ledger: Path, lease_count: int = 1, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until ``lease_count`` commands have entered, and return the last enter record."""
    records = wait_until(lambda: ledger_records(ledger, "enter")[lease_count - 1 :], timeout)
    record: dict[str, Any] = records[0]
    return record


def stays_by_lease(ledger: Path) -> dict[str, tuple[int, int]]:
    """Return each command's enter and leave times (CLOCK_MONOTONIC ns), by lease id.

    Unlike test_exclusion.ledger_intervals, this distinguishes commands with
    the same fencing token, such as deploys that ran without the lock (token 0).
    """
    entered: dict[str, int] = {}
    stays: dict[str, tuple[int, int]] = {}
    for record in ledger_records(ledger):
        if record["event"] == "enter":
            entered[record["lease_id"]] = record["t"]
        else:
            stays[record["lease_id"]] = (entered.pop(record["lease_id"]), record["t"])
    assert entered == {}, f"commands that entered and never left: {sorted(entered)}"
    return stays


def session_of(lease_id: str) -> str:
    """Return the session id in a lease id, which may end in ``+`` and the holder's key."""
    return lease_id.split("+", 1)[0]


class RunClient:
    """A ``deployd run`` started in the background, with its stderr in a file."""

    def __init__(
        self,
        workstation: Workstation,
        stderr_file: Path,
        lock: str,
        *options: str,
        command: list[str],
    ) -> None:
        self.stderr_file = stderr_file
        with open(stderr_file, "wb") as stderr:
            self.process = workstation.spawn(
                "run", lock, *options, "--", *command, stdout=subprocess.DEVNULL, stderr=stderr
            )

    def stderr(self) -> str:
        """Return what the client has written to stderr so far."""
        return self.stderr_file.read_text(errors="replace")

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the client to exit and return its exit code."""
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Stop the client by its pid if it still runs, which passes SIGTERM on to its command."""
        terminate(self.process)


@dataclass(frozen=True)
class LockReading:
    """A lock document as read, with the snapshot's read time and the document's update time.

    Times are in seconds since the epoch. ``updated_at`` is None when the
    document does not exist.
    """

    document: LockDocument
    read_at: float
    updated_at: float | None


class StoreReader:
    """Read one namespace's documents with the synchronous client, as an outside observer."""

    def __init__(self, host: str, project: str, namespace: str) -> None:
        # Imported here, so that test sessions without Firestore tests never load the library.
        from google.cloud.firestore import Client

        from deployd.stores.firestore_documents import ROOT_COLLECTION, UnixServerClock

        # The library reads FIRESTORE_EMULATOR_HOST only while it creates the client.
        with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": host}):
            self._client = Client(project=project)
        self._root = self._client.collection(ROOT_COLLECTION).document(namespace)
        self._clock = UnixServerClock()

    def _snapshot(self, collection: str, name: str) -> Any:
        from deployd.stores.firestore_documents import document_id

        return self._root.collection(collection).document(document_id(name)).get(timeout=10)

    def lock(self, name: str) -> LockDocument:
        """Return the lock document of ``name``, whose lease's expiry is judged by server time."""
        from deployd.stores.firestore_documents import parse_lock

        return parse_lock(name, self._snapshot("locks", name), self._clock)

    def lock_read(self, name: str) -> LockReading:
        """Return the lock document of ``name`` with the read and update times of its snapshot."""
        from deployd.stores.firestore_documents import parse_lock

        snapshot = self._snapshot("locks", name)
        updated = snapshot.update_time.timestamp() if snapshot.exists else None
        document = parse_lock(name, snapshot, self._clock)
        return LockReading(document, snapshot.read_time.timestamp(), updated)

    def server_time(self, name: str) -> float:
        """Return the server's time, as the read time of the lock document of ``name``."""
        return self.lock_read(name).read_at

    def queue(self, name: str) -> QueueDocument:
        """Return the queue document of ``name`` with every entry, live or not."""
        from deployd.stores.firestore_documents import parse_queue

        return parse_queue(name, self._snapshot("queues", name), self._clock)

    def waiter_ids(self, name: str) -> list[str]:
        """Return the waiter ids in the queue document of ``name``, in queue order."""
        return [entry.waiter.waiter_id for entry in self.queue(name).entries]

    def deployments(self, name: str) -> list[Deployment]:
        """Return the deployment records of ``name``, oldest grant first."""
        from google.cloud.firestore import FieldFilter

        from deployd.stores.firestore_documents import parse_deployment

        query = self._root.collection("deployments").where(filter=FieldFilter("lock", "==", name))
        records = [parse_deployment(snapshot, self._clock) for snapshot in query.stream(timeout=10)]
        return sorted(records, key=lambda record: (record.started_at, record.token))

    def deployment_of(self, name: str, session_id: str) -> Deployment | None:
        """Return the deployment record of one session on ``name``, if there is one."""
        for record in self.deployments(name):
            if record.session_id == session_id:
                return record
        return None

    def close(self) -> None:
        # NOTE: Client has no public close() in google-cloud-firestore 2.34, so
        # this closes the channel that the client opened.
        self._client._firestore_api.transport.close()


@pytest.fixture
def store_reader(firestore_namespace: FirestoreNamespace) -> Iterator[StoreReader]:
    """Yield a reader of the test's namespace in the session's emulator."""
    reader = StoreReader(
        firestore_namespace.host, firestore_namespace.project, firestore_namespace.namespace
    )
    yield reader
    reader.close()


@pytest.fixture
def make_firestore_workstation(
    make_workstation: Callable[..., Workstation], firestore_namespace: FirestoreNamespace
) -> Callable[..., Workstation]:
    """Return a factory of workstations whose daemons use the test's Firestore namespace.

    ``emulator_host`` points the daemon at another address, such as a proxy
    or a private emulator. A ``store`` table in the settings adds to the
    Firestore settings, and other settings go to the config file as they are.
    ``on_store_error`` is "closed" unless the settings set it. Under
    "open", a store call that took longer than the store timeout on a loaded
    machine would let a waiter deploy without the lock, and the tests that
    check exclusion would report an overlap that the policy allowed.
    """

    def make(emulator_host: str | None = None, **settings: Any) -> Workstation:
        settings.setdefault("on_store_error", "closed")
        store = {
            "kind": "firestore",
            "project": firestore_namespace.project,
            "namespace": firestore_namespace.namespace,
            "timeout": f"{STORE_TIMEOUT:g}s",
            "poll_interval": POLL_INTERVAL,
            **settings.pop("store", {}),
        }
        workstation = make_workstation(store=store, **settings)
        host = emulator_host or firestore_namespace.host
        workstation.environment["FIRESTORE_EMULATOR_HOST"] = host
        return workstation

    return make


@pytest.fixture
def private_emulator(firestore_emulator: FirestoreEmulator) -> Iterator[FirestoreEmulator]:
    """Yield a running emulator of the test's own, on its own port, and stop it at the end.

    It depends on the session's emulator only so that the tests skip, or fail
    in CI, for the same reasons when no emulator is installed.
    """
    emulator = FirestoreEmulator()
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
        emulator.remove_logs()


def log_lines(workstation: Workstation, text: str) -> list[str]:
    """Return the lines of the workstation's daemon log that contain ``text``."""
    if not workstation.log_file.exists():
        return []
    log = workstation.log_file.read_text(errors="replace")
    return [line for line in log.splitlines() if text in line]


def wait_for_log(workstation: Workstation, text: str, timeout: float = 30.0) -> str:
    """Wait until a line of the daemon log contains ``text``, and return the first such line."""
    lines: list[str] = wait_until(lambda: log_lines(workstation, text), timeout, 0.05)
    return lines[0]
