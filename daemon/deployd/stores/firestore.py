"""The Firestore lease store: leases shared by the daemons of a team.

The documents and their fields are described in ``firestore_documents``.

Every change is one write with a precondition, or one atomic batch of such
writes, never a read-modify-write transaction. The writes of grants, renewals
and releases are built by ``firestore_writes``. A grant reads the lock, queue
and freeze documents in one call. It then commits one batch, which creates
the lock document or updates it on the precondition of the update time it
was read at, removes the caller's waiter entry and writes the deployment
records. When this store last saw the lock free, the grant commits without
the read, and writes in the same batch that change nothing check that no
other daemon has changed the lock since (``_FreeLock``). The fencing token
grows by a server-side increment, and the precondition makes its result
known in advance. Renewals and releases update the lock document on the
update time that this store last read or wrote.

Expiry is judged by server time only: a lease is expired when the read time
of the snapshot is at least its update time plus the TTL stored in the lease.
No workstation clock decides who holds a lock.

The client library retries commits, so a write can apply while the caller
sees an error such as AlreadyExists, FailedPrecondition or UNAVAILABLE. Each
write therefore carries a random id (the acquisition id of a grant, a renewal
id, a release id), and after any error the store reads the documents again
and decides by that id.

``history(lock=...)`` needs a composite index in production Firestore: on the
``deployments`` collection, ``lock`` ascending and ``started`` descending.
The emulator does not need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import grpc  # type: ignore[import-untyped]
from google.api_core import exceptions as api_exceptions
from google.api_core.retry_async import AsyncRetry
from google.auth.exceptions import DefaultCredentialsError
from google.cloud.firestore import DELETE_FIELD, AsyncClient, FieldFilter, Increment, Query
from google.cloud.firestore_v1.base_client import _DEFAULT_CHANNEL_OPTIONS, _GRPC_MSG_SIZE_OPTIONS

from deployd.errors import ConfigError, LeaseLost, StoreUnavailable
from deployd.models import (
    ALL_LOCKS,
    Acquired,
    Busy,
    Deployment,
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
from deployd.stores.firestore_documents import (
    ROOT_COLLECTION,
    LockDocument,
    LockRead,
    QueueDocument,
    ServerClock,
    UnixServerClock,
    WaiterEntry,
    deployment_id,
    document_id,
    finished_record_fields,
    forced_fields,
    freeze_fields,
    heartbeat_fields,
    lease_fields,
    lock_name_of,
    map_key,
    new_record_fields,
    parse_deployment,
    parse_freeze,
    parse_lock,
    parse_queue,
    recorded_deployment_fields,
    released_fields,
    renewal_fields,
    replaced_record_fields,
    session_record_id,
    version_of,
    waiter_fields,
    waiter_path,
    written_timestamp,
)
from deployd.stores.firestore_writes import (
    absent_write,
    commit_request,
    create_write,
    merge_write,
    update_write,
)
from deployd.stores.sqlite import decide_grant, freeze_passed_detail

if TYPE_CHECKING:
    from google.cloud.firestore_v1.async_batch import AsyncWriteBatch
    from google.cloud.firestore_v1.async_collection import AsyncCollectionReference
    from google.cloud.firestore_v1.async_document import AsyncDocumentReference
    from google.cloud.firestore_v1.async_query import AsyncQuery
    from google.cloud.firestore_v1.base_document import DocumentSnapshot
    from google.cloud.firestore_v1.types import Write, WriteResult

    from deployd.config import Config

logger = logging.getLogger("deployd.store.firestore")

# The project used with the emulator when neither store.project nor
# GOOGLE_CLOUD_PROJECT names one.
EMULATOR_PROJECT = "deployd-local"

# gRPC's pause between attempts to reconnect a channel, in milliseconds. By
# default it grows to 120 s (doc/connection-backoff.md in grpc/grpc), and a
# channel that waits to reconnect fails every call at once, so the store would
# go on failing for up to two minutes after Firestore is reachable again. With
# these, it tries again at least once a second. grpc.min_reconnect_backoff_ms
# is left alone: despite its name, it is the time that one connection attempt
# may take (20 s).
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Backoff in seconds between the library's attempts within one call.
_RETRY_INITIAL = 0.05
_RETRY_MAXIMUM = 1.0
_RETRY_MULTIPLIER = 2.0
# Errors after which an attempt is repeated. The store decides writes by their
# ids afterwards, so repeating a write that had applied is safe.
_RETRYABLE_ERRORS = (
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.ResourceExhausted,
    api_exceptions.Aborted,
)
# Seconds for which a lock's grants read first after another daemon changed the
# lock under a grant without a read. Such a lock is likely to change hands
# again, and each failed commit costs one round trip more than a read.
# NOTE: the hour is a guess, not measured on any team's deploys.
SHARED_LOCK_PAUSE = 3600.0
# The minimum share of the timeout for a call that follows a failed one in the
# same grant, when the failure has used up the grant's time.
_FOLLOW_UP_SHARE = 0.2
# Errors of a write whose precondition failed: another write came first, or an
# earlier attempt of the same write applied.
_CONFLICT_ERRORS = (api_exceptions.FailedPrecondition, api_exceptions.AlreadyExists)


@dataclass(frozen=True, slots=True)
class ServerTimeSample:
    """The store's time in the last reply, and this machine's wall-clock time when it arrived."""

    server: float
    local: float

    @property
    def offset(self) -> float:
        """Return how many seconds the store's clock is ahead of this machine's clock."""
        return self.server - self.local


def resolve_project(configured: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Return the Google Cloud project for the store.

    The order is ``store.project``, then GOOGLE_CLOUD_PROJECT, then
    EMULATOR_PROJECT when FIRESTORE_EMULATOR_HOST is set. Raises ConfigError
    when none applies.
    """
    environ = os.environ if environ is None else environ
    if configured:
        return configured
    if environ.get("GOOGLE_CLOUD_PROJECT"):
        return environ["GOOGLE_CLOUD_PROJECT"]
    if environ.get("FIRESTORE_EMULATOR_HOST"):
        return EMULATOR_PROJECT
    raise ConfigError(
        "store.project",
        configured,
        "the Firestore store needs a Google Cloud project; set store.project or "
        "GOOGLE_CLOUD_PROJECT, or FIRESTORE_EMULATOR_HOST to use the emulator",
    )


