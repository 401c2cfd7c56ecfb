"""Behaviour of the SQLite store that the shared contract does not cover.

These tests use real files in a temporary directory, other connections that
hold SQLite's write lock, damaged files and two store objects on one file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import pytest
from conftest_store import TTL, FakeClock, expect_grant, make_request, owner_of, session_id

import deployd.stores.sqlite as sqlite_module
from deployd.clock import ClockReading
from deployd.config import Config, StoreConfig
from deployd.errors import StoreBusy, StoreUnavailable
from deployd.models import Acquired, Outcome, Purpose
from deployd.stores.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

ANA = session_id("ana")

StoreFactory = Callable[..., SQLiteStore]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "locks.sqlite3")


@pytest.fixture
async def make_store(db_path: str, clock: FakeClock) -> AsyncIterator[StoreFactory]:
    """Yield a function that builds stores on ``db_path``; every store is closed at teardown."""
    stores: list[SQLiteStore] = []

    def build(path: str = db_path, **options: Any) -> SQLiteStore:
        options.setdefault("clock", clock)
        options.setdefault("wall", clock.wall)
        store = SQLiteStore(path, **options)
        stores.append(store)
        return store

    yield build

    for store in stores:
        await store.aclose()


@pytest.fixture
async def store(make_store: StoreFactory) -> SQLiteStore:
    store = make_store()
    await store.open()
    return store


class WriteLockHolder:
    """A second connection, in its own thread, that holds the database's write lock.

    Entering the context returns once ``BEGIN IMMEDIATE`` succeeded. The lock
    is held until ``release()`` or the end of the context.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: BaseException | None = None
        self._locked = threading.Event()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="write-lock-holder")

    def _hold(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self.error = exc
            connection.close()
            self._locked.set()
            return

        self._locked.set()
        self._released.wait()
        connection.execute("COMMIT")
        connection.close()

    def release(self) -> None:
        """Commit the open transaction, so that other writers may proceed."""
        self._released.set()

    async def __aenter__(self) -> WriteLockHolder:
        self._thread.start()
        await anyio.to_thread.run_sync(self._locked.wait)
        if self.error is not None:
            raise self.error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
        await anyio.to_thread.run_sync(self._thread.join)


class PausingClock:
    """A clock that, once armed, blocks its next reading until ``resume()``.

    A store reads its clock inside the transaction, so a paused reading keeps
    that transaction open for as long as the test needs.
    """

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self._armed = False
        self.paused = threading.Event()
        self._resumed = threading.Event()

    def __call__(self) -> ClockReading:
        if self._armed:
            self._armed = False
            self.paused.set()
            self._resumed.wait()
        return self._clock()

    def arm(self) -> None:
        """Make the next reading block."""
        self._armed = True

    def resume(self) -> None:
        """Let the blocked reading return."""
        self._resumed.set()


class EventHandler(logging.Handler):
    """A logging handler that keeps records at or above ``level`` and sets an event on the first."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.event.set()


# --- files and modes ---


async def test_open_creates_private_directories_and_file(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    path = tmp_path / "state" / "deployd" / "locks.sqlite3"

    await make_store(str(path)).open()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700


async def test_open_leaves_existing_directory_mode(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o755)

    await make_store(str(directory / "locks.sqlite3")).open()

    assert stat.S_IMODE(directory.stat().st_mode) == 0o755


async def test_wal_mode_is_on(store: SQLiteStore, db_path: str) -> None:
    connection = sqlite3.connect(db_path)
    try:
        journal_mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        connection.close()

    assert journal_mode == "wal"


async def test_schema_version_is_recorded(store: SQLiteStore, db_path: str) -> None:
    connection = sqlite3.connect(db_path)
    try:
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    finally:
        connection.close()

    assert row == (str(sqlite_module.SCHEMA_VERSION),)


async def test_newer_schema_version_is_rejected(
    store: SQLiteStore, db_path: str, make_store: StoreFactory
) -> None:
    await store.aclose()
    connection = sqlite3.connect(db_path)
    with connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    connection.close()

    with pytest.raises(StoreUnavailable) as caught:
        await make_store().open()

    assert db_path in str(caught.value)
    assert "schema version 99" in str(caught.value)


async def test_from_config_uses_state_dir(tmp_path: Path) -> None:
    config = Config(store=StoreConfig(busy_timeout=7.0), state_dir=str(tmp_path))

    store = SQLiteStore.from_config(config)

    assert store.path == str(tmp_path / "locks.sqlite3")
    assert store.busy_timeout == 7.0


async def test_from_config_uses_store_path(tmp_path: Path) -> None:
    path = str(tmp_path / "elsewhere.sqlite3")
    config = Config(store=StoreConfig(path=path), state_dir=str(tmp_path / "state"))

    assert SQLiteStore.from_config(config).path == path


# --- damaged and unusable files ---


async def test_non_database_file_is_unavailable(db_path: str, make_store: StoreFactory) -> None:
    Path(db_path).write_bytes(b"this is a deploy log, not a database\n" * 200)

    with pytest.raises(StoreUnavailable) as caught:
        await make_store().open()

    assert db_path in str(caught.value)
    assert "move it aside" in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


async def test_corrupt_database_is_unavailable(
    store: SQLiteStore, db_path: str, make_store: StoreFactory
) -> None:
    await expect_grant(store, ANA)
    await store.aclose()
    with open(db_path, "r+b") as handle:
        # Keep the 100-byte header and overwrite the schema table that follows it.
        handle.seek(100)
        handle.write(b"\xff" * 3000)

    with pytest.raises(StoreUnavailable) as caught:
        reopened = make_store()
        await reopened.open()
        await reopened.inspect("api")

    assert db_path in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


async def test_directory_path_is_unavailable(db_path: str, make_store: StoreFactory) -> None:
    os.mkdir(db_path)

    with pytest.raises(StoreUnavailable) as caught:
        await make_store().open()

    assert db_path in str(caught.value)


async def test_closed_store_is_unavailable(store: SQLiteStore) -> None:
    await store.aclose()

    with pytest.raises(StoreUnavailable) as caught:
        await store.inspect("api")

    assert "not open" in str(caught.value)


# --- other writers ---


async def test_write_waits_for_other_writer(
    store: SQLiteStore, db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_BUSY_SLICE", 0.05)
    monkeypatch.setattr(sqlite_module, "_BUSY_WARNING_INTERVAL", 0.0)
    warnings = EventHandler(logging.WARNING)
    logging.getLogger("deployd.store.sqlite").addHandler(warnings)
    results: list[object] = []

    async def acquire() -> None:
        results.append(await store.try_acquire(make_request(ANA)))

    try:
        with anyio.fail_after(30):
            async with WriteLockHolder(db_path) as holder, anyio.create_task_group() as tasks:
                tasks.start_soon(acquire)
                # The warning proves that the grant found the database locked and waits.
                await warnings.event.wait()
                assert results == []
                holder.release()
    finally:
        logging.getLogger("deployd.store.sqlite").removeHandler(warnings)

    [result] = results
    assert isinstance(result, Acquired)
    assert result.lease.token == 1
    assert db_path in warnings.records[0].getMessage()
    assert "try_acquire of lock 'api'" in warnings.records[0].getMessage()


async def test_busy_timeout_raises_store_busy(db_path: str, make_store: StoreFactory) -> None:
    store = make_store(busy_timeout=0.2)
    await store.open()

    async with WriteLockHolder(db_path):
        with pytest.raises(StoreBusy) as caught:
            await store.try_acquire(make_request(ANA))

    assert not isinstance(caught.value, StoreUnavailable)
    assert db_path in str(caught.value)
    assert "store.busy_timeout" in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    await expect_grant(store, ANA)


_LOCKING_SCRIPT = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
connection.execute("COMMIT")
connection.close()
"""


async def test_other_process_lock_raises_store_busy(db_path: str, make_store: StoreFactory) -> None:
    store = make_store(busy_timeout=0.2)
    await store.open()

    with subprocess.Popen(
        [sys.executable, "-c", _LOCKING_SCRIPT, db_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            assert await anyio.to_thread.run_sync(process.stdout.readline) == "locked\n"
            with pytest.raises(StoreBusy):
                await store.try_acquire(make_request(ANA))
        finally:
            process.stdin.close()
            await anyio.to_thread.run_sync(process.wait)

    assert process.returncode == 0
    await expect_grant(store, ANA)


async def test_reads_do_not_wait_for_writer(db_path: str, make_store: StoreFactory) -> None:
    store = make_store(busy_timeout=0.2)
    await store.open()
    await expect_grant(store, ANA)

    async with WriteLockHolder(db_path):
        state = await store.inspect("api")
        history = await store.history()

    assert state.lease is not None
    assert state.lease.holder == ANA
    assert len(history) == 1


# --- two daemons on one file ---


async def test_grant_keeps_write_lock_while_deciding(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    pausing_clock = PausingClock(clock)
    # In a worker thread, so that the pause inside the transaction leaves the event loop free.
    first = make_store(clock=pausing_clock, inline_first=False)
    second = make_store(busy_timeout=0.2)
    await first.open()
    await second.open()
    results: list[object] = []

    async def acquire_first() -> None:
        results.append(await first.try_acquire(make_request(ANA)))

    pausing_clock.arm()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(acquire_first)
            # Resumed in finally, because the task group waits for the paused worker thread.
            try:
                await anyio.to_thread.run_sync(pausing_clock.paused.wait)
                # The first store is now inside its grant transaction, before it decided.
                with pytest.raises(StoreBusy):
                    await second.try_acquire(make_request(session_id("ben")))
            finally:
                pausing_clock.resume()

    [result] = results
    assert isinstance(result, Acquired)
    assert result.lease.token == 1


async def test_racing_stores_grant_once_per_round(make_store: StoreFactory) -> None:
    # Each store object has its own connection, as four daemons on one machine would.
    stores = [make_store() for _ in range(4)]
    for store in stores:
        await store.open()
    rounds = 25
    contenders_per_store = 4
    winners: list[Acquired] = []

    async def attempt(store: SQLiteStore, holder: str, results: list[object]) -> None:
        results.append(await store.try_acquire(make_request(holder)))

    for round_number in range(rounds):
        results: list[object] = []
        async with anyio.create_task_group() as tasks:
            for index in range(contenders_per_store):
                for number, store in enumerate(stores):
                    holder = session_id(f"daemon{number}-round{round_number}-{index}")
                    tasks.start_soon(attempt, store, holder, results)

        granted = [result for result in results if isinstance(result, Acquired)]
        assert len(results) == len(stores) * contenders_per_store
        assert len(granted) == 1, f"round {round_number} granted {len(granted)} times"
        winners.append(granted[0])
        await stores[round_number % len(stores)].release(
            granted[0].lease, Outcome.from_exit_code(0)
        )

    tokens = [winner.lease.token for winner in winners]
    assert tokens == list(range(1, rounds + 1))
    assert len(await stores[0].history(limit=100)) == rounds


async def test_second_store_sees_first_stores_lease(make_store: StoreFactory) -> None:
    first = make_store()
    second = make_store()
    await first.open()
    await second.open()

    lease = await expect_grant(first, ANA)
    renewed = await second.renew(lease)
    state = await first.inspect("api")

    assert state.lease is not None
    assert state.lease.version == renewed.version


# --- waiter cleanup ---


async def test_expired_waiter_rows_are_deleted(
    store: SQLiteStore, db_path: str, clock: FakeClock
) -> None:
    await store.enqueue("api", "ben-wait", owner_of(session_id("ben")), Purpose(), 5.0)
    clock.advance(6)

    await store.enqueue("api", "cara-wait", owner_of(session_id("cara")), Purpose(), TTL)

    connection = sqlite3.connect(db_path)
    try:
        rows = connection.execute("SELECT waiter_id FROM waiters ORDER BY seq").fetchall()
    finally:
        connection.close()
    assert rows == [("cara-wait",)]


async def test_release_and_acquire_is_one_transaction(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant that fails undoes the release made in the same call."""
    lease = await expect_grant(store, ANA)

    def fail_grant(db: sqlite3.Connection, request: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_try_acquire_in", fail_grant)
    with pytest.raises(StoreUnavailable):
        await store.release_and_acquire(
            lease, Outcome.from_exit_code(0), make_request(session_id("ben"))
        )

    state = await store.inspect("api")
    assert state.lease is not None
    assert state.lease.holder == ANA
    [record] = await store.history("api")
    assert record.finished_at is None
