"""The protocol's reading ops and freezes: status, locks, history, stats, freeze, unfreeze.

Every answer is JSON with a ``schema`` version; docs/json.md describes the
shapes, which stay stable.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable
from typing import Any

import anyio

from deployd.errors import InvalidArgument, StoreError, StoreUnavailable
from deployd.handlers import DaemonInfo, Params, user_of
from deployd.models import ALL_LOCKS, Deployment, Freeze, LockState, Owner
from deployd.notifiers import Notifier, notifier_off
from deployd.reports import REPORT_SCHEMA, history_report, lease_report, stats_report
from deployd.server import Connection, Handler
from deployd.service import LeaseService
from deployd.sessions import short_hostname

logger = logging.getLogger("deployd.handlers")

STATUS_SCHEMA = REPORT_SCHEMA
MAX_HISTORY = 1000
# The most records stats reads; a busier period is counted from its newest ones.
STATS_RECORDS = 10000
DEFAULT_STATS_PERIOD = 7 * 86400.0
LATEST_DEPLOYS = 5
# The latest time a request may name: 2100-01-01 00:00 UTC, in seconds since the epoch.
LATEST_TIME = 4102444800.0


class ReportOps:
    """Handlers that report on locks and deploys, and that freeze and unfreeze locks."""

    def __init__(
        self, service: LeaseService, info: DaemonInfo, notifier: Notifier | None = None
    ) -> None:
        self.service = service
        self.info = info
        self.notifier = notifier
        self.host = short_hostname()

    def table(self) -> dict[str, Handler]:
        """Return the handlers by op name."""
        return {
            "status": self.status,
            "locks": self.locks,
            "history": self.history,
            "stats": self.stats,
            "freeze": self.freeze,
            "unfreeze": self.unfreeze,
        }

    async def _store_call(self, call: Any) -> Any:
        """Await a store call within the store's deadline; a timeout is StoreUnavailable."""
        try:
            with anyio.fail_after(self.service.config.store.timeout + 1):
                return await call
        except TimeoutError as exc:
            raise StoreUnavailable("the lease store did not respond in time") from exc

    # --- locks and status ---

    async def locks(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Return every lock in the store with its lease and waiters."""
        states = await self._store_call(self.service.store.list_locks())
        return {"schema": STATUS_SCHEMA, "locks": [state.to_json() for state in states]}

    async def status(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Return the daemon, the store, every lock with health and queue, freezes, latest deploys.

        A store that cannot be reached is reported as such; the rest of the
        status still answers.
        """
        store: dict[str, Any] = {"kind": self.info.store_kind, "location": self.info.store_location}
        locks: list[dict[str, Any]] = []
        freezes: list[dict[str, Any]] = []
        latest: list[dict[str, Any]] = []
        started = time.monotonic()
        try:
            states, freeze_list, records, latency = await self._read_status()
            store["latency"] = round(latency, 4)
            store["reachable"] = True
            now = time.time()
            for state in states:
                entry = state.to_json()
                if state.lease is not None:
                    entry["lease"] = lease_report(state.lease, now)
                locks.append(entry)
            freezes = [freeze.to_json() for freeze in freeze_list]
            latest = [record.to_json() for record in records]
        except StoreError as exc:
            store["reachable"] = False
            store["latency"] = round(time.monotonic() - started, 4)
            store["error"] = str(exc)
        store["clock_offset"] = self._clock_offset()

        now_monotonic = time.monotonic()
        for entry in locks:
            entry["local_queue"] = [
                {
                    "session_id": ticket.session_id,
                    "user": ticket.owner.user,
                    "pid": ticket.owner.pid,
                    "waiting_for": round(now_monotonic - ticket.arrived_at, 3),
                }
                for ticket in self.service.local_queue(entry["lock"])
            ]
        return {
            "schema": STATUS_SCHEMA,
            "daemon": self.info.to_json(),
            "store": store,
            "locks": locks,
            "freezes": freezes,
            "leases": self._held_leases(now_monotonic),
            "latest": latest,
            "notifications": self._notifications(),
        }

    async def _read_status(
        self,
    ) -> tuple[list[LockState], list[Freeze], list[Deployment], float]:
        """Read the locks, the freezes and the latest deploys at once; raise the first StoreError.

        Firestore runs the three queries in parallel, so status costs the
        slowest of them rather than their sum. The float is how long listing
        the locks took, in seconds.
        """
        store = self.service.store
        results: dict[str, Any] = {}
        errors: list[StoreError] = []

        async def read(name: str, call: Awaitable[Any]) -> None:
            started = time.monotonic()
            try:
                results[name] = await self._store_call(call)
            except StoreError as exc:
                errors.append(exc)
            results[f"{name}_seconds"] = time.monotonic() - started

        async with anyio.create_task_group() as group:
            group.start_soon(read, "locks", store.list_locks())
            group.start_soon(read, "freezes", store.freezes())
            group.start_soon(read, "latest", store.history(limit=LATEST_DEPLOYS))
        if errors:
            raise errors[0]
        return results["locks"], results["freezes"], results["latest"], results["locks_seconds"]

    def _held_leases(self, now: float) -> list[dict[str, Any]]:
        leases = []
        for held in self.service.held_leases():
            binding = self.service.binding(held.lease_id)
            leases.append(
                {
                    "lock": held.lock,
                    "session_id": held.lease_id,
                    "token": held.lease.token,
                    "binding": binding.to_json() if binding else None,
                    "last_renewal_age": round(now - held.confirmed_at, 3),
                    "renew_failures": held.renew_failures,
                    "ttl": held.timings.ttl,
                    "degraded": held.degraded,
                }
            )
        return leases

    def _clock_offset(self) -> float | None:
        """Return the store's clock minus this workstation's, in seconds, when known.

        SQLite judges by this machine's own clock, so its offset is 0.
        """
        if self.info.store_kind == "sqlite":
            return 0.0
        sample_of = getattr(self.service.store, "server_time", None)
        sample = sample_of() if callable(sample_of) else None
        offset = getattr(sample, "offset", None)
        return round(offset, 3) if isinstance(offset, int | float) else None

    def _notifications(self) -> dict[str, Any]:
        """Return the notifier's health for ``status``, or why there is none."""
        if self.notifier is None:
            return notifier_off(self.service.config)
        try:
            return self.notifier.health()
        except sqlite3.Error as exc:
            logger.warning("cannot read the notifier's outbox for status: %s", exc)
            return {"configured": True, "error": f"cannot read the outbox: {exc}"}

    # --- history and stats ---

    async def history(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Return deployment records, newest first, optionally of one lock and since a time."""
        params = Params(request)
        lock = params.lock() if request.get("lock") is not None else None
        limit = params.integer("limit", minimum=1, maximum=MAX_HISTORY) or 50
        since = _since(request)
        records = await self._store_call(self.service.store.history(lock, limit, since))
        return history_report(records, lock, limit, since)

    async def stats(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Return deploy counts, shares, latencies and per-lock medians since a time."""
        now = time.time()
        since = _since(request)
        if since is None:
            since = now - DEFAULT_STATS_PERIOD
        records = await self._store_call(self.service.store.history(None, STATS_RECORDS, since))
        return stats_report(
            records,
            since,
            now,
            self.service.acquire_latencies(),
            self._delivery(),
        )

    def _delivery(self) -> dict[str, Any] | None:
        """Return the notifier's delivery counts and rate, or None without a notifier.

        The rate is the share of messages that reached Slack among those that
        did or could not: sent, failed, skipped and parked. Queued messages
        are left out, because they may still be sent.
        """
        if self.notifier is None:
            return None
        try:
            health = self.notifier.health()
        except sqlite3.Error:
            return None
        counts = {
            state: int(health.get(state, 0))
            for state in ("sent", "failed", "skipped", "parked", "queued")
        }
        due = counts["sent"] + counts["failed"] + counts["skipped"] + counts["parked"]
        return {
            **counts,
            "delivery_rate": round(counts["sent"] / due, 4) if due else None,
            "problem": health.get("problem"),
        }

    # --- freezes ---

    async def freeze(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Stop new grants of one lock, or of all locks, until unfrozen or ``until``."""
        params = Params(request)
        scope = _scope(params, request)
        reason = params.text("reason")
        if not reason or not reason.strip():
            raise InvalidArgument(
                "freeze needs a reason that is not blank, shown to everyone who is stopped by it"
            )
        until = params.seconds("until", 0.0, LATEST_TIME)
        if until is not None and until <= time.time():
            raise InvalidArgument(f"until {until!r} is in the past; give a time in the future")
        by = Owner(user_of(connection), self.host, connection.peer_pid, self.info.daemon_id)
        # NOTE: a freeze of the same scope set between this read and the write is
        # replaced without being reported.
        in_force = await self._store_call(self.service.store.freezes())
        replaced = next((freeze for freeze in in_force if freeze.scope == scope), None)
        freeze = await self._store_call(self.service.store.freeze(scope, reason, by, until))
        if replaced is not None:
            logger.warning(
                "froze %s by %s@%s: %s, replacing the freeze by %s: %s",
                scope,
                by.user,
                by.host,
                reason,
                replaced.by,
                replaced.reason,
            )
        else:
            logger.warning("froze %s by %s@%s: %s", scope, by.user, by.host, reason)
        return {
            "schema": REPORT_SCHEMA,
            "frozen": freeze.to_json(),
            "replaced": replaced.to_json() if replaced is not None else None,
        }

    async def unfreeze(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Lift the freeze of one lock, or the freeze of all locks (not those of single locks).

        ``was_in_force`` is false when the lifted freeze had already ended at
        its ``until``, judged by the store's clock as this daemon last measured it.
        """
        scope = _scope(Params(request), request)
        lifted = await self._store_call(self.service.store.unfreeze(scope))
        # The freeze of all locks still stops a lock whose own freeze is gone.
        all_locks = None
        if scope != ALL_LOCKS:
            active = await self._store_call(self.service.store.freezes())
            all_locks = next((f.to_json() for f in active if f.scope == ALL_LOCKS), None)
        if lifted is None:
            return {
                "schema": REPORT_SCHEMA,
                "unfrozen": None,
                "was_in_force": False,
                "all_locks_freeze": all_locks,
            }
        was_in_force = lifted.active(time.time() + (self._clock_offset() or 0.0))
        logger.warning(
            "unfroze %s by %s%s",
            scope,
            user_of(connection),
            "" if was_in_force else " (it had already ended)",
        )
        return {
            "schema": REPORT_SCHEMA,
            "unfrozen": lifted.to_json(),
            "was_in_force": was_in_force,
            "all_locks_freeze": all_locks,
        }


def _since(request: dict[str, Any]) -> float | None:
    """Read ``since``: a time in seconds since the epoch, from 1970 to LATEST_TIME."""
    value = request.get("since")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(
            f"since must be a time in seconds since the epoch, got {type(value).__name__} {value!r}"
        )
    if not 0 <= value <= LATEST_TIME:
        raise InvalidArgument(
            f"since must be a time in seconds since the epoch from 0 (1970) to "
            f"{LATEST_TIME:.0f} (2100), got {value!r}"
        )
    return float(value)


def _scope(params: Params, request: dict[str, Any]) -> str:
    """Return the lock a freeze op names, or ALL_LOCKS for ``all: true``."""
    if params.flag("all"):
        if request.get("lock") is not None:
            raise InvalidArgument("give either lock or all, not both")
        return ALL_LOCKS
    if request.get("lock") is None:
        raise InvalidArgument("name the lock to freeze, or give all: true for every lock")
    return params.lock()