class FirestoreStore(LeaseStore):
    """The lease store in Cloud Firestore, for the daemons of a team.

    ``timeout`` bounds each operation in seconds, the library's retries
    included. After a write fails, the read that decides whether it applied
    gets a further ``timeout``, so an operation returns or raises within about
    twice ``timeout``. ``server_clock`` converts the server's timestamps, and
    ``wall`` is read only for ``server_time()``.

    ``rpc_count`` counts the RPC attempts this store has started, the library's
    retries included. An uncontended grant costs two: one read of the lock,
    queue and freeze documents and one commit. It costs one, the commit, when
    this store last saw the lock free, with no waiter and no freeze document.
    The commit's preconditions check that nothing has changed since (see
    ``_FreeLock``). If something has, that grant costs three, and the lock's
    grants read first for SHARED_LOCK_PAUSE seconds.
    """

    kind = "firestore"

    def __init__(
        self,
        project: str,
        database: str = "(default)",
        namespace: str = "default",
        timeout: float = 5.0,
        server_clock: ServerClock | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.project = project
        self.database = database
        self.namespace = namespace
        self.timeout = timeout
        self.rpc_count = 0
        self._clock: ServerClock = server_clock if server_clock is not None else UnixServerClock()
        self._wall = wall
        self._client: AsyncClient | None = None
        # The resource name of the namespace's root document, set while the client is open.
        self._root_name = ""
        self._emulator_host: str | None = None
        self._last_server_time: ServerTimeSample | None = None
        # The lease that each lock document held at the version this object last
        # read or wrote. A renewal or release of exactly that lease may write on
        # that version without reading first.
        self._known_leases: dict[str, _KnownLease] = {}
        # The quiet locks: no queue entry and no freeze document when this object
        # last read or wrote them. Of those, the locks that it released since.
        self._quiet: dict[str, _Quiet] = {}
        self._free_locks: dict[str, _FreeLock] = {}
        # The anyio.current_time() at which each shared lock may again be granted without a read.
        self._shared_until: dict[str, float] = {}
        # The writes of lock, queue and freeze documents that this object has
        # completed. A read that one of them overtook is not remembered.
        self._writes = 0

    @classmethod
    def from_config(cls, config: Config) -> FirestoreStore:
        """Build the store that ``config.store`` describes."""
        settings = config.store
        return cls(
            resolve_project(settings.project),
            database=settings.database,
            namespace=settings.namespace,
            timeout=settings.timeout,
            wall=config.wall_clock(),
        )

    def server_time(self) -> ServerTimeSample | None:
        """Return the store's time at the last reply that carried one, or None before any."""
        return self._last_server_time

    # --- lifecycle ---

    async def open(self) -> None:
        if self._client is not None:
            return

        # The library reads FIRESTORE_EMULATOR_HOST when the client is created.
        self._emulator_host = os.environ.get("FIRESTORE_EMULATOR_HOST") or None
        try:
            with anyio.fail_after(self.timeout):
                # Looking up Application Default Credentials can block on files
                # and on the metadata server, so it runs in a worker thread. The
                # gRPC channel is created at the first call, in the event loop.
                self._client = await anyio.to_thread.run_sync(
                    self._create_client, abandon_on_cancel=True
                )
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"{self._describe_store()}: looking up Application Default Credentials took "
                f"longer than {self.timeout:g}s; check GOOGLE_APPLICATION_CREDENTIALS and "
                "the network"
            ) from exc
        root = self._client.collection(ROOT_COLLECTION).document(self.namespace)
        self._root_name = _document_path(root)

        logger.info("opened %s", self._describe_store())

    async def aclose(self) -> None:
        client = self._client
        if client is None:
            return

        self._client = None
        # Shielded so that a cancelled shutdown still closes the channel.
        with anyio.CancelScope(shield=True):
            await _close_client(client)
        logger.debug("closed %s", self._describe_store())

    def _create_client(self) -> AsyncClient:
        try:
            return _ReconnectingClient(project=self.project, database=self.database)
        except DefaultCredentialsError as exc:
            raise StoreUnavailable(
                f"{self._describe_store()}: no Application Default Credentials found ({exc}); "
                "run 'gcloud auth application-default login', or set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service account key file"
            ) from exc

    # --- grants ---

    async def try_acquire(self, request: LeaseRequest) -> Acquired | Busy:
        deadline = self._deadline()
        # No call of this grant, retries and the reads that decide failed
        # commits included, runs past twice the timeout.
        limit = anyio.current_time() + 2 * self.timeout
        free = self._free_locks.pop(request.lock, None)
        shared_until = self._shared_until.get(request.lock)
        if shared_until is not None:
            if anyio.current_time() < shared_until:
                free = None
            else:
                del self._shared_until[request.lock]
        if free is None:
            read = await self._read_lock(request.lock, deadline, "try_acquire")
        else:
            acquired, read = await self._grant_remembered(request, free, deadline, limit)
            if acquired is not None:
                return acquired
        while True:
            current = read.lock.lease
            if current is not None and current.holder == request.holder:
                # A retry of a grant that applied, or a nested acquire by the same deploy.
                return Acquired(current)

            decision = decide_grant(request, read.state)
            if isinstance(decision, Busy):
                return decision

            replaced = read.lock.lease
            try:
                # A commit after a lost race gets some time even when the
                # race used up the grant's.
                return await self._grant(request, read, decision, self._follow_up(deadline, limit))
            except _RpcFailed as failure:
                read, _ = await self._read_after_failure(
                    failure,
                    "grant",
                    request.lock,
                    request.holder,
                    deadline=min(limit, self._deadline()),
                )
                lease = read.lock.lease
                if lease is not None and _is_same_grant(lease, request):
                    _log_applied_before_error("grant", request.lock, request.holder)
                    return Acquired(lease, decision, replaced)
                if failure.conflict and isinstance(decide_grant(request, read.state), Busy):
                    # A lost race: the loop returns Busy, also after the deadline.
                    continue
                self._raise_unless_retryable(failure, deadline, "try_acquire", request.lock)

    async def _grant_remembered(
        self, request: LeaseRequest, free: _FreeLock, deadline: float, limit: float
    ) -> tuple[Acquired | None, LockRead]:
        """Grant a lock that this store last saw free, on what ``free`` remembers, without a read.

        When another daemon has changed the lock, its queue or a freeze since,
        the commit fails on a precondition. The lock then counts as shared for
        SHARED_LOCK_PAUSE seconds, in which its grants read first, and the
        grant goes on from a read. Returns the grant and ``free``'s read, or
        None and the new read.
        """
        remembered = free.read(request.lock)
        try:
            acquired = await self._grant(request, remembered, Takeover.FREE, deadline, free)
            return acquired, remembered
        except _RpcFailed as failure:
            if failure.conflict:
                self._shared_until[request.lock] = anyio.current_time() + SHARED_LOCK_PAUSE
                logger.debug(
                    "lock %s changed since this daemon last saw it free; its grants read first "
                    "for the next %gs",
                    request.lock,
                    SHARED_LOCK_PAUSE,
                )
                # If an earlier attempt of this commit applied, the read shows it.
                read = await self._read_lock(
                    request.lock, self._follow_up(deadline, limit), "try_acquire"
                )
                return None, read

            # The commit may have applied: decide by its acquisition id, as a
            # grant after a read does. The read gets what is left of the
            # grant's time, and at least a fifth of the timeout, so that an
            # unresponsive store fails this grant in about one timeout, like a
            # grant whose first read fails.
            read, _ = await self._read_after_failure(
                failure,
                "grant",
                request.lock,
                request.holder,
                deadline=self._follow_up(deadline, limit),
            )
            lease = read.lock.lease
            if lease is not None and _is_same_grant(lease, request):
                _log_applied_before_error("grant", request.lock, request.holder)
                return Acquired(lease, Takeover.FREE, None), read
            raise self._unavailable(failure, "try_acquire", request.lock) from failure.error

    async def _grant(
        self,
        request: LeaseRequest,
        read: LockRead,
        takeover: Takeover,
        deadline: float,
        free: _FreeLock | None = None,
    ) -> Acquired:
        """Commit a grant of ``request`` on ``read``.

        With ``free``, ``read`` was not read but remembered, and the commit
        checks that the queue and freeze documents are as ``free`` describes.
        """
        batch = self._require_client("try_acquire").batch()
        token = read.lock.token + 1
        fields = lease_fields(request)
        if takeover is Takeover.FORCED:
            forced_by = f"{request.owner.user}@{request.owner.host}"
            reason = request.force_reason or "no reason given"
            fields.update(forced_fields(forced_by, reason, token, request.acquisition_id))

        lock_path = self._document_name("locks", document_id(request.lock))
        if read.lock.version is None:
            lock_write = create_write(lock_path, {**fields, "token": token})
        else:
            # The precondition guarantees that the stored token is still
            # read.lock.token, so the increment makes it ``token``.
            lock_write = update_write(
                lock_path, {**fields, "token": Increment(1)}, read.lock.version
            )
        _add_writes(batch, lock_write)

        entry = read.queue.entry(request.waiter_id) if request.waiter_id is not None else None
        entries = read.queue.entries
        others_live = any(other.live and other is not entry for other in entries)
        if others_live and entries[0] is entry:
            # The caller heads the queue as read, and live waiters stay, so
            # the lock is not quiet after this grant. Their heartbeats change
            # the queue often, so the caller's entry goes without a precondition.
            removed = [entry]
            on_version = False
        else:
            # The caller's entry goes, and so do expired entries, which would
            # otherwise stay until the next waiter comes. On the version read:
            # a waiter that queued meanwhile, or an expired entry ahead that
            # its waiter refreshed just in time, makes the grant read again.
            removed = [other for other in entries if other is entry or not other.live]
            on_version = True
        if removed:
            removals = {waiter_path(other.key): DELETE_FIELD for other in removed}
            queue_version = read.queue.version
            if not on_version or queue_version is None:
                batch.update(self._queue_reference(request.lock), removals)
            else:
                batch.update(
                    self._queue_reference(request.lock),
                    removals,
                    option=self._precondition(queue_version),
                )
        elif free is not None:
            _add_writes(batch, *self._quiet_checks(request.lock, free.quiet))

        replaced = read.lock.lease
        if replaced is not None:
            # Unlike update(), a merging set succeeds when the record is missing,
            # so a deleted record cannot make every takeover of the lock fail.
            replaced_record = self._deployment_reference(replaced.lock, replaced.token)
            _add_writes(
                batch,
                merge_write(
                    _document_path(replaced_record), replaced_record_fields(request, takeover)
                ),
            )
        record_path = self._document_name("deployments", deployment_id(request.lock, token))
        detail = freeze_passed_detail(read.frozen, request)
        _add_writes(
            batch,
            create_write(record_path, new_record_fields(request, token, takeover, detail)),
        )

        with self._rpc(deadline) as options:
            results = await _commit(batch, options)
        # A write of this object since the read may have changed what it showed.
        current = read.writes_before == self._writes
        lease = self._granted_lease(request, token, results[0])
        if free is None and current:
            written_queue = version_of(results[1].update_time) if removed else None
            self._note_quiet(request.lock, read, written_queue, removed)
        elif free is None:
            self._forget_quiet(request.lock)
        # The lock may have been remembered as free, at the version it had
        # before this grant took it.
        self._free_locks.pop(request.lock, None)
        _log_grant(lease, takeover, replaced, request)
        return Acquired(lease, takeover, replaced)

    def _quiet_checks(self, lock: str, quiet: _Quiet) -> list[Write]:
        """Return writes that change nothing and fail unless the lock is still ``quiet``."""
        queue_path = self._document_name("queues", document_id(lock))
        checks = [
            # Writing the name that the queue document contains leaves it as it
            # is, so its update time stays ``quiet.queue_version``.
            update_write(queue_path, {"name": lock}, quiet.queue_version)
            if quiet.queue_version is not None
            else absent_write(queue_path)
        ]
        for scope in (lock, ALL_LOCKS):
            checks.append(absent_write(self._document_name("freezes", document_id(scope))))
        return checks

    def _note_quiet(
        self,
        lock: str,
        read: LockRead,
        queue_version: str | None = None,
        removed: Sequence[WaiterEntry] = (),
    ) -> None:
        """Remember whether ``lock`` is quiet as ``read`` shows it.

        ``queue_version`` is the queue document's version after a write that
        removed the entries ``removed``.
        """
        entries = [entry for entry in read.queue.entries if entry not in removed]
        if entries or not read.freeze_documents_missing:
            self._forget_quiet(lock)
            return
        quiet = _Quiet(queue_version or read.queue.version)
        self._quiet[lock] = quiet
        if read.lock.lease is None and read.lock.version is not None:
            self._free_locks[lock] = _FreeLock(read.lock.version, read.lock.token, quiet)
        else:
            self._free_locks.pop(lock, None)

    def _wrote(self, lock: str | None = None) -> None:
        """Count a completed write of a queue or freeze, or a forced unlock, and forget its lock.

        Without ``lock`` (a freeze or an unfreeze), forget every lock.
        """
        self._writes += 1
        self._forget_quiet(lock)

    def _forget_quiet(self, lock: str | None = None) -> None:
        """Forget what this object remembers of ``lock``'s queue and freezes, or of every lock's."""
        if lock is None:
            self._quiet.clear()
            self._free_locks.clear()
        else:
            self._quiet.pop(lock, None)
            self._free_locks.pop(lock, None)

    def _granted_lease(self, request: LeaseRequest, token: int, result: WriteResult) -> Lease:
        # Each access of update_time converts the protobuf Timestamp into a datetime again.
        update_time = result.update_time
        self._note_server_time(update_time)
        granted_at = self._clock.seconds(written_timestamp(result))
        lease = Lease(
            lock=request.lock,
            holder=request.holder,
            acquisition_id=request.acquisition_id,
            token=token,
            owner=request.owner,
            purpose=request.purpose,
            ttl=request.ttl,
            acquired_at=granted_at,
            renewed_at=granted_at,
            expires_in=request.ttl,
            version=version_of(update_time),
        )
        self._writes += 1
        self._remember_lease(lease)
        return lease

    # --- renewals ---

    async def renew(self, lease: Lease) -> Lease:
        deadline = self._deadline()
        version = self._known_version(lease)
        while True:
            if version is None:
                read = await self._read_lock(lease.lock, deadline, "renew")
                version = _version_if_held(read, lease)

            renewal_id = secrets.token_hex(8)
            try:
                return await self._write_renewal(lease, version, renewal_id, deadline)
            except _RpcFailed as failure:
                read, _ = await self._read_after_failure(
                    failure, "renewal", lease.lock, lease.holder
                )
                version = _version_if_held(read, lease)
                if read.lock.renewal_id == renewal_id and read.lock.lease is not None:
                    _log_applied_before_error("renewal", lease.lock, lease.holder)
                    return read.lock.lease
                self._raise_unless_retryable(failure, deadline, "renew", lease.lock)

    async def _write_renewal(
        self, lease: Lease, version: str, renewal_id: str, deadline: float
    ) -> Lease:
        batch = self._require_client("renew").batch()
        lock_path = self._document_name("locks", document_id(lease.lock))
        _add_writes(batch, update_write(lock_path, renewal_fields(lease.ttl, renewal_id), version))
        with self._rpc(deadline) as options:
            (result,) = await _commit(batch, options)

        self._note_server_time(result.update_time)
        renewed = dataclasses.replace(
            lease,
            renewed_at=self._clock.seconds(written_timestamp(result)),
            expires_in=lease.ttl,
            version=version_of(result.update_time),
        )
        self._writes += 1
        self._remember_lease(renewed)
        logger.debug("renewed lock %s for %s (token %d)", lease.lock, lease.holder, lease.token)
        return renewed

    # --- releases ---

    async def release(self, lease: Lease, outcome: Outcome) -> bool:
        deadline = self._deadline()
        version = self._known_version(lease)
        while True:
            if version is None:
                read = await self._read_lock(lease.lock, deadline, "release")
                version = _held_version(read, lease)
                if version is None:
                    _log_release_without_change(lease)
                    return False

            release_id = secrets.token_hex(8)
            try:
                await self._write_release(lease, outcome, version, release_id, deadline)
                return True
            except _RpcFailed as failure:
                record = self._deployment_reference(lease.lock, lease.token)
                read, snapshots = await self._read_after_failure(
                    failure, "release", lease.lock, lease.holder, [record]
                )
                if _field_of(snapshots[record.path], "release_id") == release_id:
                    _log_applied_before_error("release", lease.lock, lease.holder)
                    return True

                version = _held_version(read, lease)
                if version is None:
                    _log_release_without_change(lease)
                    return False
                self._raise_unless_retryable(failure, deadline, "release", lease.lock)

    async def _write_release(
        self, lease: Lease, outcome: Outcome, version: str, release_id: str, deadline: float
    ) -> None:
        batch = self._require_client("release").batch()
        lock_path = self._document_name("locks", document_id(lease.lock))
        record_path = self._document_name("deployments", deployment_id(lease.lock, lease.token))
        _add_writes(
            batch,
            update_write(lock_path, released_fields(), version),
            merge_write(record_path, finished_record_fields(outcome, lease.holder, release_id)),
        )

        with self._rpc(deadline) as options:
            results = await _commit(batch, options)
        self._note_server_time(results[0].update_time)
        self._known_leases.pop(lease.lock, None)
        self._writes += 1
        version = version_of(results[0].update_time)
        quiet = self._quiet.get(lease.lock)
        if quiet is not None:
            self._free_locks[lease.lock] = _FreeLock(version, lease.token, quiet)
        logger.debug(
            "released lock %s by %s (token %d, %s)",
            lease.lock,
            lease.holder,
            lease.token,
            outcome.status.value,
        )

    # --- forced unlocks and records of deploys without the lock ---

    async def force_unlock(self, lock: str, by: Owner, reason: str) -> LockState:
        deadline = self._deadline()
        forced_by = f"{by.user}@{by.host}"
        read = await self._read_lock(lock, deadline, "force_unlock")
        while True:
            before = read.state
            previous, version = read.lock.lease, read.lock.version
            if previous is None or version is None:
                return before

            force_id = secrets.token_hex(8)
            try:
                await self._write_force(previous, version, forced_by, reason, force_id, deadline)
                return before
            except _RpcFailed as failure:
                read, _ = await self._read_after_failure(failure, "force-unlock", lock, forced_by)
                if read.lock.force_id == force_id:
                    _log_applied_before_error("force-unlock", lock, forced_by)
                    return before
                self._raise_unless_retryable(failure, deadline, "force_unlock", lock)

    async def _write_force(
        self,
        previous: Lease,
        version: str,
        forced_by: str,
        reason: str,
        force_id: str,
        deadline: float,
    ) -> None:
        # A held lock's token is its lease's, so the force hands out the next one.
        forced = forced_fields(forced_by, reason, previous.token + 1, force_id)
        batch = self._require_client("force_unlock").batch()
        batch.update(
            self._lock_reference(previous.lock),
            {**released_fields(), **forced, "token": Increment(1)},
            option=self._precondition(version),
        )
        outcome = Outcome(OutcomeStatus.FORCED, detail=f"forced away by {forced_by}: {reason}")
        batch.set(
            self._deployment_reference(previous.lock, previous.token),
            finished_record_fields(outcome, forced_by, None),
            merge=True,
        )

        with self._rpc(deadline) as options:
            results = await _commit(batch, options)
        self._note_server_time(results[0].update_time)
        self._known_leases.pop(previous.lock, None)
        self._wrote(previous.lock)
        logger.info(
            "force-unlocked lock %s held by %s (token %d) for %s: %s",
            previous.lock,
            previous.holder,
            previous.token,
            forced_by,
            reason,
        )

    async def record_deployment(self, deployment: Deployment) -> None:
        deadline = self._deadline()
        records = self._collection("deployments")
        same_session = (
            records.where(filter=FieldFilter("lock", "==", deployment.lock))
            .where(filter=FieldFilter("session_id", "==", deployment.session_id))
            .limit(1)
        )
        if await self._query(same_session, deadline, "record_deployment", deployment.lock):
            logger.debug(
                "deployment of %s on lock %s is recorded already",
                deployment.session_id,
                deployment.lock,
            )
            return

        reference = records.document(session_record_id(deployment.lock, deployment.session_id))
        try:
            with self._rpc(deadline) as options:
                result = await reference.create(recorded_deployment_fields(deployment), **options)
        except _RpcFailed as failure:
            if not isinstance(failure.error, api_exceptions.AlreadyExists):
                raise self._unavailable(
                    failure, "record_deployment", deployment.lock
                ) from failure.error
            # An earlier attempt of this call, or another call, created it.
            logger.debug(
                "deployment of %s on lock %s is recorded already",
                deployment.session_id,
                deployment.lock,
            )
            return

        self._note_server_time(result.update_time)
        logger.info(
            "recorded deployment of %s on lock %s, which ran without the lock",
            deployment.session_id,
            deployment.lock,
        )

    # --- reads ---

    async def freeze(self, scope: str, reason: str, by: Owner, until: float | None) -> Freeze:
        freeze = Freeze(scope, reason, f"{by.user}@{by.host}", self._wall(), until)
        deadline = self._deadline()
        try:
            with self._rpc(deadline) as options:
                result = await self._freeze_reference(scope).set(freeze_fields(freeze), **options)
        except _RpcFailed as failure:
            # A set is idempotent, so an ambiguous failure needs no re-read.
            raise self._unavailable(failure, "freeze", scope) from failure.error
        self._wrote()
        self._note_server_time(result.update_time)
        logger.info("froze %s for %s until %s: %s", scope, freeze.by, until, reason)
        return dataclasses.replace(freeze, at=self._clock.seconds(result.update_time))

    async def unfreeze(self, scope: str) -> Freeze | None:
        deadline = self._deadline()
        reference = self._freeze_reference(scope)
        snapshots = await self._get_documents([reference], deadline, "unfreeze", scope)
        existing = parse_freeze(snapshots.get(reference.path), self._clock)
        if existing is None:
            return None
        try:
            with self._rpc(deadline) as options:
                await reference.delete(**options)
        except _RpcFailed as failure:
            raise self._unavailable(failure, "unfreeze", scope) from failure.error
        self._wrote()
        logger.info("unfroze %s", scope)
        return existing

    async def freezes(self) -> list[Freeze]:
        snapshots = await self._query(self._collection("freezes"), self._deadline(), "freezes")
        now = self._server_now(snapshots)
        active = [
            freeze
            for snapshot in snapshots
            if (freeze := parse_freeze(snapshot, self._clock)) is not None and freeze.active(now)
        ]
        return sorted(active, key=lambda freeze: (freeze.scope != ALL_LOCKS, freeze.scope))

    def _server_now(self, snapshots: Sequence[DocumentSnapshot[Any]]) -> float:
        """Return the server time of a read, or this workstation's when it returned nothing."""
        if snapshots:
            return self._clock.seconds(max(snapshot.read_time for snapshot in snapshots))
        return self._wall()

    async def inspect(self, lock: str) -> LockState:
        return (await self._read_lock(lock, self._deadline(), "inspect")).state

    async def list_locks(self) -> list[LockState]:
        deadline = self._deadline()
        lock_snapshots = await self._query(self._collection("locks"), deadline, "list_locks")
        queue_snapshots = await self._query(self._collection("queues"), deadline, "list_locks")
        freeze_snapshots = await self._query(self._collection("freezes"), deadline, "list_locks")
        now = self._server_now([*lock_snapshots, *freeze_snapshots])
        freezes = [
            freeze
            for snapshot in freeze_snapshots
            if (freeze := parse_freeze(snapshot, self._clock)) is not None
        ]

        locks = {lock_name_of(snapshot): snapshot for snapshot in lock_snapshots}
        queues = {lock_name_of(snapshot): snapshot for snapshot in queue_snapshots}
        states = []
        for name in sorted(locks.keys() | queues.keys()):
            read = LockRead(
                parse_lock(name, locks.get(name), self._clock),
                parse_queue(name, queues.get(name), self._clock),
                applicable_freeze(freezes, name, now),
            )
            states.append(read.state)
        return states

    async def history(
        self, lock: str | None = None, limit: int = 50, since: float | None = None
    ) -> list[Deployment]:
        if limit <= 0:
            return []

        query: AsyncQuery | AsyncCollectionReference = self._collection("deployments")
        if lock is not None:
            query = query.where(filter=FieldFilter("lock", "==", lock))
        if since is not None:
            query = query.where(filter=FieldFilter("started", ">=", self._clock.timestamp(since)))
        query = query.order_by("started", direction=Query.DESCENDING).limit(limit)

        snapshots = await self._query(query, self._deadline(), "history", lock)
        return [parse_deployment(snapshot, self._clock) for snapshot in snapshots]

    # --- waiter entries ---

    async def enqueue(
        self, lock: str, waiter_id: str, owner: Owner, purpose: Purpose, ttl: float
    ) -> Waiter:
        deadline = self._deadline()
        while True:
            read = await self._read_lock(lock, deadline, "enqueue")
            try:
                return await self._write_waiter(
                    read, lock, waiter_id, owner, purpose, ttl, deadline
                )
            except _RpcFailed as failure:
                # Writing the entry again is safe: if the failed write applied,
                # the next read shows the entry as live and the write refreshes it.
                _log_write_failure("enqueue", lock, waiter_id, failure)
                self._raise_unless_retryable(failure, deadline, "enqueue", lock)

    async def _write_waiter(
        self,
        read: LockRead,
        lock: str,
        waiter_id: str,
        owner: Owner,
        purpose: Purpose,
        ttl: float,
        deadline: float,
    ) -> Waiter:
        key = map_key(waiter_id)
        entry = read.queue.entry(waiter_id)
        refresh = entry is not None and entry.live
        if refresh:
            updates = heartbeat_fields(key, owner, purpose, ttl)
        else:
            # A new entry, or one that expired, goes to the back of the queue.
            updates = {waiter_path(key): waiter_fields(waiter_id, owner, purpose, ttl)}
        for other in read.queue.entries:
            if not other.live and other.key != key:
                updates[waiter_path(other.key)] = DELETE_FIELD

        reference = self._queue_reference(lock)
        with self._rpc(deadline) as options:
            if read.queue.version is None:
                entries = {key: waiter_fields(waiter_id, owner, purpose, ttl)}
                result = await reference.create({"name": lock, "waiters": entries}, **options)
            else:
                result = await reference.update(
                    updates, option=self._precondition(read.queue.version), **options
                )

        self._wrote(lock)
        self._note_server_time(result.update_time)
        heartbeat = written_timestamp(result)
        enqueued = entry.enqueued if refresh and entry is not None else heartbeat
        age = self._clock.seconds(result.update_time) - self._clock.seconds(heartbeat)
        logger.debug(
            "%s waiter %s of lock %s", "refreshed" if refresh else "queued", waiter_id, lock
        )
        return Waiter(lock, waiter_id, owner, purpose, self._clock.seconds(enqueued), ttl - age)

    async def dequeue(self, lock: str, waiter_id: str) -> None:
        reference = self._queue_reference(lock)
        try:
            with self._rpc(self._deadline()) as options:
                result = await reference.update(
                    {waiter_path(map_key(waiter_id)): DELETE_FIELD}, **options
                )
        except _RpcFailed as failure:
            missing = isinstance(failure.error, api_exceptions.NotFound)
            if missing and "database" not in str(failure.error).lower():
                logger.debug("lock %s has no queue, so waiter %s had no entry", lock, waiter_id)
                return
            raise self._unavailable(failure, "dequeue", lock) from failure.error

        self._wrote(lock)
        self._note_server_time(result.update_time)
        logger.debug("removed waiter %s of lock %s", waiter_id, lock)

    # --- reading documents ---

    async def _read_lock(self, lock: str, deadline: float, operation: str) -> LockRead:
        """Read the lock and queue documents of ``lock`` in one call."""
        read, _ = await self._read_lock_with(lock, (), deadline, operation)
        return read

    async def _read_lock_with(
        self,
        lock: str,
        references: Sequence[AsyncDocumentReference],
        deadline: float,
        operation: str,
    ) -> tuple[LockRead, dict[str, DocumentSnapshot[Any]]]:
        """Read the lock and queue documents of ``lock`` and ``references``, all in one call.

        Returns the lock's read and every snapshot by document path.
        """
        lock_reference = self._lock_reference(lock)
        queue_reference = self._queue_reference(lock)
        freeze_references = [self._freeze_reference(lock), self._freeze_reference(ALL_LOCKS)]
        writes_before = self._writes
        snapshots = await self._get_documents(
            [lock_reference, queue_reference, *freeze_references, *references],
            deadline,
            operation,
            lock,
        )

        lock_snapshot = snapshots[lock_reference.path]
        lock_document = parse_lock(lock, lock_snapshot, self._clock)
        queue_document = parse_queue(lock, snapshots[queue_reference.path], self._clock)
        freezes = [
            freeze
            for reference in freeze_references
            if (freeze := parse_freeze(snapshots.get(reference.path), self._clock)) is not None
        ]
        frozen = applicable_freeze(freezes, lock, self._clock.seconds(lock_snapshot.read_time))
        missing = not any(
            (snapshot := snapshots.get(reference.path)) is not None and snapshot.exists
            for reference in freeze_references
        )
        read = LockRead(
            lock_document,
            queue_document,
            frozen,
            freeze_documents_missing=missing,
            writes_before=writes_before,
        )
        # A read that a write of this object overtook would remember old
        # state. Forgetting is safe on any read.
        if self._writes == writes_before:
            self._remember_lease_of(lock, lock_document.lease)
            self._note_quiet(lock, read)
        elif queue_document.entries or not missing:
            self._forget_quiet(lock)
        return read, snapshots

    async def _read_after_failure(
        self,
        failure: _RpcFailed,
        write: str,
        lock: str,
        holder: str,
        references: Sequence[AsyncDocumentReference] = (),
        deadline: float | None = None,
    ) -> tuple[LockRead, dict[str, DocumentSnapshot[Any]]]:
        """Read the lock again after a failed ``write``, to learn whether the write applied.

        Without ``deadline``, the read gets a whole timeout of its own,
        because the failed write may have used up the whole of the operation's.
        """
        _log_write_failure(write, lock, holder, failure)
        if deadline is None:
            deadline = self._deadline()
        return await self._read_lock_with(lock, references, deadline, write)

    async def _get_documents(
        self,
        references: list[AsyncDocumentReference],
        deadline: float,
        operation: str,
        lock: str,
    ) -> dict[str, DocumentSnapshot[Any]]:
        client = self._require_client(operation)
        try:
            with self._rpc(deadline) as options:
                stream = client.get_all(references, **options)
                async with contextlib.aclosing(stream):
                    snapshots = {snapshot.reference.path: snapshot async for snapshot in stream}
        except _RpcFailed as failure:
            raise self._unavailable(failure, operation, lock) from failure.error

        self._note_server_time(max(snapshot.read_time for snapshot in snapshots.values()))
        return snapshots

    async def _query(
        self,
        query: AsyncQuery | AsyncCollectionReference,
        deadline: float,
        operation: str,
        lock: str | None = None,
    ) -> list[DocumentSnapshot[Any]]:
        self._require_client(operation)
        try:
            with self._rpc(deadline) as options:
                stream = query.stream(**options)
                async with contextlib.aclosing(stream):
                    snapshots = [snapshot async for snapshot in stream]
        except _RpcFailed as failure:
            raise self._unavailable(failure, operation, lock) from failure.error

        if snapshots:
            self._note_server_time(max(snapshot.read_time for snapshot in snapshots))
        return snapshots

    # --- leases that this store object last read or wrote ---

    def _remember_lease(self, lease: Lease) -> None:
        self._known_leases[lease.lock] = _KnownLease(
            lease.version, lease.holder, lease.acquisition_id, lease.token
        )

    def _remember_lease_of(self, lock: str, lease: Lease | None) -> None:
        if lease is None:
            self._known_leases.pop(lock, None)
        else:
            self._remember_lease(lease)

    def _known_version(self, lease: Lease) -> str | None:
        """Return ``lease.version`` if the lock document held this lease at that version."""
        known = self._known_leases.get(lease.lock)
        expected = _KnownLease(lease.version, lease.holder, lease.acquisition_id, lease.token)
        return lease.version if known == expected else None

    # --- calls, deadlines and errors ---

    def _deadline(self) -> float:
        return anyio.current_time() + self.timeout

    def _follow_up(self, deadline: float, limit: float) -> float:
        """Return ``deadline``, or a later one that leaves _FOLLOW_UP_SHARE of the timeout.

        Never later than ``limit``.
        """
        return min(limit, max(deadline, anyio.current_time() + self.timeout * _FOLLOW_UP_SHARE))

    @contextlib.contextmanager
    def _rpc(self, deadline: float) -> Iterator[dict[str, Any]]:
        """Bound one library call by ``deadline`` and yield its retry and timeout arguments.

        The cancel scope is the hard limit, because the library's own timeout
        bounds each attempt and its retry stops only between attempts. Raises
        _RpcFailed for any error of the call.
        """
        retried: list[Exception] = []
        remaining = max(0.0, deadline - anyio.current_time())
        retry = _CountedRetry(
            on_attempt=self._count_rpc,
            predicate=_is_retryable,
            initial=_RETRY_INITIAL,
            maximum=_RETRY_MAXIMUM,
            multiplier=_RETRY_MULTIPLIER,
            timeout=remaining,
            on_error=lambda exc: _note_retried_error(exc, retried),
        )
        try:
            with anyio.fail_after(remaining) as scope:
                try:
                    yield {"retry": retry, "timeout": max(remaining, 0.001)}
                except anyio.get_cancelled_exc_class() as exc:
                    # NOTE: grpc.aio 1.85 raises the cancellation of a unary
                    # call (a commit) again without anyio's cancel message, and
                    # anyio then lets it escape this scope as if the caller had
                    # been cancelled. So it becomes the timeout that it is. A
                    # cancellation of the caller is delivered again at its next await.
                    if scope.cancel_called and anyio.current_time() >= scope.deadline:
                        raise TimeoutError(f"no reply within {remaining:.3g}s") from exc
                    raise
        except (api_exceptions.GoogleAPIError, TimeoutError) as exc:
            raise _RpcFailed(exc, retried) from exc

    def _raise_unless_retryable(
        self, failure: _RpcFailed, deadline: float, operation: str, lock: str
    ) -> None:
        """Raise StoreUnavailable unless ``failure`` lost a race with another write.

        A lost race is tried again while the operation's deadline allows.
        """
        if not failure.conflict or anyio.current_time() >= deadline:
            raise self._unavailable(failure, operation, lock) from failure.error
        logger.debug("%s of lock %s lost a race with another write; trying again", operation, lock)

    def _count_rpc(self) -> None:
        self.rpc_count += 1

    def _note_server_time(self, timestamp: datetime) -> None:
        self._last_server_time = ServerTimeSample(self._clock.seconds(timestamp), self._wall())

    def _require_client(self, operation: str) -> AsyncClient:
        if self._client is None:
            raise StoreUnavailable(
                f"{self._describe_store()} is not open; call open() before {operation}"
            )
        return self._client

    def _precondition(self, version: str) -> Any:
        # proto-plus converts an RFC 3339 string with Timestamp.FromJsonString,
        # which keeps every digit; a datetime could lose the nanoseconds.
        return self._require_client("a write").write_option(last_update_time=version)

    def _describe_store(self) -> str:
        emulator = f", emulator at {self._emulator_host}" if self._emulator_host else ""
        return (
            f"Firestore store (project {self.project}, database {self.database}, "
            f"namespace {self.namespace}{emulator})"
        )

    def _unavailable(
        self, failure: _RpcFailed, operation: str, lock: str | None
    ) -> StoreUnavailable:
        failed_call = f"{operation} of lock {lock!r}" if lock is not None else operation
        return StoreUnavailable(
            f"{self._describe_store()} failed {failed_call}: {failure.describe(self.timeout)}; "
            f"{self._hint(failure.root_error)}"
        )

    def _hint(self, error: BaseException) -> str:
        """Return what to do about ``error``."""
        if isinstance(error, api_exceptions.PermissionDenied | api_exceptions.Unauthenticated):
            return (
                "check the credentials: deployd uses Application Default Credentials "
                "(GOOGLE_APPLICATION_CREDENTIALS, or 'gcloud auth application-default login'), "
                f"which need read and write access to Firestore in project {self.project}"
            )
        if isinstance(error, api_exceptions.NotFound) and "database" in str(error).lower():
            return (
                f"create the database with 'gcloud firestore databases create "
                f"--project={self.project} --database={self.database} --location=LOCATION', "
                "or set store.database to an existing one"
            )
        if isinstance(error, api_exceptions.FailedPrecondition) and "index" in str(error).lower():
            return (
                "create the composite index on the deployments collection (lock ascending, "
                "started descending); the error message links to it"
            )
        if self._emulator_host:
            return (
                f"check that the Firestore emulator at {self._emulator_host} runs, or unset "
                "FIRESTORE_EMULATOR_HOST"
            )
        return "check the network connection to Firestore and the store settings"

    # --- document references ---

    def _collection(self, name: str) -> AsyncCollectionReference:
        client = self._require_client("a read")
        return client.collection(ROOT_COLLECTION, self.namespace, name)

    def _document_name(self, collection: str, document: str) -> str:
        """Return the resource name of a document of this namespace, as a write names it.

        It equals _document_path() of the reference that _collection() and
        document() build. The writes of grants, renewals and releases use it,
        because building two reference objects for each document of each
        write costs more than formatting the name.
        """
        self._require_client("a write")
        return f"{self._root_name}/{collection}/{document}"

    def _lock_reference(self, lock: str) -> AsyncDocumentReference:
        return self._collection("locks").document(document_id(lock))

    def _queue_reference(self, lock: str) -> AsyncDocumentReference:
        return self._collection("queues").document(document_id(lock))

    def _freeze_reference(self, scope: str) -> AsyncDocumentReference:
        return self._collection("freezes").document(document_id(scope))

    def _deployment_reference(self, lock: str, token: int) -> AsyncDocumentReference:
        return self._collection("deployments").document(deployment_id(lock, token))


