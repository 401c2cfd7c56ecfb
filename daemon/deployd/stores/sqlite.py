"""The SQLite lease store: one file on one machine, shared by the daemons on it.

Every change runs in a ``BEGIN IMMEDIATE`` transaction, so SQLite's write lock
serializes grants across connections and processes. Expiry is judged by the
machine clock (``deployd.clock``), which every daemon on the machine reads
alike. The file must therefore not be shared between machines, for example
over NFS: another machine's clock readings carry another boot id, so its
leases would look expired here.

The ``locks`` table keeps one row per lock forever, so a fencing token never
goes backwards across release, expiry and daemon restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from deployd.clock import ClockReading, MachineClock
from deployd.errors import LeaseLost, StoreBusy, StoreUnavailable
from deployd.models import (
    ALL_LOCKS,
    Acquired,
    Busy,
    Deployment,
    ForceRecord,
    Freeze,
    Lease,
    LeaseRequest,
    LockState,
    Outcome,
    OutcomeStatus,
    Owner,
    Purpose,
    Takeover,
    Waiter,
    applicable_freeze,
)
from deployd.stores.base import LeaseStore

if TYPE_CHECKING:
    from deployd.config import Config

logger = logging.getLogger("deployd.store.sqlite")

T = TypeVar("T")

SCHEMA_VERSION = 1

# Maximum seconds that SQLite's own busy handler waits within one attempt. The
# store retries in slices like this, rather than handing SQLite the whole busy
# limit, so that it can log the wait and a cancelled caller stops waiting.
_BUSY_SLICE = 1.0
# Minimum seconds between two warnings about the same wait for a locked database.
_BUSY_WARNING_INTERVAL = 5.0
# Pause between attempts, for the busy results that SQLite returns without waiting.
_RETRY_PAUSE = 0.01

_WRITE = "BEGIN IMMEDIATE"
_READ = "BEGIN DEFERRED"

# Times: *_at columns hold wall-clock seconds since the epoch, for display and
# history only. expires_at holds seconds on the machine clock of boot boot_id.
# owner and purpose hold JSON objects with the fields of Owner and Purpose.
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS locks (
        name TEXT PRIMARY KEY,
        token INTEGER NOT NULL DEFAULT 0,    -- last fencing token granted
        version INTEGER NOT NULL DEFAULT 0,  -- change counter, Lease.version
        holder TEXT,                         -- NULL when the lock is free
        acquisition_id TEXT,
        owner TEXT,
        purpose TEXT,
        ttl REAL,
        acquired_at REAL,
        renewed_at REAL,
        boot_id TEXT,
        expires_at REAL,
        forced_by TEXT,                      -- the last force: user@host,
        force_reason TEXT,                   -- why,
        forced_at REAL,                      -- when,
        forced_token INTEGER                 -- and the token it handed out
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS freezes (
        scope TEXT PRIMARY KEY,                -- a lock name, or * for every lock
        reason TEXT NOT NULL,
        frozen_by TEXT NOT NULL,
        frozen_at REAL NOT NULL,
        until REAL                             -- NULL: until unfrozen
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS waiters (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order, never reused
        lock TEXT NOT NULL,
        waiter_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        boot_id TEXT NOT NULL,
        expires_at REAL NOT NULL,
        UNIQUE (lock, waiter_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS deployments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- grant order
        session_id TEXT NOT NULL,
        lock TEXT NOT NULL,
        token INTEGER,                         -- NULL for a deploy without a grant
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        started_at REAL NOT NULL,
        waited REAL NOT NULL,
        finished_at REAL,
        outcome TEXT,
        exit_code INTEGER,
        revision TEXT,
        degraded INTEGER NOT NULL DEFAULT 0,
        takeover TEXT,
        detail TEXT,
        UNIQUE (lock, token)
    )
    """,
)

# Columns added to version 1 files after their first release, as (table, column, type).
_ADDED_COLUMNS = (
    ("locks", "forced_by", "TEXT"),
    ("locks", "force_reason", "TEXT"),
    ("locks", "forced_at", "REAL"),
    ("locks", "forced_token", "INTEGER"),
)

# Fixes for SQLite's primary result codes, keyed by code.
_ERROR_HINTS: dict[int | None, str] = {
    sqlite3.SQLITE_CORRUPT: (
        "the file is damaged or is not a deployd database; move it aside, and deployd "
        "creates a new one (fencing tokens then start again at 1), or set store.path"
    ),
    sqlite3.SQLITE_READONLY: "check that the file and its directory are writable by this user",
    sqlite3.SQLITE_PERM: "check that the file and its directory are writable by this user",
    sqlite3.SQLITE_CANTOPEN: "check that the directory exists and is writable by this user",
    sqlite3.SQLITE_FULL: "free disk space on the file system that holds it",
    sqlite3.SQLITE_IOERR: "check the disk and the file system that hold it (see the system log)",
}
_ERROR_HINTS[sqlite3.SQLITE_NOTADB] = _ERROR_HINTS[sqlite3.SQLITE_CORRUPT]
_DEFAULT_HINT = "check the file, or set store.path to another file"


