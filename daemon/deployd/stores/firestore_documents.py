"""The Firestore documents of the lease store: ids, fields, and parsing of snapshots.

Documents, all under ``deployd/{namespace}``:

- ``locks/{lock}``: one per lock, never deleted, so fencing tokens never go
  back. It contains the lock name and the last fencing token and, while the lock
  is held, the lease: holder, acquisition id, owner, purpose, TTL, the server
  times of the grant and of the last renewal, and the last renewal's id.
  ``released`` is the server time the lock was last freed. ``forced`` records
  the last force: who forced the lock, the reason, the server time, the token
  that the force handed out, and the force's id.
- ``queues/{lock}``: the lock name and its waiter entries in one map, keyed by
  waiter id. Each entry contains the waiter id, owner, purpose, TTL, and the
  server times of the enqueue and of the last heartbeat.
- ``deployments/{lock}@{token}``: one deployment record per grant, and
  ``deployments/{lock}@session:{session}`` for a deploy that ran without the
  lock. Times that came from a workstation's clock rather than from the
  server (the start of a deploy that ran without the lock) are kept exactly
  in ``started_wall`` and ``finished_wall``.

A name that is not a valid lock name (the daemon rejects those before they
reach a store) is stored under ``~`` and its URL-safe base64 form, so that no
name can address another document.

Times come from the server, except in records of deploys that ran without
the lock. Field timestamps (``SERVER_TIMESTAMP``) have millisecond precision,
and update and read times have microsecond precision.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from google.cloud.firestore import SERVER_TIMESTAMP
from google.cloud.firestore_v1.field_path import FieldPath

from deployd.errors import StoreUnavailable
from deployd.models import (
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
)
from deployd_client.names import lock_name_problem

if TYPE_CHECKING:
    from google.cloud.firestore_v1.base_document import DocumentSnapshot
    from google.cloud.firestore_v1.types import WriteResult

ROOT_COLLECTION = "deployd"

# Prefix of document ids and map keys that hold an encoded name.
_ENCODED_PREFIX = "~"
# Errors that a document with missing or mistyped fields raises while it is parsed.
_MALFORMED_ERRORS = (KeyError, TypeError, ValueError, AttributeError)


class ServerClock(Protocol):
    """Conversion between the store's timestamps and seconds since the Unix epoch.

    The store compares only timestamps that the server assigned. Tests pass a
    clock that they move by hand.
    """

    def seconds(self, timestamp: datetime) -> float:
        """Return ``timestamp`` in seconds since the epoch."""
        ...

    def timestamp(self, seconds: float) -> datetime:
        """Return the earliest timestamp whose ``seconds()`` is at least ``seconds``."""
        ...


class UnixServerClock:
    """Server time as the server reports it."""

    def seconds(self, timestamp: datetime) -> float:
        return timestamp.timestamp()

    def timestamp(self, seconds: float) -> datetime:
        return datetime.fromtimestamp(seconds, UTC)


# --- documents as read ---


@dataclass(frozen=True, slots=True)
class LockDocument:
    """A lock document as read: the token, the lease if held, and the version to write on.

    ``version`` is None when the document does not exist.
    """

    lock: str
    token: int
    lease: Lease | None
    version: str | None
    renewal_id: str | None
    forced: ForceRecord | None = None
    force_id: str | None = None


@dataclass(frozen=True, slots=True)
class WaiterEntry:
    """A waiter entry as read, live or not, with its map key and enqueue timestamp."""

    key: str
    waiter: Waiter
    enqueued: datetime
    live: bool


@dataclass(frozen=True, slots=True)
class QueueDocument:
    """A queue document as read: its version (None when missing) and every entry in queue order."""

    version: str | None
    entries: tuple[WaiterEntry, ...]

    def entry(self, waiter_id: str) -> WaiterEntry | None:
        """Return the entry of ``waiter_id``, live or not, or None."""
        for entry in self.entries:
            if entry.waiter.waiter_id == waiter_id:
                return entry
        return None


@dataclass(frozen=True, slots=True)
class LockRead:
    """The lock and queue documents of one lock, read in one call, and its freeze if any.

    ``freeze_documents_missing`` is true when neither the lock's freeze
    document nor the one for all locks existed, expired freezes included.
    ``writes_before`` is the count of the reading store's own completed
    writes when the read started, or -1 for a read that was not made.
    """

    lock: LockDocument
    queue: QueueDocument
    frozen: Freeze | None = None
    freeze_documents_missing: bool = False
    writes_before: int = -1

    @property
    def state(self) -> LockState:
        """Return the lock's state with its live waiters in queue order."""
        waiters = tuple(entry.waiter for entry in self.queue.entries if entry.live)
        lock = self.lock
        return LockState(lock.lock, lock.token, lock.lease, waiters, lock.forced, self.frozen)