@dataclass(frozen=True, slots=True)
class _Quiet:
    """A lock whose queue had no entry and which had no freeze document, as last seen.

    ``queue_version`` is the queue document's version then, or None when it was missing.
    """

    queue_version: str | None


@dataclass(frozen=True, slots=True)
class _FreeLock:
    """A quiet lock that was free at lock document version ``version``.

    A grant of it needs no read: it commits on that version. Writes in the
    same commit that change nothing check that the queue document is still at
    its version (or missing) and that both freeze documents are still missing.
    If another daemon has changed any of them, the commit fails on a
    precondition and the grant reads the lock as usual.
    """

    version: str
    token: int
    quiet: _Quiet

    def read(self, lock: str) -> LockRead:
        """Return the read that the lock's documents would give if nothing has changed."""
        document = LockDocument(lock, self.token, None, self.version, renewal_id=None)
        queue = QueueDocument(self.quiet.queue_version, ())
        return LockRead(document, queue, None, freeze_documents_missing=True)


@dataclass(frozen=True, slots=True)
class _KnownLease:
    """A lease and the version of the lock document that held it."""

    version: str
    holder: str
    acquisition_id: str
    token: int


class _RpcFailed(Exception):
    """A library call failed or ran out of time.

    ``error`` is the library's error, or TimeoutError when the call's deadline
    passed. ``retried`` lists the errors after which the library tried again.
    """

    def __init__(self, error: BaseException, retried: list[Exception]) -> None:
        super().__init__(str(error))
        self.error = error
        self.retried = retried

    @property
    def root_error(self) -> BaseException:
        """Return the last error that the library got, unwrapping RetryError and timeouts."""
        if isinstance(self.error, api_exceptions.RetryError) and self.error.cause is not None:
            cause: BaseException = self.error.cause
            return cause
        if isinstance(self.error, TimeoutError) and self.retried:
            return self.retried[-1]
        return self.error

    @property
    def conflict(self) -> bool:
        """Return whether a precondition of the write failed."""
        return isinstance(self.error, _CONFLICT_ERRORS)

    def describe(self, timeout: float) -> str:
        """Return the failure in words for an error message."""
        if isinstance(self.error, TimeoutError | api_exceptions.RetryError):
            last = f" (last error: {self.root_error})" if self.root_error is not self.error else ""
            return f"no reply within {timeout:g}s{last}"
        return f"{self.error} ({type(self.error).__name__})"