class _DatabaseLocked(Exception):
    """An attempt found the database locked by another connection; the cause is chained."""


class SQLiteStore(LeaseStore):
    """The lease store in one SQLite file, for the daemons of one machine.

    ``clock`` judges expiry and defaults to the machine clock; ``wall`` gives
    the display times (``acquired_at``, ``started_at`` and the like).
    ``busy_timeout`` is how long, in seconds, an operation waits in all for
    other writers before it raises StoreBusy. ``inline_first`` lets an
    operation try once on the event loop before it moves to a worker thread.
    """

    kind = "sqlite"
    atomic_handoff = True

    def __init__(
        self,
        path: str,
        busy_timeout: float = 60.0,
        clock: Callable[[], ClockReading] | None = None,
        wall: Callable[[], float] = time.time,
        inline_first: bool = True,
    ) -> None:
        self.path = path
        self._inline_first = inline_first
        self.busy_timeout = busy_timeout
        self._clock: Callable[[], ClockReading] = clock if clock is not None else MachineClock()
        self._wall = wall
        self._connection: sqlite3.Connection | None = None
        # The one connection is used by one worker thread at a time.
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    def from_config(cls, config: Config) -> SQLiteStore:
        """Build the store that ``config.store`` describes."""
        return cls(
            config.store.sqlite_path(config.state_dir),
            busy_timeout=config.store.busy_timeout,
            wall=config.wall_clock(),
        )

    # --- lifecycle ---

    async def open(self) -> None:
        if self._connection is not None:
            return

        await anyio.to_thread.run_sync(self._connect, limiter=self._limiter)
        try:
            await self._run(self._configure_connection, None, "open")
            await self._run(self._create_schema, _WRITE, "open")
        except BaseException:
            await self.aclose()
            raise

        logger.info("opened SQLite store %s (schema version %d)", self.path, SCHEMA_VERSION)

    async def aclose(self) -> None:
        connection = self._connection
        if connection is None:
            return

        self._connection = None
        # Shielded so that a cancelled shutdown still closes the file.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(connection.close, limiter=self._limiter)
        logger.debug("closed SQLite store %s", self.path)

    def _connect(self) -> None:
        try:
            _create_private_directories(os.path.dirname(os.path.abspath(self.path)))
            _create_private_file(self.path)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot create the SQLite store {self.path}: {exc.strerror or exc}; check that "
                "its directory is writable by this user, or set store.path to another file"
            ) from exc

        try:
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_SLICE
            )
        except sqlite3.Error as exc:
            raise self._unavailable(exc, "open") from exc
        connection.row_factory = sqlite3.Row
        self._connection = connection

    def _configure_connection(self, db: sqlite3.Connection) -> None:
        journal_mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if journal_mode.lower() != "wal":
            logger.warning(
                "SQLite store %s did not switch to WAL mode and stays in journal mode %s, "
                "so readers wait for writers; WAL needs a local file system",
                self.path,
                journal_mode,
            )
        # NOTE: with synchronous=NORMAL in WAL mode, a power loss can undo the
        # last commits. A grant undone that way hands out its fencing token again.
        db.execute("PRAGMA synchronous = NORMAL")

    def _create_schema(self, db: sqlite3.Connection) -> None:
        for statement in _SCHEMA:
            db.execute(statement)
        _allow_deployments_without_token(db)
        for table, column, column_type in _ADDED_COLUMNS:
            existing = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in existing:
                # Names from the constant above, because DDL takes no bound parameters.
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {column_type}")

        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif row["value"] != str(SCHEMA_VERSION):
            raise StoreUnavailable(
                f"SQLite store {self.path} has schema version {row['value']}, but this deployd "
                f"reads version {SCHEMA_VERSION}; run the deployd release that wrote the file, "
                "or set store.path to another file"
            )

    # --- the LeaseStore operations ---

    async def try_acquire(self, request: LeaseRequest) -> Acquired | Busy:
        return await self._run(
            lambda db: self._try_acquire_in(db, request), _WRITE, "try_acquire", request.lock
        )

    async def renew(self, lease: Lease) -> Lease:
        return await self._run(lambda db: self._renew_in(db, lease), _WRITE, "renew", lease.lock)

    async def release(self, lease: Lease, outcome: Outcome) -> bool:
        return await self._run(
            lambda db: self._release_in(db, lease, outcome), _WRITE, "release", lease.lock
        )

    async def release_and_acquire(
        self, lease: Lease, outcome: Outcome, request: LeaseRequest
    ) -> tuple[bool, Acquired | Busy]:
        def release_and_acquire_in(db: sqlite3.Connection) -> tuple[bool, Acquired | Busy]:
            released = self._release_in(db, lease, outcome)
            return released, self._try_acquire_in(db, request)

        return await self._run(release_and_acquire_in, _WRITE, "release and acquire", lease.lock)

    async def force_unlock(self, lock: str, by: Owner, reason: str) -> LockState:
        return await self._run(
            lambda db: self._force_unlock_in(db, lock, by, reason), _WRITE, "force-unlock", lock
        )

    async def freeze(self, scope: str, reason: str, by: Owner, until: float | None) -> Freeze:
        freeze = Freeze(scope, reason, f"{by.user}@{by.host}", self._wall(), until)

        def freeze_in(db: sqlite3.Connection) -> Freeze:
            db.execute(
                "INSERT OR REPLACE INTO freezes (scope, reason, frozen_by, frozen_at, until) "
                "VALUES (?, ?, ?, ?, ?)",
                (freeze.scope, freeze.reason, freeze.by, freeze.at, freeze.until),
            )
            logger.info("froze %s for %s until %s: %s", scope, freeze.by, until, reason)
            return freeze

        return await self._run(freeze_in, _WRITE, "freeze", scope)

    async def unfreeze(self, scope: str) -> Freeze | None:
        def unfreeze_in(db: sqlite3.Connection) -> Freeze | None:
            existing = [freeze for freeze in _read_freezes(db) if freeze.scope == scope]
            db.execute("DELETE FROM freezes WHERE scope = ?", (scope,))
            if existing:
                logger.info("unfroze %s", scope)
            return existing[0] if existing else None

        return await self._run(unfreeze_in, _WRITE, "unfreeze", scope)

    async def freezes(self) -> list[Freeze]:
        def freezes_in(db: sqlite3.Connection) -> list[Freeze]:
            now = self._wall()
            active = [freeze for freeze in _read_freezes(db) if freeze.active(now)]
            return sorted(active, key=lambda freeze: (freeze.scope != ALL_LOCKS, freeze.scope))

        return await self._run(freezes_in, _READ, "freezes")

    async def record_deployment(self, deployment: Deployment) -> None:
        await self._run(
            lambda db: _record_deployment_in(db, deployment),
            _WRITE,
            "record deployment",
            deployment.lock,
        )

    async def inspect(self, lock: str) -> LockState:
        return await self._run(
            lambda db: _read_state(db, lock, self._clock(), self._wall()), _READ, "inspect", lock
        )

    async def list_locks(self) -> list[LockState]:
        return await self._run(
            lambda db: _read_all_states(db, self._clock(), self._wall()), _READ, "list_locks"
        )

    async def enqueue(
        self, lock: str, waiter_id: str, owner: Owner, purpose: Purpose, ttl: float
    ) -> Waiter:
        def enqueue_in(db: sqlite3.Connection) -> Waiter:
            return self._enqueue_in(db, lock, waiter_id, owner, purpose, ttl)

        return await self._run(enqueue_in, _WRITE, "enqueue", lock)

    async def dequeue(self, lock: str, waiter_id: str) -> None:
        def dequeue_in(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM waiters WHERE lock = ? AND waiter_id = ?", (lock, waiter_id))

        await self._run(dequeue_in, _WRITE, "dequeue", lock)

    async def history(
        self, lock: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[Deployment]:
        # SQLite reads a negative LIMIT as no limit at all.
        if limit <= 0:
            return []

        return await self._run(
            lambda db: _read_history(db, lock, limit, since), _READ, "history", lock
        )

    # --- transactions, run in a worker thread ---

    def _try_acquire_in(self, db: sqlite3.Connection, request: LeaseRequest) -> Acquired | Busy:
        now = self._clock()
        db.execute("INSERT OR IGNORE INTO locks (name) VALUES (?)", (request.lock,))
        _delete_expired_waiters(db, request.lock, now)
        state = _read_state(db, request.lock, now, self._wall())

        current = state.lease
        if current is not None and current.holder == request.holder:
            # A retry of a grant that applied, or a nested acquire by the same deploy.
            return Acquired(current)

        decision = decide_grant(request, state)
        if isinstance(decision, Busy):
            return decision
        return self._grant(db, request, state, decision, now)

    def _grant(
        self,
        db: sqlite3.Connection,
        request: LeaseRequest,
        state: LockState,
        takeover: Takeover,
        now: ClockReading,
    ) -> Acquired:
        wall_now = self._wall()
        previous = state.lease
        if previous is not None:
            _complete_replaced_deployment(db, previous, request, takeover, wall_now)

        version = _read_version(db, request.lock) + 1
        lease = Lease(
            lock=request.lock,
            holder=request.holder,
            acquisition_id=request.acquisition_id,
            token=state.token + 1,
            owner=request.owner,
            purpose=request.purpose,
            ttl=request.ttl,
            acquired_at=wall_now,
            renewed_at=wall_now,
            expires_in=request.ttl,
            version=str(version),
        )
        _write_lease(db, lease, now)
        if takeover is Takeover.FORCED:
            _write_force(
                db,
                request.lock,
                f"{request.owner.user}@{request.owner.host}",
                request.force_reason or "no reason given",
                wall_now,
                lease.token,
            )
        if request.waiter_id is not None:
            db.execute(
                "DELETE FROM waiters WHERE lock = ? AND waiter_id = ?",
                (request.lock, request.waiter_id),
            )
        _insert_deployment(
            db,
            lease,
            request.waited,
            takeover,
            request.unlocked_since,
            freeze_passed_detail(state.frozen, request),
        )

        if previous is None:
            logger.debug("granted lock %s to %s (token %d)", lease.lock, lease.holder, lease.token)
        elif takeover is Takeover.FORCED:
            logger.info(
                "forced lock %s away from %s and granted it to %s (token %d), reason: %s",
                lease.lock,
                previous.holder,
                lease.holder,
                lease.token,
                request.force_reason,
            )
        else:
            logger.info(
                "granted lock %s to %s (token %d) after the lease of %s expired",
                lease.lock,
                lease.holder,
                lease.token,
                previous.holder,
            )
        return Acquired(lease, takeover, previous)

    def _renew_in(self, db: sqlite3.Connection, lease: Lease) -> Lease:
        now = self._clock()
        state = _read_state(db, lease.lock, now, self._wall())
        current = state.lease
        if current is None or not _is_same_lease(current, lease):
            raise LeaseLost(lease.lock, _lost_message(lease, state), current=state)

        renewed = Lease(
            lock=current.lock,
            holder=current.holder,
            acquisition_id=current.acquisition_id,
            token=current.token,
            owner=current.owner,
            purpose=current.purpose,
            ttl=lease.ttl,
            acquired_at=current.acquired_at,
            renewed_at=self._wall(),
            expires_in=lease.ttl,
            version=str(int(current.version) + 1),
        )
        db.execute(
            "UPDATE locks SET version = ?, ttl = ?, renewed_at = ?, boot_id = ?, expires_at = ? "
            "WHERE name = ?",
            (
                int(renewed.version),
                renewed.ttl,
                renewed.renewed_at,
                now.boot_id,
                now.seconds + renewed.ttl,
                renewed.lock,
            ),
        )
        logger.debug("renewed lock %s for %s (token %d)", lease.lock, lease.holder, state.token)
        return renewed

    def _release_in(self, db: sqlite3.Connection, lease: Lease, outcome: Outcome) -> bool:
        state = _read_state(db, lease.lock, self._clock(), self._wall())
        if state.lease is None or not _is_same_lease(state.lease, lease):
            logger.debug(
                "release of lock %s by %s changed nothing: the lease is no longer held",
                lease.lock,
                lease.holder,
            )
            return False

        db.execute(
            "UPDATE locks SET version = version + 1, holder = NULL, acquisition_id = NULL, "
            "owner = NULL, purpose = NULL, ttl = NULL, acquired_at = NULL, renewed_at = NULL, "
            "boot_id = NULL, expires_at = NULL WHERE name = ?",
            (lease.lock,),
        )
        _complete_deployment(db, lease.lock, state.token, outcome, self._wall())
        logger.debug(
            "released lock %s by %s (token %d, %s)",
            lease.lock,
            lease.holder,
            state.token,
            outcome.status.value,
        )
        return True

    def _force_unlock_in(
        self, db: sqlite3.Connection, lock: str, by: Owner, reason: str
    ) -> LockState:
        state = _read_state(db, lock, self._clock(), self._wall())
        previous = state.lease
        if previous is None:
            return state

        wall_now = self._wall()
        forced_by = f"{by.user}@{by.host}"
        token = state.token + 1
        db.execute(
            "UPDATE locks SET token = ?, version = version + 1, holder = NULL, "
            "acquisition_id = NULL, owner = NULL, purpose = NULL, ttl = NULL, "
            "acquired_at = NULL, renewed_at = NULL, boot_id = NULL, expires_at = NULL "
            "WHERE name = ?",
            (token, lock),
        )
        _write_force(db, lock, forced_by, reason, wall_now, token)
        outcome = Outcome(OutcomeStatus.FORCED, detail=f"forced away by {forced_by}: {reason}")
        _complete_deployment(db, lock, previous.token, outcome, wall_now)
        logger.info(
            "force-unlocked lock %s held by %s (token %d) for %s: %s",
            lock,
            previous.holder,
            previous.token,
            forced_by,
            reason,
        )
        return state

    def _enqueue_in(
        self,
        db: sqlite3.Connection,
        lock: str,
        waiter_id: str,
        owner: Owner,
        purpose: Purpose,
        ttl: float,
    ) -> Waiter:
        now = self._clock()
        db.execute("INSERT OR IGNORE INTO locks (name) VALUES (?)", (lock,))
        # An entry that expired goes to the back of the queue when it comes back.
        _delete_expired_waiters(db, lock, now)
        db.execute(
            "INSERT INTO waiters "
            "(lock, waiter_id, owner, purpose, enqueued_at, boot_id, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (lock, waiter_id) DO UPDATE SET owner = excluded.owner, "
            "purpose = excluded.purpose, boot_id = excluded.boot_id, "
            "expires_at = excluded.expires_at",
            (
                lock,
                waiter_id,
                _to_json(owner),
                _to_json(purpose),
                self._wall(),
                now.boot_id,
                now.seconds + ttl,
            ),
        )
        row = db.execute(
            "SELECT * FROM waiters WHERE lock = ? AND waiter_id = ?", (lock, waiter_id)
        ).fetchone()
        return _waiter_from_row(row, now)

    # --- running transactions off the event loop ---

    async def _run(
        self,
        work: Callable[[sqlite3.Connection], T],
        begin: str | None,
        operation: str,
        lock: str | None = None,
    ) -> T:
        """Run ``work``, in a transaction opened by ``begin`` if given.

        The first attempt runs on the event loop without waiting for locks;
        when the database is locked, attempts move to a worker thread and
        are retried until ``busy_timeout`` has passed since this call began,
        then StoreBusy is raised. A cancelled caller stops waiting within one
        busy slice.
        """
        if self._inline_first and self._limiter.borrowed_tokens == 0:
            # Fast path: with nobody waiting on the lock file, a transaction
            # is a fraction of a millisecond of CPU, less than the hand-off to
            # a worker thread. busy_timeout 0 makes it fail at once instead of
            # blocking the event loop when another writer holds the file.
            # NOTE: a commit that triggers a WAL checkpoint (every 1000 pages)
            # still writes the database file on the event loop.
            try:
                return self._attempt(work, begin, 0.0, operation)
            except _DatabaseLocked:
                pass

        started = time.monotonic()
        next_warning = started + _BUSY_WARNING_INTERVAL
        while True:
            remaining = self.busy_timeout - (time.monotonic() - started)
            try:
                return await anyio.to_thread.run_sync(
                    self._attempt,
                    work,
                    begin,
                    max(0.0, min(_BUSY_SLICE, remaining)),
                    operation,
                    limiter=self._limiter,
                )
            except _DatabaseLocked as exc:
                now = time.monotonic()
                waited = now - started
                if waited >= self.busy_timeout:
                    raise StoreBusy(self._busy_message(operation, lock, waited)) from exc.__cause__
                if now >= next_warning:
                    logger.warning(
                        "SQLite store %s is locked by another writer: %s has waited %.1fs "
                        "and gives up after %.0fs (store.busy_timeout)",
                        self.path,
                        _describe(operation, lock),
                        waited,
                        self.busy_timeout,
                    )
                    next_warning = now + _BUSY_WARNING_INTERVAL

            await anyio.sleep(_RETRY_PAUSE)

    def _attempt(
        self,
        work: Callable[[sqlite3.Connection], T],
        begin: str | None,
        busy_wait: float,
        operation: str,
    ) -> T:
        db = self._connection
        if db is None:
            raise StoreUnavailable(
                f"SQLite store {self.path} is not open; call open() before {operation}"
            )

        try:
            if db.in_transaction:
                db.execute("ROLLBACK")  # left open by a rollback that failed in an earlier attempt
            # An int that this method computed, because PRAGMA takes no bound parameters.
            db.execute(f"PRAGMA busy_timeout = {int(busy_wait * 1000)}")
            if begin is None:
                return work(db)
            return _in_transaction(db, begin, work)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a bug in this module, not a problem of the file
        except sqlite3.Error as exc:
            if _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _DatabaseLocked() from exc
            raise self._unavailable(exc, operation) from exc

    def _unavailable(self, exc: sqlite3.Error, operation: str) -> StoreUnavailable:
        hint = _ERROR_HINTS.get(_primary_code(exc), _DEFAULT_HINT)
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        return StoreUnavailable(
            f"SQLite store {self.path} failed in {operation}: {exc} ({name}); {hint}"
        )

    def _busy_message(self, operation: str, lock: str | None, waited: float) -> str:
        return (
            f"SQLite store {self.path} stayed locked by another writer for {waited:.1f}s, so "
            f"{_describe(operation, lock)} gave up; find the process that keeps a long "
            "transaction open on the file (an sqlite3 shell, for example), or raise "
            "store.busy_timeout"
        )


def decide_grant(request: LeaseRequest, state: LockState) -> Takeover | Busy:
    """Decide whether ``request`` may take the lock in ``state``.

    Returns how the grant replaces the current lease, or Busy when a freeze, a
    live lease of another holder or a waiter queued ahead blocks the grant.
    """
    lease = state.lease
    if request.force:
        if lease is None:
            return Takeover.FREE
        return Takeover.EXPIRED if lease.expired else Takeover.FORCED

    ahead = queued_ahead(state.waiters, request.waiter_id)
    if state.frozen is not None:
        return Busy(state, queued_ahead=ahead)
    if lease is not None and not lease.expired:
        return Busy(state, queued_ahead=ahead)
    if ahead > 0:
        return Busy(state, queued_ahead=ahead)
    return Takeover.FREE if lease is None else Takeover.EXPIRED


def freeze_passed_detail(frozen: Freeze | None, request: LeaseRequest) -> str | None:
    """Return the record detail of a forced grant that passed ``frozen``, or None."""
    if frozen is None or not request.force:
        return None
    return (
        f"passed the freeze of {frozen.scope} by {frozen.by} ({frozen.reason}): "
        f"{request.force_reason or 'no reason given'}"
    )


def queued_ahead(waiters: tuple[Waiter, ...], waiter_id: str | None) -> int:
    """Return how many live waiters are ahead of ``waiter_id``; all of them if it is not queued."""
    for position, waiter in enumerate(waiters):
        if waiter.waiter_id == waiter_id:
            return position
    return len(waiters)


def _primary_code(exc: sqlite3.Error) -> int | None:
    """Return SQLite's primary result code, or None for errors the sqlite3 module raised itself."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _describe(operation: str, lock: str | None) -> str:
    return f"{operation} of lock {lock!r}" if lock is not None else operation


# --- helpers that run inside a transaction ---


def _in_transaction(
    db: sqlite3.Connection, begin: str, work: Callable[[sqlite3.Connection], T]
) -> T:
    db.execute(begin)
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            # The original error matters more than a failed rollback, and the
            # next attempt rolls back a transaction that is still open.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return result


def _read_state(db: sqlite3.Connection, lock: str, now: ClockReading, wall_now: float) -> LockState:
    frozen = applicable_freeze(_read_freezes(db), lock, wall_now)
    row = db.execute("SELECT * FROM locks WHERE name = ?", (lock,)).fetchone()
    if row is None:
        return LockState(lock, 0, None, frozen=frozen)

    waiters = db.execute(
        "SELECT * FROM waiters WHERE lock = ? AND boot_id = ? AND expires_at > ? ORDER BY seq",
        (lock, now.boot_id, now.seconds),
    ).fetchall()
    state = _state_from_row(row, [_waiter_from_row(waiter, now) for waiter in waiters], now)
    return dataclasses.replace(state, frozen=frozen)


def _read_freezes(db: sqlite3.Connection) -> list[Freeze]:
    rows = db.execute("SELECT * FROM freezes").fetchall()
    return [
        Freeze(
            scope=row["scope"],
            reason=row["reason"],
            by=row["frozen_by"],
            at=row["frozen_at"],
            until=row["until"],
        )
        for row in rows
    ]


def _read_all_states(db: sqlite3.Connection, now: ClockReading, wall_now: float) -> list[LockState]:
    waiters_by_lock: dict[str, list[Waiter]] = {}
    live_waiters = db.execute(
        "SELECT * FROM waiters WHERE boot_id = ? AND expires_at > ? ORDER BY seq",
        (now.boot_id, now.seconds),
    )
    for row in live_waiters:
        waiters_by_lock.setdefault(row["lock"], []).append(_waiter_from_row(row, now))

    freezes = _read_freezes(db)
    rows = db.execute("SELECT * FROM locks ORDER BY name").fetchall()
    return [
        dataclasses.replace(
            _state_from_row(row, waiters_by_lock.get(row["name"], []), now),
            frozen=applicable_freeze(freezes, row["name"], wall_now),
        )
        for row in rows
    ]


def _read_version(db: sqlite3.Connection, lock: str) -> int:
    row = db.execute("SELECT version FROM locks WHERE name = ?", (lock,)).fetchone()
    return int(row["version"])


def _read_history(
    db: sqlite3.Connection, lock: str | None, limit: int, since: float | None
) -> list[Deployment]:
    rows = db.execute(
        "SELECT * FROM deployments WHERE (:lock IS NULL OR lock = :lock) "
        "AND (:since IS NULL OR started_at >= :since) ORDER BY id DESC LIMIT :limit",
        {"lock": lock, "since": since, "limit": limit},
    )
    return [_deployment_from_row(row) for row in rows]


def _delete_expired_waiters(db: sqlite3.Connection, lock: str, now: ClockReading) -> None:
    db.execute(
        "DELETE FROM waiters WHERE lock = ? AND (boot_id != ? OR expires_at <= ?)",
        (lock, now.boot_id, now.seconds),
    )


def _write_lease(db: sqlite3.Connection, lease: Lease, now: ClockReading) -> None:
    db.execute(
        "UPDATE locks SET token = ?, version = ?, holder = ?, acquisition_id = ?, owner = ?, "
        "purpose = ?, ttl = ?, acquired_at = ?, renewed_at = ?, boot_id = ?, expires_at = ? "
        "WHERE name = ?",
        (
            lease.token,
            int(lease.version),
            lease.holder,
            lease.acquisition_id,
            _to_json(lease.owner),
            _to_json(lease.purpose),
            lease.ttl,
            lease.acquired_at,
            lease.renewed_at,
            now.boot_id,
            now.seconds + lease.ttl,
            lease.lock,
        ),
    )


def _insert_deployment(
    db: sqlite3.Connection,
    lease: Lease,
    waited: float,
    takeover: Takeover,
    unlocked_since: float | None = None,
    detail: str | None = None,
) -> None:
    db.execute(
        "INSERT INTO deployments (session_id, lock, token, owner, purpose, started_at, waited, "
        "takeover, degraded, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            lease.holder,
            lease.lock,
            lease.token,
            _to_json(lease.owner),
            _to_json(lease.purpose),
            unlocked_since if unlocked_since is not None else lease.acquired_at,
            waited,
            takeover.value,
            int(unlocked_since is not None),
            detail,
        ),
    )


def _record_deployment_in(db: sqlite3.Connection, record: Deployment) -> None:
    """Insert a record written without a grant, unless its session is recorded already."""
    exists = db.execute(
        "SELECT 1 FROM deployments WHERE session_id = ? AND lock = ?",
        (record.session_id, record.lock),
    ).fetchone()
    if exists:
        return
    # Token 0 (no grant) is stored as NULL, which UNIQUE (lock, token) lets repeat.
    db.execute(
        "INSERT INTO deployments (session_id, lock, token, owner, purpose, started_at, waited, "
        "finished_at, outcome, exit_code, revision, degraded, takeover, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.session_id,
            record.lock,
            record.token or None,
            _to_json(record.owner),
            _to_json(record.purpose),
            record.started_at,
            record.waited,
            record.finished_at,
            record.outcome,
            record.exit_code,
            record.revision,
            int(record.degraded),
            record.takeover,
            record.detail,
        ),
    )


def _allow_deployments_without_token(db: sqlite3.Connection) -> None:
    """Rebuild a deployments table whose token column is NOT NULL, as early files had it.

    Deploys that ran without a lock have no token; their records store NULL.
    """
    columns = {row["name"]: row for row in db.execute("PRAGMA table_info(deployments)")}
    if not columns["token"]["notnull"]:
        return
    create = db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'deployments'"
    ).fetchone()["sql"]
    db.execute("ALTER TABLE deployments RENAME TO deployments_before_migration")
    db.execute(create.replace("token INTEGER NOT NULL", "token INTEGER"))
    db.execute("INSERT INTO deployments SELECT * FROM deployments_before_migration")
    db.execute("DROP TABLE deployments_before_migration")
    logger.info("migrated the deployments table: records without a fencing token are allowed")


def _write_force(
    db: sqlite3.Connection, lock: str, by: str, reason: str, at: float, token: int
) -> None:
    db.execute(
        "UPDATE locks SET forced_by = ?, force_reason = ?, forced_at = ?, forced_token = ? "
        "WHERE name = ?",
        (by, reason, at, token, lock),
    )


def _complete_replaced_deployment(
    db: sqlite3.Connection,
    previous: Lease,
    request: LeaseRequest,
    takeover: Takeover,
    wall_now: float,
) -> None:
    """Record in the replaced lease's deployment record that it expired or was forced away."""
    if takeover is Takeover.FORCED:
        reason = request.force_reason or "no reason given"
        outcome = Outcome(OutcomeStatus.FORCED, detail=f"forced away by {request.holder}: {reason}")
    else:
        outcome = Outcome(
            OutcomeStatus.EXPIRED,
            detail=f"lease expired without release; taken over by {request.holder}",
        )
    _complete_deployment(db, previous.lock, previous.token, outcome, wall_now)


def _complete_deployment(
    db: sqlite3.Connection, lock: str, token: int, outcome: Outcome, wall_now: float
) -> None:
    # An outcome without a detail keeps the grant's detail, such as a passed freeze.
    db.execute(
        "UPDATE deployments SET finished_at = ?, outcome = ?, exit_code = ?, revision = ?, "
        "detail = COALESCE(?, detail) WHERE lock = ? AND token = ? AND finished_at IS NULL",
        (
            wall_now,
            outcome.status.value,
            outcome.exit_code,
            outcome.revision,
            outcome.detail,
            lock,
            token,
        ),
    )


# --- rows and values ---


def _is_same_lease(stored: Lease, lease: Lease) -> bool:
    """Return whether ``stored`` is the same grant as ``lease``, expired or not."""
    return stored.holder == lease.holder and stored.acquisition_id == lease.acquisition_id


def _lost_message(lease: Lease, state: LockState) -> str:
    lost = f"lease of {lease.holder} on lock {lease.lock!r} is lost"
    forced = state.forced
    if forced is not None and forced.token > lease.token:
        lost += f": forced away by {forced.by} ({forced.reason})"
    current = state.lease
    if current is None:
        return f"{lost}: the lock is free now (last fencing token {state.token}); acquire it again"
    return (
        f"{lost}: the lock is held by {current.holder} now (fencing token {current.token}); "
        "stop the deploy, or wait for the lock and start again"
    )


def _expires_in(boot_id: str, expires_at: float, now: ClockReading) -> float:
    # Readings from another boot cannot be compared, and that boot's daemons are gone.
    if boot_id != now.boot_id:
        return 0.0
    return float(expires_at) - now.seconds


def _state_from_row(row: sqlite3.Row, waiters: list[Waiter], now: ClockReading) -> LockState:
    lease = None
    if row["holder"] is not None:
        lease = Lease(
            lock=row["name"],
            holder=row["holder"],
            acquisition_id=row["acquisition_id"],
            token=row["token"],
            owner=_owner_from_json(row["owner"]),
            purpose=_purpose_from_json(row["purpose"]),
            ttl=row["ttl"],
            acquired_at=row["acquired_at"],
            renewed_at=row["renewed_at"],
            expires_in=_expires_in(row["boot_id"], row["expires_at"], now),
            version=str(row["version"]),
        )
    forced = None
    if row["forced_by"] is not None:
        forced = ForceRecord(
            by=row["forced_by"],
            reason=row["force_reason"],
            at=row["forced_at"],
            token=row["forced_token"],
        )
    return LockState(row["name"], row["token"], lease, tuple(waiters), forced)


def _waiter_from_row(row: sqlite3.Row, now: ClockReading) -> Waiter:
    return Waiter(
        lock=row["lock"],
        waiter_id=row["waiter_id"],
        owner=_owner_from_json(row["owner"]),
        purpose=_purpose_from_json(row["purpose"]),
        enqueued_at=row["enqueued_at"],
        expires_in=_expires_in(row["boot_id"], row["expires_at"], now),
    )


def _deployment_from_row(row: sqlite3.Row) -> Deployment:
    return Deployment(
        session_id=row["session_id"],
        lock=row["lock"],
        token=row["token"] or 0,
        owner=_owner_from_json(row["owner"]),
        purpose=_purpose_from_json(row["purpose"]),
        started_at=row["started_at"],
        waited=row["waited"],
        finished_at=row["finished_at"],
        outcome=row["outcome"],
        exit_code=row["exit_code"],
        revision=row["revision"],
        degraded=bool(row["degraded"]),
        takeover=row["takeover"],
        detail=row["detail"],
    )


@functools.lru_cache(maxsize=256)
def _to_json(value: Owner | Purpose) -> str:
    # Cached because every grant stores the same owner and purpose twice, and
    # a client that deploys again sends the same ones. Both are frozen.
    return json.dumps(asdict(value), sort_keys=True)


def _owner_from_json(text: str) -> Owner:
    data: dict[str, Any] = json.loads(text)
    return Owner(
        user=data["user"], host=data["host"], pid=data.get("pid"), daemon_id=data["daemon_id"]
    )


def _purpose_from_json(text: str) -> Purpose:
    data: dict[str, Any] = json.loads(text)
    return Purpose(commit=data.get("commit"), reason=data.get("reason"))


# --- files ---


def _create_private_directories(directory: str) -> None:
    """Create ``directory`` and its missing parents with mode 0700, leaving existing ones alone."""
    missing: list[str] = []
    current = directory
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent

    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # another daemon created it first
        os.chmod(path, 0o700)  # the umask may have cleared bits of the mode


def _create_private_file(path: str) -> None:
    """Create the empty database file with mode 0600 unless it exists."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)