def freeze_fields(freeze: Freeze) -> dict[str, Any]:
    """Return the fields of a freeze document; ``at`` is set by the server."""
    return {
        "scope": freeze.scope,
        "reason": freeze.reason,
        "by": freeze.by,
        "at": SERVER_TIMESTAMP,
        "until": freeze.until,
    }


def parse_freeze(snapshot: DocumentSnapshot[Any] | None, clock: ServerClock) -> Freeze | None:
    """Return the freeze in ``snapshot``, or None when the document does not exist."""
    if snapshot is None or not snapshot.exists:
        return None
    data = snapshot.to_dict() or {}
    try:
        at = data.get("at")
        until = data.get("until")
        return Freeze(
            scope=str(data["scope"]),
            reason=str(data["reason"]),
            by=str(data["by"]),
            at=clock.seconds(at) if isinstance(at, datetime) else 0.0,
            until=float(until) if until is not None else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreUnavailable(
            f"freeze document {snapshot.reference.path} is malformed ({exc}); "
            "lift it with 'deployd unfreeze' or delete the document"
        ) from exc


def parse_lock(
    lock: str, snapshot: DocumentSnapshot[Any] | None, clock: ServerClock
) -> LockDocument:
    """Return the lock document in ``snapshot``; a missing document is a lock never granted.

    A lease is expired when the snapshot's read time is at least its update
    time plus the TTL stored in the lease.
    """
    if snapshot is None or not snapshot.exists:
        return LockDocument(lock, 0, None, None, None)

    data = snapshot.to_dict() or {}
    version = version_of(snapshot.update_time)
    try:
        token = int(data.get("token", 0))
        lease = None
        if data.get("holder") is not None:
            lease = _parse_lease(lock, data, token, version, snapshot, clock)
        forced = data.get("forced")
        force = _parse_force(forced, clock) if forced is not None else None
    except _MALFORMED_ERRORS as exc:
        raise _malformed(snapshot, exc) from exc

    force_id = forced.get("id") if forced is not None else None
    return LockDocument(lock, token, lease, version, data.get("renewal_id"), force, force_id)


def _parse_lease(
    lock: str,
    data: dict[str, Any],
    token: int,
    version: str,
    snapshot: DocumentSnapshot[Any],
    clock: ServerClock,
) -> Lease:
    ttl = float(data["ttl"])
    age = clock.seconds(snapshot.read_time) - clock.seconds(snapshot.update_time)
    return Lease(
        lock=lock,
        holder=data["holder"],
        acquisition_id=data["acquisition_id"],
        token=token,
        owner=_owner_from(data["owner"]),
        purpose=_purpose_from(data["purpose"]),
        ttl=ttl,
        acquired_at=clock.seconds(data["acquired"]),
        renewed_at=clock.seconds(data["renewed"]),
        expires_in=ttl - age,
        version=version,
    )


def _parse_force(fields: dict[str, Any], clock: ServerClock) -> ForceRecord:
    return ForceRecord(
        by=fields["by"],
        reason=fields["reason"],
        at=clock.seconds(fields["at"]),
        token=int(fields["token"]),
    )


def parse_queue(
    lock: str, snapshot: DocumentSnapshot[Any] | None, clock: ServerClock
) -> QueueDocument:
    """Return the queue document in ``snapshot`` with every entry, live or not, in queue order.

    An entry is live while the snapshot's read time is earlier than its last
    heartbeat plus its TTL.
    """
    if snapshot is None or not snapshot.exists:
        return QueueDocument(None, ())

    data = snapshot.to_dict() or {}
    now = clock.seconds(snapshot.read_time)
    try:
        entries = [
            _parse_entry(lock, key, fields, now, clock)
            for key, fields in (data.get("waiters") or {}).items()
        ]
    except _MALFORMED_ERRORS as exc:
        raise _malformed(snapshot, exc) from exc

    # Ties in the enqueue time, which has millisecond precision, go by waiter id.
    entries.sort(key=lambda entry: (entry.enqueued, entry.waiter.waiter_id))
    return QueueDocument(version_of(snapshot.update_time), tuple(entries))


def _parse_entry(
    lock: str, key: str, fields: dict[str, Any], now: float, clock: ServerClock
) -> WaiterEntry:
    ttl = float(fields["ttl"])
    expires_in = ttl - (now - clock.seconds(fields["heartbeat"]))
    waiter = Waiter(
        lock=lock,
        waiter_id=fields["waiter_id"],
        owner=_owner_from(fields["owner"]),
        purpose=_purpose_from(fields["purpose"]),
        enqueued_at=clock.seconds(fields["enqueued"]),
        expires_in=expires_in,
    )
    return WaiterEntry(key, waiter, fields["enqueued"], expires_in > 0)


def parse_deployment(snapshot: DocumentSnapshot[Any], clock: ServerClock) -> Deployment:
    """Return the deployment record in ``snapshot``."""
    data = snapshot.to_dict() or {}
    try:
        started_at = _record_time(data, "started", clock)
        if started_at is None:
            raise KeyError("started")
        return Deployment(
            session_id=data["session_id"],
            lock=data["lock"],
            token=int(data["token"]),
            owner=_owner_from(data["owner"]),
            purpose=_purpose_from(data["purpose"]),
            started_at=started_at,
            waited=float(data.get("waited", 0.0)),
            finished_at=_record_time(data, "finished", clock),
            outcome=data.get("outcome"),
            exit_code=data.get("exit_code"),
            revision=data.get("revision"),
            degraded=bool(data.get("degraded", False)),
            takeover=data.get("takeover"),
            detail=data.get("detail"),
        )
    except _MALFORMED_ERRORS as exc:
        raise _malformed(snapshot, exc) from exc


def _record_time(data: dict[str, Any], field: str, clock: ServerClock) -> float | None:
    """Return a record's time in seconds, or None when it has none.

    A time from a workstation's clock is returned as stored, and a server
    timestamp is converted by ``clock``.
    """
    wall = data.get(f"{field}_wall")
    if wall is not None:
        return float(wall)
    timestamp = data.get(field)
    return clock.seconds(timestamp) if timestamp is not None else None


def lock_name_of(snapshot: DocumentSnapshot[Any]) -> str:
    """Return the name of the lock that a lock or queue document belongs to."""
    # get() copies one field, where to_dict() would deep-copy the whole document.
    try:
        name = snapshot.get("name")
    except KeyError:
        name = None
    if isinstance(name, str):
        return name

    document_id: str = snapshot.id
    if not document_id.startswith(_ENCODED_PREFIX):
        return document_id
    encoded = document_id[len(_ENCODED_PREFIX) :]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")


def _malformed(snapshot: DocumentSnapshot[Any], exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(
        f"Firestore document {snapshot.reference.path} is malformed ({type(exc).__name__}: "
        f"{exc}); restore it, or repair its fields by hand (deleting a lock document starts "
        "its fencing tokens again at 1)"
    )


# --- fields to write ---


def owner_fields(owner: Owner) -> dict[str, Any]:
    """Return ``owner`` as a map field, as dataclasses.asdict() would, in less time."""
    return {
        "user": owner.user,
        "host": owner.host,
        "pid": owner.pid,
        "daemon_id": owner.daemon_id,
    }


def purpose_fields(purpose: Purpose) -> dict[str, Any]:
    """Return ``purpose`` as a map field, as dataclasses.asdict() would, in less time."""
    return {"commit": purpose.commit, "reason": purpose.reason}


def lease_fields(request: LeaseRequest) -> dict[str, Any]:
    """Return the lock document's fields for a grant to ``request``, except the token."""
    return {
        "name": request.lock,
        "holder": request.holder,
        "acquisition_id": request.acquisition_id,
        "owner": owner_fields(request.owner),
        "purpose": purpose_fields(request.purpose),
        "ttl": request.ttl,
        "acquired": SERVER_TIMESTAMP,
        "renewed": SERVER_TIMESTAMP,
        "renewal_id": None,
    }


def renewal_fields(ttl: float, renewal_id: str) -> dict[str, Any]:
    """Return the lock document's fields for a renewal.

    The new renewal id and server timestamp change the document, so its
    update time moves on; a write that changes nothing keeps the old one.
    """
    return {"renewed": SERVER_TIMESTAMP, "renewal_id": renewal_id, "ttl": ttl}


def released_fields() -> dict[str, Any]:
    """Return the lock document's fields for a release; the token stays as it is."""
    lease_only = ("holder", "acquisition_id", "owner", "purpose", "ttl", "acquired", "renewed")
    return {**dict.fromkeys(lease_only), "renewal_id": None, "released": SERVER_TIMESTAMP}


def new_record_fields(
    request: LeaseRequest, token: int, takeover: Takeover, detail: str | None = None
) -> dict[str, Any]:
    """Return the fields of the deployment record that a grant creates.

    A deploy that ran without the lock since ``request.unlocked_since`` gets a
    degraded record that starts at that workstation time.
    """
    unlocked_since = request.unlocked_since
    started: Any = SERVER_TIMESTAMP
    if unlocked_since is not None:
        started = datetime.fromtimestamp(unlocked_since, UTC)
    return {
        "session_id": request.holder,
        "lock": request.lock,
        "token": token,
        "acquisition_id": request.acquisition_id,
        "owner": owner_fields(request.owner),
        "purpose": purpose_fields(request.purpose),
        "started": started,
        "started_wall": unlocked_since,
        "waited": request.waited,
        "takeover": takeover.value,
        "degraded": unlocked_since is not None,
        "finished": None,
        "finished_wall": None,
        "outcome": None,
        "exit_code": None,
        "revision": None,
        "detail": detail,
    }


def recorded_deployment_fields(deployment: Deployment) -> dict[str, Any]:
    """Return the fields of a record that no grant wrote, with the workstation's times."""
    finished = deployment.finished_at
    return {
        "session_id": deployment.session_id,
        "lock": deployment.lock,
        "token": deployment.token,
        "acquisition_id": None,
        "owner": owner_fields(deployment.owner),
        "purpose": purpose_fields(deployment.purpose),
        "started": datetime.fromtimestamp(deployment.started_at, UTC),
        "started_wall": deployment.started_at,
        "waited": deployment.waited,
        "takeover": deployment.takeover,
        "degraded": deployment.degraded,
        "finished": datetime.fromtimestamp(finished, UTC) if finished is not None else None,
        "finished_wall": finished,
        "outcome": deployment.outcome,
        "exit_code": deployment.exit_code,
        "revision": deployment.revision,
        "detail": deployment.detail,
    }


def forced_fields(by: str, reason: str, token: int, force_id: str) -> dict[str, Any]:
    """Return the lock document's record of a force that handed out ``token``."""
    return {
        "forced": {
            "by": by,
            "reason": reason,
            "at": SERVER_TIMESTAMP,
            "token": token,
            "id": force_id,
        }
    }


def replaced_record_fields(request: LeaseRequest, takeover: Takeover) -> dict[str, Any]:
    """Return the fields that record in a replaced lease's record that it expired or was forced."""
    if takeover is Takeover.FORCED:
        reason = request.force_reason or "no reason given"
        outcome = Outcome(OutcomeStatus.FORCED, detail=f"forced away by {request.holder}: {reason}")
    else:
        outcome = Outcome(
            OutcomeStatus.EXPIRED,
            detail=f"lease expired without release; taken over by {request.holder}",
        )
    return finished_record_fields(outcome, request.holder, None)


def finished_record_fields(
    outcome: Outcome, finished_by: str, release_id: str | None
) -> dict[str, Any]:
    """Return the fields that complete a deployment record.

    ``finished_by`` is the session that ended the lease: its holder on
    release, the new holder on a takeover. ``release_id`` identifies the
    release call, so that a release whose reply was lost can be recognized.
    An outcome without a detail leaves the grant's detail (a passed freeze)
    in place, because the fields are merged into the record.
    """
    fields: dict[str, Any] = {
        "finished": SERVER_TIMESTAMP,
        "outcome": outcome.status.value,
        "exit_code": outcome.exit_code,
        "revision": outcome.revision,
        "finished_by": finished_by,
        "release_id": release_id,
    }
    if outcome.detail is not None:
        fields["detail"] = outcome.detail
    return fields


def waiter_fields(waiter_id: str, owner: Owner, purpose: Purpose, ttl: float) -> dict[str, Any]:
    """Return a new waiter entry, which joins the back of the queue."""
    return {
        "waiter_id": waiter_id,
        "owner": owner_fields(owner),
        "purpose": purpose_fields(purpose),
        "ttl": ttl,
        "enqueued": SERVER_TIMESTAMP,
        "heartbeat": SERVER_TIMESTAMP,
    }


def heartbeat_fields(key: str, owner: Owner, purpose: Purpose, ttl: float) -> dict[str, Any]:
    """Return the updates that refresh the waiter entry under ``key``.

    The enqueue time stays, and with it the entry's place in the queue.
    """
    return {
        waiter_path(key, "heartbeat"): SERVER_TIMESTAMP,
        waiter_path(key, "ttl"): ttl,
        waiter_path(key, "owner"): owner_fields(owner),
        waiter_path(key, "purpose"): purpose_fields(purpose),
    }


def _owner_from(fields: dict[str, Any]) -> Owner:
    return Owner(
        user=fields["user"],
        host=fields["host"],
        pid=fields.get("pid"),
        daemon_id=fields["daemon_id"],
    )


def _purpose_from(fields: dict[str, Any]) -> Purpose:
    return Purpose(commit=fields.get("commit"), reason=fields.get("reason"))


# --- ids, paths and timestamps ---


@functools.lru_cache(maxsize=1024)
def document_id(lock: str) -> str:
    """Return the document id of ``lock``: the name itself if it is a valid lock name.

    Cached, because every write of a grant, renewal or release names its
    documents by it, and checking the name takes longer than looking it up.
    """
    if lock_name_problem(lock) is None:
        return lock
    return _encode(lock)


def deployment_id(lock: str, token: int) -> str:
    """Return the id of the deployment record of the grant of ``lock`` with ``token``."""
    return f"{document_id(lock)}@{token}"


def session_record_id(lock: str, session_id: str) -> str:
    """Return the id of the record of a deploy by ``session_id`` that ran without ``lock``."""
    session = session_id if "/" not in session_id else _encode(session_id)
    return f"{document_id(lock)}@session:{session}"


def map_key(waiter_id: str) -> str:
    """Return the key of ``waiter_id`` in a queue's map of waiter entries.

    Firestore reserves field names of the form ``__name__``, so those, and ids
    that could be mistaken for an encoded one, are encoded.
    """
    reserved = waiter_id.startswith("__") and waiter_id.endswith("__")
    if waiter_id and not reserved and not waiter_id.startswith(_ENCODED_PREFIX):
        return waiter_id
    return _encode(waiter_id)


def _encode(name: str) -> str:
    encoded = base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")
    return _ENCODED_PREFIX + encoded.rstrip("=")


def waiter_path(key: str, *fields: str) -> str:
    """Return the field path of a waiter entry, or of one of its fields, quoted as needed."""
    path: str = FieldPath("waiters", key, *fields).to_api_repr()
    return path


def version_of(timestamp: datetime) -> str:
    """Return an update time in RFC 3339 form with nine fractional digits.

    The fixed width matters: the library's timestamps come in two classes
    named DatetimeWithNanoseconds (google.api_core's and proto-plus's), whose
    rfc3339() and nanosecond differ, so one update time read from a snapshot
    and from a write result could otherwise give two different strings.
    """
    below_microsecond = getattr(timestamp, "nanosecond", 0) % 1000
    nanoseconds = timestamp.microsecond * 1000 + below_microsecond
    seconds = timestamp.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
    return f"{seconds}.{nanoseconds:09d}Z"


def written_timestamp(result: WriteResult) -> datetime:
    """Return the server timestamp that a write stored, or its update time if it stored none.

    Firestore gives every server timestamp (REQUEST_TIME) of one commit the same value.
    """
    for value in result.transform_results:
        if type(value).pb(value).WhichOneof("value_type") == "timestamp_value":
            timestamp: datetime = value.timestamp_value
            return timestamp
    update_time: datetime = result.update_time
    return update_time