class _CountedRetry(AsyncRetry):
    """An AsyncRetry that calls ``on_attempt`` before every attempt it makes."""

    def __init__(self, on_attempt: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_attempt = on_attempt

    def __call__(
        self,
        func: Callable[..., Awaitable[Any]],
        on_error: Callable[[Exception], Any] | None = None,
    ) -> Callable[..., Awaitable[Any]]:
        on_attempt = self._on_attempt

        async def attempt(*args: Any, **kwargs: Any) -> Any:
            on_attempt()
            return await func(*args, **kwargs)

        return super().__call__(attempt, on_error)


class _ReconnectingClient(AsyncClient):
    """An AsyncClient whose gRPC channel tries to reconnect at least once a second."""

    def _firestore_api_helper(self, transport: Any, client_class: Any, client_module: Any) -> Any:
        # NOTE: google-cloud-firestore 2.34 takes no gRPC channel options, so
        # this repeats its private BaseClient._firestore_api_helper with
        # _RECONNECT_OPTIONS added to the options that the library sets.
        if self._firestore_api_internal is None:
            if self._emulator_host is not None:
                token = getattr(self._credentials, "id_token", None) or "owner"
                options = [("Authorization", f"Bearer {token}"), *_GRPC_MSG_SIZE_OPTIONS]
                channel = grpc.aio.insecure_channel(
                    self._emulator_host, options=[*options, *_RECONNECT_OPTIONS]
                )
            else:
                channel = transport.create_channel(
                    self._target,
                    credentials=self._credentials,
                    options=[*_DEFAULT_CHANNEL_OPTIONS, *_RECONNECT_OPTIONS],
                )
            self._transport = transport(host=self._target, channel=channel)
            self._firestore_api_internal = client_class(
                transport=self._transport, client_options=self._client_options
            )
            client_module._client_info = self._client_info
        return self._firestore_api_internal


def _document_path(reference: AsyncDocumentReference) -> str:
    """Return the full resource name of a document, as a Write names it."""
    # NOTE: google-cloud-firestore 2.34 has no public property for the name
    # ("projects/P/databases/D/documents/PATH"), so this reads the private
    # one that the library's own writes use.
    path: str = reference._document_path
    return path


def _add_writes(batch: AsyncWriteBatch, *writes: Write) -> None:
    """Add writes built by firestore_writes to ``batch``, after those it already has."""
    # NOTE: _add_write_pbs is the private method through which the batch's own
    # create(), update() and set() add their writes in google-cloud-firestore 2.34.
    batch._add_write_pbs(list(writes))


async def _commit(batch: AsyncWriteBatch, options: Mapping[str, Any]) -> list[WriteResult]:
    """Send the commit that ``batch.commit()`` would send; return the results of its writes.

    commit_request() builds the request, without the conversion of each write
    that commit() makes. The call, its retry and timeout (``options``) and its
    errors stay the library's. Unlike commit(), it leaves the batch as it was;
    the store never reuses a batch.
    """
    # NOTE: _client, _write_pbs, _firestore_api and _rpc_metadata are the private
    # attributes that AsyncWriteBatch.commit() itself uses in google-cloud-firestore 2.34.
    client = batch._client
    response = await client._firestore_api.commit(
        request=commit_request(client._database_string, batch._write_pbs),
        metadata=client._rpc_metadata,
        **options,
    )
    return list(response.write_results)


async def _close_client(client: AsyncClient) -> None:
    # NOTE: google-cloud-firestore 2.34 has no public close() on AsyncClient, so
    # this closes the gRPC transport that the client created on first use.
    api = getattr(client, "_firestore_api_internal", None)
    if api is not None:
        await api.transport.close()


def _is_retryable(error: Exception) -> bool:
    return isinstance(error, _RETRYABLE_ERRORS)


def _note_retried_error(error: Exception, retried: list[Exception]) -> None:
    retried.append(error)
    logger.debug("Firestore call failed and is retried: %s", error)


def _field_of(snapshot: DocumentSnapshot[Any], field: str) -> Any:
    data = snapshot.to_dict() if snapshot.exists else None
    return (data or {}).get(field)


# --- leases ---


def _is_same_lease(stored: Lease, lease: Lease) -> bool:
    """Return whether ``stored`` is the same grant as ``lease``, expired or not."""
    return stored.holder == lease.holder and stored.acquisition_id == lease.acquisition_id


def _is_same_grant(stored: Lease, request: LeaseRequest) -> bool:
    return stored.holder == request.holder and stored.acquisition_id == request.acquisition_id


def _held_version(read: LockRead, lease: Lease) -> str | None:
    """Return the lock document's version if ``lease`` still holds the lock, else None."""
    current = read.lock.lease
    if current is None or not _is_same_lease(current, lease):
        return None
    return read.lock.version


def _version_if_held(read: LockRead, lease: Lease) -> str:
    """Return the lock document's version, or raise LeaseLost if ``lease`` no longer holds it."""
    version = _held_version(read, lease)
    if version is None:
        raise LeaseLost(lease.lock, _lost_message(lease, read.state), current=read.state)
    return version


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


# --- logging ---


def _log_write_failure(write: str, lock: str, holder: str, failure: _RpcFailed) -> None:
    logger.warning(
        "%s of lock %s by %s failed (%s); reading the lock again to learn whether it applied",
        write,
        lock,
        holder,
        failure.root_error,
    )


def _log_applied_before_error(write: str, lock: str, holder: str) -> None:
    logger.info("%s of lock %s by %s had applied before the error", write, lock, holder)


def _log_release_without_change(lease: Lease) -> None:
    logger.debug(
        "release of lock %s by %s changed nothing: the lease is no longer held",
        lease.lock,
        lease.holder,
    )


def _log_grant(
    lease: Lease, takeover: Takeover, replaced: Lease | None, request: LeaseRequest
) -> None:
    if replaced is None:
        logger.debug("granted lock %s to %s (token %d)", lease.lock, lease.holder, lease.token)
    elif takeover is Takeover.FORCED:
        logger.info(
            "forced lock %s away from %s and granted it to %s (token %d), reason: %s",
            lease.lock,
            replaced.holder,
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
            replaced.holder,
        )
