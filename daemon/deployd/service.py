"""The lease manager's I/O: runs the Coordinator's actions against the store.

LeaseService is what the socket server talks to. It turns requests into
tickets for the Coordinator, performs the store calls the Coordinator asks
for in background tasks, feeds their results back, answers waiting callers,
and watches what each lease is bound to (connections and processes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from deployd.config import Config, LeaseTimings
from deployd.coordinator import (
    Action,
    Attempt,
    Coordinator,
    Dequeue,
    Ended,
    Enqueue,
    Grant,
    Handoff,
    HeldLease,
    Lost,
    Overlap,
    Position,
    RecordUnlocked,
    Refuse,
    Release,
    Renew,
    Renewed,
    Ticket,
    Upgrade,
    Upgraded,
)
from deployd.errors import (
    DeploydError,
    InvalidArgument,
    LeaseLost,
    NotHolder,
    ShuttingDown,
    StoreError,
)
from deployd.events import DeployEvent, EventBus, EventKind, lease_event
from deployd.models import (
    Deployment,
    Lease,
    LockState,
    Outcome,
    OutcomeStatus,
    Owner,
    Purpose,
    Takeover,
)
from deployd.processes import ProcessIdentity, ancestors, identify, is_alive, wait_for_exit
from deployd.reports import EVENT_SCHEMA, eta
from deployd.sessions import new_acquisition_id, new_session_id
from deployd.stores.base import LeaseStore
from deployd.unlocked import UnlockedDeploys, overlap_event
from deployd_client.display import clock_time
from deployd_client.durations import format_duration

logger = logging.getLogger("deployd.leases")

# How many ended leases are remembered, so that a late release or re-attach
# learns what happened to its lease instead of "unknown lease".
ENDED_LEASES_KEPT = 1000

_OUTCOME_EVENTS = {
    OutcomeStatus.SUCCEEDED: EventKind.SUCCEEDED,
    OutcomeStatus.FAILED: EventKind.FAILED,
    OutcomeStatus.RELEASED: EventKind.RELEASED,
    OutcomeStatus.ABANDONED: EventKind.ABANDONED,
}

# How many recent successful deploys of a lock its ETA is estimated from, and
# how long that estimate is reused before it is read again.
DURATION_SAMPLES = 20
DURATION_CACHE_SECONDS = 60.0

# How many recent acquire latencies stats reports percentiles of.
ACQUIRE_LATENCY_SAMPLES = 1000

# The shortest time between two queue_position events to one waiting caller.
POSITION_EVENT_INTERVAL = 0.5

# Seconds that the wait for a process's exit stays open after the last lease
# bound to the process ended, ready for the process's next lease.
EXIT_WATCH_IDLE_KEEP = 10.0

EventSink = Callable[[dict[str, Any]], None]


@dataclass(eq=False)
class Binding:
    """What keeps a lease alive: open connections and live processes.

    The lease ends when the last of them is gone.
    """

    lease_id: str
    kind: str
    key: str = ""
    connections: set[Any] = field(default_factory=set)
    processes: dict[int, ProcessIdentity] = field(default_factory=dict)

    def empty(self) -> bool:
        """Return whether nothing keeps the lease alive any more."""
        return not self.connections and not self.processes

    def to_json(self) -> dict[str, Any]:
        """Return the binding for ``status``."""
        return {
            "kind": self.kind,
            "connections": len(self.connections),
            "pids": sorted(self.processes),
        }


@dataclass(eq=False)
class _ExitWatch:
    """One wait for a process to exit, shared by the bindings of every lease bound to it.

    When its last binding goes, the wait stays open for EXIT_WATCH_IDLE_KEEP
    seconds (the deadline of ``scope``), so that a process taking one lease
    after another reuses it instead of opening a new pidfd for each lease.
    """

    identity: ProcessIdentity
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    bindings: set[Binding] = field(default_factory=set)


@dataclass(eq=False)
class _Pending:
    """A caller waiting for its ticket to be granted or refused."""

    ticket: Ticket
    emit: EventSink
    done: anyio.Event = field(default_factory=anyio.Event)
    held: HeldLease | None = None
    error: DeploydError | None = None
    position_sent_at: float | None = None
    position_due: Position | None = None
    # The last position sent, sent again when the lock's ETA becomes known.
    position_sent: Position | None = None
    waiting_announced: bool = False


@dataclass(frozen=True, slots=True)
class EndedLease:
    """What is remembered of a lease after it ended.

    ``pids`` are the processes that the lease was still bound to when it ended.
    """

    lock: str
    outcome: Outcome
    error: LeaseLost | None
    pids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class AcquireSpec:
    """A validated acquire or hold request."""

    lock: str
    user: str
    host: str
    pid: int | None
    ttl: float | None
    wait: float | None
    purpose: Purpose
    force: bool = False
    force_reason: str | None = None
    kind: str = "process"


class LeaseService:
    """Grant, renew and release leases for the daemon's callers."""

    def __init__(
        self,
        config: Config,
        store: LeaseStore,
        daemon_id: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.daemon_id = daemon_id
        self._clock = clock
        self.coordinator = Coordinator(
            poll_interval=config.store.effective_poll_interval(),
            new_acquisition_id=new_acquisition_id,
            on_store_error=config.on_store_error,
            wall=config.wall_clock(),
            handoff=store.atomic_handoff,
        )
        self.unlocked = UnlockedDeploys(store, self._overlap_found)
        self.events = EventBus()
        # Median deploy duration of each lock's recent deploys, for waiters' ETAs:
        # lock -> (monotonic time fetched, median or None).
        self._durations: dict[str, tuple[float, float | None]] = {}
        # Seconds from request to grant of recent grants that did not wait, for stats.
        self._acquire_latencies: deque[float] = deque(maxlen=ACQUIRE_LATENCY_SAMPLES)
        # Leases to warn about once they pass lease.max_hold: lease id -> monotonic due time.
        self._max_hold_due: dict[str, float] = {}
        # Revisions reported with ``deployd event LOCK deployed``, by lease id, for the outcome.
        self._deployed_revisions: dict[str, str] = {}
        self._pending: dict[int, _Pending] = {}
        self._bindings: dict[str, Binding] = {}
        self._exit_watches: dict[ProcessIdentity, _ExitWatch] = {}
        # The lease that lease_json() converted last, with its JSON.
        self._lease_json: tuple[Lease, dict[str, Any]] | None = None
        self._ended: OrderedDict[str, EndedLease] = OrderedDict()
        # Set when the store call of a requested release has finished, by lease id.
        self._store_releases: dict[str, anyio.Event] = {}
        self._wakeup = anyio.Event()
        self._task_group: TaskGroup | None = None
        self._stopping = False
        self._store_calls = 0

    # --- lifecycle ---

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the timer loop and the store calls until cancelled."""
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            task_group.start_soon(self.unlocked.run)
            task_status.started()
            while True:
                self._execute(self.coordinator.tick(self._clock()))
                # _execute() has just set the event for tick's own actions. The deadline
                # below already covers them, so waiting on that event would spin the loop.
                self._wakeup = anyio.Event()
                deadlines = [
                    self.coordinator.next_deadline(),
                    self._flush_positions(),
                    self._check_max_hold(),
                ]
                deadline = min((time for time in deadlines if time is not None), default=None)
                delay = math.inf if deadline is None else max(0.0, deadline - self._clock())
                with anyio.move_on_after(delay):
                    await self._wakeup.wait()

    def update_config(self, config: Config) -> None:
        """Apply a reloaded config; it affects leases granted from now on."""
        self.config = config
        self.coordinator.on_store_error = config.on_store_error

    # --- requests ---

    def timings(self, ttl: float | None) -> LeaseTimings:
        """Return the timings for a lease of ``ttl`` seconds, or of the configured TTL."""
        return self.config.lease.timings(ttl)

    async def acquire(self, spec: AcquireSpec, emit: EventSink) -> HeldLease:
        """Wait for the lock as ``spec`` asks; return the held lease or raise why not.

        The lease is bound to ``spec.pid`` (when given) from the moment it is
        granted. If the caller is cancelled while waiting, its ticket is
        withdrawn; a grant that arrives afterwards is released again.
        """
        if self._stopping:
            raise ShuttingDown("the daemon is stopping; retry in a moment")
        now = self._clock()
        identity = None
        if spec.pid is not None:
            identity = _identify_or_raise(spec.pid)
        binding = Binding(lease_id="", kind=spec.kind, key=secrets.token_hex(8))
        if identity is not None:
            binding.processes[identity.pid] = identity

        session_id = new_session_id(spec.user, spec.host)
        binding.lease_id = session_id
        ticket = Ticket(
            id=self.coordinator.next_ticket_id(),
            lock=spec.lock,
            session_id=session_id,
            owner=Owner(spec.user, spec.host, spec.pid, self.daemon_id),
            purpose=spec.purpose,
            timings=self.timings(spec.ttl),
            arrived_at=now,
            wait_until=None if not spec.wait else now + spec.wait,
            force=spec.force,
            force_reason=spec.force_reason,
            binding=binding,
        )
        pending = _Pending(ticket, emit)
        self._pending[ticket.id] = pending
        logger.debug(
            "acquire requested: lock=%s session=%s wait=%s force=%s",
            spec.lock,
            session_id,
            spec.wait,
            spec.force,
        )
        actions = self.coordinator.submit(ticket, now)
        # The timer loop skips a ticket's deadlines while its attempt is in flight
        # (Coordinator.next_deadline), so a submit that only starts an attempt
        # moves none of them. Waking the loop would only run it before the store call.
        only_attempt = len(actions) == 1 and isinstance(actions[0], Attempt)
        self._execute(actions, wake=not only_attempt)
        try:
            await pending.done.wait()
        finally:
            if not pending.done.is_set():
                self._pending.pop(ticket.id, None)
                self._execute(self.coordinator.cancel(ticket.id, self._clock()))
                logger.info("acquire withdrawn: lock=%s session=%s", spec.lock, session_id)
        if pending.error is not None:
            raise pending.error
        assert pending.held is not None
        return pending.held

    async def release(self, lease_id: str, outcome: Outcome) -> Lease:
        """End a lease held here and wait until the store has it; raise when it is not held.

        Raises LeaseLost or NotHolder. Waiting for the store (at most its
        timeout) means the outcome is recorded and the lock is free for
        others by the time the caller hears back.
        """
        held = self.coordinator.lease(lease_id)
        if held is None:
            raise self._not_held_error(lease_id)
        reported = self._deployed_revisions.get(lease_id)
        if outcome.revision is None and reported is not None:
            outcome = replace(outcome, revision=reported)
        logger.debug(
            "release requested: lock=%s session=%s outcome=%s",
            held.lock,
            lease_id,
            outcome.status,
        )
        stored = self._store_releases.setdefault(lease_id, anyio.Event())
        self._execute(self.coordinator.release(lease_id, outcome, self._clock()))
        with anyio.move_on_after(self.config.store.timeout + 1):
            await stored.wait()
        return held.lease

    async def force_unlock(self, lock: str, by: Owner, reason: str) -> LockState:
        """Free ``lock`` in the store whoever holds it; a holder of this daemon is told at once."""
        logger.warning(
            "force-unlock requested: lock=%s by=%s@%s reason=%r", lock, by.user, by.host, reason
        )
        self._store_calls += 1
        with anyio.fail_after(self.config.store.timeout + 1):
            before = await self.store.force_unlock(lock, by, reason)
        displaced = before.lease
        if displaced is not None:
            # The event belongs to the deploy that lost the lock, so it lands in its thread.
            self.events.emit(
                DeployEvent(
                    kind=EventKind.FORCED,
                    lock=lock,
                    session_id=displaced.holder,
                    owner=displaced.owner,
                    purpose=displaced.purpose,
                    token=displaced.token or None,
                    details={
                        "holder": displaced.to_json(),
                        "forced_by": f"{by.user}@{by.host}",
                        "force_reason": reason,
                    },
                )
            )
        local = self.coordinator.holder_of(lock)
        if displaced is not None and local is not None and local.lease_id == displaced.holder:
            message = (
                f"lease on {lock} was forced away by {by.user}@{by.host} ({reason}); "
                "stop the deploy, or wait for the lock and start again"
            )
            after = await self.store.inspect(lock)
            self._execute(
                self.coordinator.displace(
                    local.lease_id, LeaseLost(lock, message, after), self._clock()
                )
            )
        return before

    async def adopt_from_store(
        self, lock: str, lease_id: str, key: str | None, peer_pid: int | None, pids: list[int]
    ) -> None:
        """Take over a lease that a killed daemon held, for a client that re-attaches.

        The store must still hold the lease, valid, and the client must be the
        process it was bound to (the lease's owner pid), because this daemon
        cannot check the key of a lease it never granted. Raises NotHolder or
        LeaseLost otherwise.
        """
        with anyio.fail_after(self.config.store.timeout + 1):
            state = await self.store.inspect(lock)
        lease = state.lease
        if lease is None or lease.holder != lease_id:
            raise LeaseLost(
                lock,
                f"lease {lease_id} is no longer held: its daemon stopped and the lease "
                "expired or was taken",
                state,
            )
        if lease.expired:
            raise LeaseLost(lease.lock, f"lease {lease_id} on {lease.lock} expired", state)
        if peer_pid is None or peer_pid != lease.owner.pid:
            raise NotHolder(
                f"lease {lease_id} on {lease.lock} was bound to pid {lease.owner.pid}; "
                "only that process can re-attach to it"
            )
        now = self._clock()
        timings = self.timings(lease.ttl)
        held = HeldLease(
            lease=lease,
            timings=timings,
            binding=None,
            # The store's view bounds the last confirmation from below.
            confirmed_at=now - max(0.0, lease.ttl - lease.expires_in),
            next_renew_at=now,
            granted_at=now,
            waited=0.0,
        )
        binding = Binding(lease_id=lease_id, kind="connection", key=key or "")
        for pid in {peer_pid, *pids}:
            identity = identify(pid) if pid > 1 else None
            if identity is not None:
                binding.processes[identity.pid] = identity
        logger.warning(
            "taking over a lease left by a daemon that stopped without keeping it: "
            "lock=%s session=%s token=%d",
            lease.lock,
            lease_id,
            lease.token,
        )
        self.adopt(held, binding)

    async def release_from_store(
        self, lock: str, lease_id: str, peer_pid: int | None, outcome: Outcome
    ) -> Lease | None:
        """Release a lease that a killed daemon held, for the process it was bound to.

        Returns the released lease, or None when the store does not show it or
        the caller does not run under the lease's owner process.
        """
        if peer_pid is None:
            return None
        with anyio.fail_after(self.config.store.timeout + 1):
            state = await self.store.inspect(lock)
        lease = state.lease
        if lease is None or lease.holder != lease_id or lease.owner.pid is None:
            return None
        if lease.owner.pid not in {peer_pid, *ancestors(peer_pid)}:
            return None
        with anyio.fail_after(self.config.store.timeout + 1):
            released = await self.store.release(lease, outcome)
        if not released:
            return None
        logger.info(
            "released a lease left by a daemon that stopped: lock=%s session=%s", lock, lease_id
        )
        return lease

    def report_deployed(self, lease_id: str, revision: str) -> HeldLease:
        """Announce that the deploy holding ``lease_id`` now serves ``revision``.

        The revision is also recorded as the deploy's outcome when its release
        names none (``deployd run`` never does). Raises when the lease is not held.
        """
        held = self.coordinator.lease(lease_id)
        if held is None:
            raise self._not_held_error(lease_id)
        self._deployed_revisions[lease_id] = revision
        logger.info(
            "deploy reported: lock=%s session=%s revision=%s", held.lock, lease_id, revision
        )
        self.events.emit(lease_event(EventKind.DEPLOYED, held.lease, revision=revision))
        return held

    def ended(self, lease_id: str) -> EndedLease | None:
        """Return what happened to a lease that has ended, if it is still remembered."""
        return self._ended.get(lease_id)

    def lost_lease_of(self, lock: str, pids: set[int]) -> EndedLease | None:
        """Return the latest remembered lease on ``lock`` that was lost while bound to ``pids``."""
        for ended in reversed(self._ended.values()):
            if ended.lock == lock and ended.error is not None and ended.pids & pids:
                return ended
        return None

    def _not_held_error(self, lease_id: str) -> DeploydError:
        ended = self._ended.get(lease_id)
        if ended is not None and ended.error is not None:
            return ended.error
        if ended is not None:
            return NotHolder(
                f"lease {lease_id} on {ended.lock} already ended ({ended.outcome.status}); "
                "nothing to release"
            )
        return NotHolder(f"no lease {lease_id} is held by this daemon; see 'deployd status'")

    def binding(self, lease_id: str) -> Binding | None:
        """Return what the lease is bound to."""
        return self._bindings.get(lease_id)

    def bind_connection(self, lease_id: str, connection: Any) -> HeldLease:
        """Bind a held lease to an open connection (hold, or re-attach after a restart)."""
        held = self.coordinator.lease(lease_id)
        if held is None:
            raise self._not_held_error(lease_id)
        self._bindings[lease_id].connections.add(connection)
        return held

    def bind_process(self, lease_id: str, pid: int) -> HeldLease:
        """Bind a held lease to one more process, such as the command ``deployd run`` started."""
        held = self.coordinator.lease(lease_id)
        if held is None:
            raise self._not_held_error(lease_id)
        identity = _identify_or_raise(pid)
        binding = self._bindings[lease_id]
        if identity.pid not in binding.processes:
            binding.processes[identity.pid] = identity
            self._watch(binding, identity)
        return held

    def unbind_connection(self, connection: Any) -> None:
        """Forget a closed connection; end the leases it was the last thing keeping alive."""
        for binding in list(self._bindings.values()):
            if connection in binding.connections:
                binding.connections.discard(connection)
                self._end_if_unbound(binding, "its client connection closed")

    # --- queries ---

    def holder_of(self, lock: str) -> HeldLease | None:
        """Return this daemon's lease on ``lock``, if any."""
        return self.coordinator.holder_of(lock)

    def local_queue(self, lock: str) -> list[Ticket]:
        """Return the callers queued here for ``lock``."""
        return self.coordinator.queue(lock)

    def held_leases(self) -> list[HeldLease]:
        """Return the leases this daemon holds."""
        return self.coordinator.leases()

    @property
    def store_calls(self) -> int:
        """Return how many store calls this daemon has made (for benchmarks)."""
        return self._store_calls

    # --- restart ---

    def adopt(self, held: HeldLease, binding: Binding) -> None:
        """Resume a lease kept by the previous daemon; it is renewed at once."""
        binding.lease_id = held.lease_id
        held.binding = binding
        self._bindings[held.lease_id] = binding
        self._execute(self.coordinator.adopt(held))
        for identity in binding.processes.values():
            self._watch(binding, identity)
        logger.info(
            "lease resumed after restart: lock=%s session=%s token=%d pids=%s",
            held.lock,
            held.lease_id,
            held.lease.token,
            sorted(binding.processes),
        )
        self._wake()

    async def stop(self) -> list[tuple[HeldLease, Binding]]:
        """Stop taking requests; release leases whose holders are gone; return the others.

        The returned leases are neither released nor renewed any more: the
        caller stores them for the next daemon, which resumes them, or they
        expire after their TTL.
        """
        self._stopping = True
        for pending in list(self._pending.values()):
            self._execute(self.coordinator.cancel(pending.ticket.id, self._clock()))
            self._answer(pending, error=ShuttingDown("the daemon is stopping; retry in a moment"))

        kept: list[tuple[HeldLease, Binding]] = []
        releases: list[HeldLease] = []
        for held in self.coordinator.leases():
            binding = self._bindings.get(held.lease_id)
            alive = binding is not None and any(is_alive(p) for p in binding.processes.values())
            if alive and binding is not None:
                kept.append((held, binding))
            else:
                releases.append(held)

        with anyio.move_on_after(self.config.store.timeout):
            async with anyio.create_task_group() as task_group:
                for held in releases:
                    outcome = Outcome(
                        OutcomeStatus.ABANDONED, detail="holder gone when the daemon stopped"
                    )
                    if held.degraded:
                        self.unlocked.record(held, outcome)
                    else:
                        task_group.start_soon(self._release_at_stop, held, outcome)
        for watch in list(self._exit_watches.values()):
            watch.scope.cancel()
        for held, binding in kept:
            logger.info(
                "lease kept for the next daemon: lock=%s session=%s pids=%s",
                held.lock,
                held.lease_id,
                sorted(binding.processes),
            )
        return kept

    async def _release_at_stop(self, held: HeldLease, outcome: Outcome) -> None:
        try:
            await self.store.release(held.lease, outcome)
            logger.info("lease released at stop: lock=%s session=%s", held.lock, held.lease_id)
        except StoreError as exc:
            logger.warning(
                "release at stop failed, the lease expires after its TTL: lock=%s session=%s: %s",
                held.lock,
                held.lease_id,
                exc,
            )

    # --- action runner ---

    def _wake(self) -> None:
        self._wakeup.set()

    def _spawn(self, function: Callable[..., Any], *args: Any) -> None:
        assert self._task_group is not None, "LeaseService.run() is not running"
        self._task_group.start_soon(function, *args)

    def _execute(self, actions: list[Action], wake: bool = True) -> None:
        """Carry out the coordinator's actions, and wake the timer loop if ``wake`` is true."""
        for action in actions:
            match action:
                # First, because a grant of a contended lock moves every waiter up one place.
                case Position():
                    self._position(action)
                case Attempt():
                    self._spawn(self._attempt, action)
                case Enqueue():
                    self._spawn(self._enqueue, action)
                case Dequeue():
                    self._spawn(self._dequeue, action)
                case Renew():
                    self._spawn(self._renew, action)
                case Release():
                    self._spawn(self._release, action)
                case Handoff():
                    self._spawn(self._handoff, action)
                case Grant():
                    self._granted(action)
                case Refuse():
                    self._refused(action)
                case Lost():
                    self._lost(action)
                case Ended():
                    self._ended_lease(action)
                case Renewed():
                    self._push(action.held, renewed_event(action.held))
                case Upgrade():
                    self._spawn(self._upgrade, action)
                case Upgraded():
                    self._spawn(self._upgraded, action)
                case Overlap():
                    self._overlap_live(action)
                case RecordUnlocked():
                    self.unlocked.record(action.held, action.outcome)
        if wake:
            self._wake()

    async def _attempt(self, action: Attempt) -> None:
        sent_at = self._clock()
        self._store_calls += 1
        result: Any
        try:
            result = await self.store.try_acquire(action.request)
        except StoreError as exc:
            logger.warning("acquire failed in the store: lock=%s: %s", action.ticket.lock, exc)
            result = exc
        except Exception as exc:
            logger.exception("unexpected error from the store: lock=%s", action.ticket.lock)
            result = StoreError(f"unexpected store error: {exc}")
        self._execute(self.coordinator.attempt_done(action.ticket, result, sent_at, self._clock()))

    async def _upgrade(self, action: Upgrade) -> None:
        held = action.held
        sent_at = self._clock()
        self._store_calls += 1
        result: Any
        try:
            result = await self.store.try_acquire(action.request)
        except StoreError as exc:
            logger.debug("store still unreachable for unlocked lease: lock=%s: %s", held.lock, exc)
            result = exc
        except Exception as exc:
            logger.exception("unexpected error from the store: lock=%s", held.lock)
            result = StoreError(f"unexpected store error: {exc}")
        self._execute(self.coordinator.upgrade_done(held, result, sent_at, self._clock()))

    async def _upgraded(self, action: Upgraded) -> None:
        held = action.held
        logger.warning(
            "lease taken in the store after running without a lock since %s: lock=%s session=%s "
            "token=%d",
            clock_time(held.unlocked_since or 0),
            held.lock,
            held.lease_id,
            held.lease.token,
        )
        self._push(
            held,
            {
                "event": "lease_locked",
                "schema": EVENT_SCHEMA,
                "lock": held.lock,
                "lease_id": held.lease_id,
                "token": held.lease.token,
                "confirmed_at": held.confirmed_at,
                "message": f"the store is back: {held.lock} is now locked for this deploy "
                f"with fencing token {held.lease.token}",
            },
        )
        await self.unlocked.check_upgraded(held)

    def _overlap_live(self, action: Overlap) -> None:
        held = action.held
        other = action.state.lease
        assert other is not None
        message = (
            f"{held.lock} is held in the store by {other.owner.user} on {other.owner.host} "
            f"(session {other.holder}, token {other.token}) while this deploy runs without a lock"
        )
        logger.warning("overlap: %s (session %s)", message, held.lease_id)
        self.events.emit(
            lease_event(EventKind.OVERLAP, held.lease, message=message, holder=other.to_json())
        )
        self._push(
            held,
            {
                "event": "overlap",
                "schema": EVENT_SCHEMA,
                "lock": held.lock,
                "lease_id": held.lease_id,
                "message": message,
            },
        )

    def _overlap_found(
        self, held: HeldLease | None, own: Deployment, others: list[Deployment]
    ) -> None:
        event = overlap_event(own, others)
        self.events.emit(
            DeployEvent(
                kind=EventKind.OVERLAP,
                lock=own.lock,
                session_id=own.session_id,
                owner=own.owner,
                purpose=own.purpose,
                token=None,
                details={"message": event["message"], "others": event["others"]},
            )
        )
        if held is not None:
            self._push(held, event)

    def _push(self, held: HeldLease, event: dict[str, Any]) -> None:
        """Push an event to every connection the lease is bound to."""
        binding = self._bindings.get(held.lease_id)
        if binding is None:
            return
        for connection in list(binding.connections):
            connection.push(event)

    async def _enqueue(self, action: Enqueue) -> None:
        ticket = action.ticket
        self._store_calls += 1
        error: StoreError | None = None
        try:
            await self.store.enqueue(
                ticket.lock, ticket.session_id, ticket.owner, ticket.purpose, ticket.timings.ttl
            )
        except StoreError as exc:
            logger.warning(
                "waiter entry not written: lock=%s session=%s: %s",
                ticket.lock,
                ticket.session_id,
                exc,
            )
            error = exc
        except Exception as exc:
            logger.exception("unexpected error writing a waiter entry: lock=%s", ticket.lock)
            error = StoreError(str(exc))
        self._execute(self.coordinator.enqueue_done(ticket, error, self._clock()))

    async def _dequeue(self, action: Dequeue) -> None:
        self._store_calls += 1
        try:
            await self.store.dequeue(action.lock, action.waiter_id)
        except Exception as exc:
            logger.warning(
                "waiter entry not removed, it expires by itself: lock=%s session=%s: %s",
                action.lock,
                action.waiter_id,
                exc,
            )

    async def _renew(self, action: Renew) -> None:
        held = action.held
        sent_at = self._clock()
        self._store_calls += 1
        result: Any
        try:
            result = await self.store.renew(held.lease)
        except LeaseLost as exc:
            result = exc
        except StoreError as exc:
            logger.warning(
                "renewal failed, retrying: lock=%s session=%s failures=%d: %s",
                held.lock,
                held.lease_id,
                held.renew_failures + 1,
                exc,
            )
            result = exc
        except Exception as exc:
            logger.exception(
                "unexpected error renewing: lock=%s session=%s", held.lock, held.lease_id
            )
            result = StoreError(str(exc))
        self._execute(self.coordinator.renew_done(held, result, sent_at, self._clock()))

    async def _release(self, action: Release) -> None:
        held = action.held
        self._store_calls += 1
        try:
            released = await self.store.release(held.lease, action.outcome)
            self._check_released(held, action.outcome, released)
        except Exception as exc:
            self._log_failed_release(held, exc)
        finally:
            self._release_stored(held)
            self._execute(self.coordinator.release_done(held.lock, self._clock()))

    async def _handoff(self, action: Handoff) -> None:
        held = action.held
        ticket = action.attempt.ticket
        sent_at = self._clock()
        self._store_calls += 1
        result: Any = StoreError("the release and grant were cancelled")
        try:
            released, result = await self.store.release_and_acquire(
                held.lease, action.outcome, action.attempt.request
            )
            self._check_released(held, action.outcome, released)
        except StoreError as exc:
            self._log_failed_release(held, exc)
            result = exc
        except Exception as exc:
            logger.exception("unexpected error from the store: lock=%s", held.lock)
            result = StoreError(f"unexpected store error: {exc}")
        finally:
            # The grant goes out before the response to the releasing caller,
            # because the callers waiting in line wait for the grant.
            self._execute(self.coordinator.handoff_done(ticket, result, sent_at, self._clock()))
            self._release_stored(held)

    def _check_released(self, held: HeldLease, outcome: Outcome, released: bool) -> None:
        if not released and outcome.status is not OutcomeStatus.LOST:
            logger.warning(
                "release found the lock no longer ours: lock=%s session=%s",
                held.lock,
                held.lease_id,
            )

    def _log_failed_release(self, held: HeldLease, error: Exception) -> None:
        logger.warning(
            "release failed, the lease expires after its TTL: lock=%s session=%s: %s",
            held.lock,
            held.lease_id,
            error,
        )

    def _release_stored(self, held: HeldLease) -> None:
        """Wake the caller whose release waits for the store."""
        stored = self._store_releases.pop(held.lease_id, None)
        if stored is not None:
            stored.set()

    # --- answers and events ---

    def _answer(
        self, pending: _Pending, held: HeldLease | None = None, error: DeploydError | None = None
    ) -> None:
        self._pending.pop(pending.ticket.id, None)
        pending.held = held
        pending.error = error
        pending.done.set()

    def _granted(self, action: Grant) -> None:
        held = action.held
        binding = held.binding
        assert isinstance(binding, Binding)
        self._bindings[held.lease_id] = binding
        log_line = (
            "lease granted: lock=%s session=%s token=%d takeover=%s waited=%.3fs",
            held.lock,
            held.lease_id,
            held.lease.token,
            held.takeover,
            held.waited,
        )
        if not action.ticket.blocked:
            self._acquire_latencies.append(self._clock() - action.ticket.arrived_at)
        self._announce_grant(held)
        pending = self._pending.get(action.ticket.id)
        if pending is None:
            # No caller to respond to. The coordinator does not grant a withdrawn
            # request (it ends that lease itself), so this is only a safeguard.
            logger.info(*log_line)
        else:
            self._answer(pending, held=held)
            _log_after_wakeups(*log_line)
        # Watches start after the grant's line is queued, because the watch of a
        # process that has already exited ends the lease, and logs that, at once.
        for identity in binding.processes.values():
            self._watch(binding, identity)

    def lease_json(self, lease: Lease) -> dict[str, Any]:
        """Return ``lease.to_json()``, reused while the same lease is asked for again.

        The response to a grant and the events of every caller waiting behind it
        carry the same holder lease. The dict is shared, so callers must not change it.
        """
        if self._lease_json is None or self._lease_json[0] is not lease:
            self._lease_json = (lease, lease.to_json())
        return self._lease_json[1]

    def acquire_latencies(self) -> list[float]:
        """Return the request-to-grant times of recent grants that did not wait, in seconds."""
        return list(self._acquire_latencies)

    def _announce_grant(self, held: HeldLease) -> None:
        lease = held.lease
        self._max_hold_due[held.lease_id] = held.granted_at + self.config.lease.max_hold
        replaced = held.replaced.to_json() if held.replaced is not None else None
        if held.degraded:
            self.events.emit(lease_event(EventKind.UNLOCKED, lease, message=held.unlocked_reason))
        elif held.takeover is Takeover.FORCED:
            self.events.emit(
                lease_event(
                    EventKind.FORCED, lease, holder=replaced, force_reason=held.force_reason
                )
            )
        elif held.takeover is Takeover.EXPIRED:
            self.events.emit(lease_event(EventKind.STALE_TAKEOVER, lease, holder=replaced))
        self.events.emit(
            lease_event(
                EventKind.STARTED,
                lease,
                waited=round(held.waited, 3),
                takeover=str(held.takeover),
                unlocked=held.degraded or None,
            )
        )

    def _check_max_hold(self) -> float | None:
        """Announce leases held longer than lease.max_hold; return when the next one is due."""
        now = self._clock()
        next_due: float | None = None
        for lease_id, due in list(self._max_hold_due.items()):
            held = self.coordinator.lease(lease_id)
            if held is None:
                del self._max_hold_due[lease_id]
                continue
            if now >= due:
                del self._max_hold_due[lease_id]
                logger.warning(
                    "lease held longer than lease.max_hold (%s): lock=%s session=%s",
                    format_duration(self.config.lease.max_hold),
                    held.lock,
                    lease_id,
                )
                self.events.emit(
                    lease_event(
                        EventKind.MAX_HOLD,
                        held.lease,
                        held_for=round(now - held.granted_at, 3),
                        max_hold=self.config.lease.max_hold,
                    )
                )
            elif next_due is None or due < next_due:
                next_due = due
        return next_due

    def _refused(self, action: Refuse) -> None:
        logger.info(
            "acquire rejected: lock=%s session=%s: %s",
            action.ticket.lock,
            action.ticket.session_id,
            action.error,
        )
        pending = self._pending.get(action.ticket.id)
        if pending is not None:
            self._answer(pending, error=action.error)

    def _position(self, action: Position) -> None:
        """Send a queue_position event, at most one per POSITION_EVENT_INTERVAL per caller.

        With many callers queued for one lock every grant moves all of them
        up, so unthrottled events would cost the daemon more than the grants.
        A held-back event is sent by the timer loop once the interval is over.
        """
        pending = self._pending.get(action.ticket.id)
        if pending is None:
            return
        if not pending.waiting_announced and action.holder is not None:
            pending.waiting_announced = True
            ticket = action.ticket
            self.events.emit(
                DeployEvent(
                    kind=EventKind.WAITING,
                    lock=ticket.lock,
                    session_id=ticket.session_id,
                    owner=ticket.owner,
                    purpose=ticket.purpose,
                    token=None,
                    details={"holder": self.lease_json(action.holder), "position": action.position},
                )
            )
        now = self._clock()
        sent_at = pending.position_sent_at
        if sent_at is not None and now - sent_at < POSITION_EVENT_INTERVAL:
            pending.position_due = action
            return
        self._send_position(pending, action, now)

    def _send_position(self, pending: _Pending, action: Position, now: float) -> None:
        pending.position_sent_at = now
        pending.position_due = None
        pending.position_sent = action
        holder = action.holder
        holder_age = max(0.0, time.time() - holder.acquired_at) if holder is not None else 0.0
        median = self._median_duration(action.ticket.lock)
        pending.emit(
            {
                "event": "queue_position",
                "schema": EVENT_SCHEMA,
                "lock": action.ticket.lock,
                "position": action.position,
                "holder": self.lease_json(holder) if holder is not None else None,
                "waiting_for": round(now - action.ticket.arrived_at, 3),
                "eta": eta(median, holder_age, action.position),
                "typical_duration": round(median, 3) if median is not None else None,
                "frozen": action.frozen.to_json() if action.frozen is not None else None,
            }
        )

    def _median_duration(self, lock: str) -> float | None:
        """Return the lock's median recent deploy duration, refreshing it in the background."""
        now = self._clock()
        cached = self._durations.get(lock)
        if cached is None or now - cached[0] > DURATION_CACHE_SECONDS:
            # Marks the refresh as started, so one waiter's events start one refresh.
            self._durations[lock] = (now, cached[1] if cached else None)
            self._spawn(self._refresh_duration, lock)
        return cached[1] if cached else None

    async def _refresh_duration(self, lock: str) -> None:
        try:
            with anyio.fail_after(self.config.store.timeout + 1):
                records = await self.store.history(lock, DURATION_SAMPLES)
        except (StoreError, TimeoutError) as exc:
            logger.debug("no recent durations for the ETA of %s: %s", lock, exc)
            return
        durations = [
            duration
            for record in records
            if record.outcome == OutcomeStatus.SUCCEEDED.value
            and (duration := record.duration) is not None
        ]
        median = statistics.median(durations) if durations else None
        self._durations[lock] = (self._clock(), median)
        if median is None:
            return
        # The first events of a wait went out before the durations were read,
        # and a caller queued behind a holder of this daemon gets no more
        # until the line moves, so its ETA is sent now.
        again: list[Action] = [
            pending.position_sent
            for pending in self._pending.values()
            if pending.position_sent is not None
            and pending.position_sent.ticket.lock == lock
            and pending.position_due is None
        ]
        self._execute(again)

    def _flush_positions(self) -> float | None:
        """Send held-back position events that are due; return when the next one is."""
        now = self._clock()
        next_due: float | None = None
        for pending in self._pending.values():
            if pending.position_due is None or pending.position_sent_at is None:
                continue
            due = pending.position_sent_at + POSITION_EVENT_INTERVAL
            if now >= due:
                self._send_position(pending, pending.position_due, now)
            elif next_due is None or due < next_due:
                next_due = due
        return next_due

    def _lost(self, action: Lost) -> None:
        held = action.held
        new_holder = action.error.new_holder
        self.events.emit(
            lease_event(
                EventKind.LOST,
                held.lease,
                message=str(action.error),
                holder=new_holder.to_json() if new_holder else None,
            )
        )
        logger.warning(
            "lease lost: lock=%s session=%s token=%d new_holder=%s: %s",
            held.lock,
            held.lease_id,
            held.lease.token,
            new_holder.holder if new_holder else None,
            action.error,
        )
        binding = self._bindings.get(held.lease_id)
        if binding is None:
            return
        event = {
            "event": "lease_lost",
            "schema": EVENT_SCHEMA,
            "lock": held.lock,
            "lease_id": held.lease_id,
            "message": str(action.error),
            "new_holder": new_holder.to_json() if new_holder else None,
        }
        for connection in list(binding.connections):
            connection.push(event)

    def _ended_lease(self, action: Ended) -> None:
        held = action.held
        binding = self._bindings.pop(held.lease_id, None)
        if binding is not None:
            self._unwatch(binding)
        error: LeaseLost | None = None
        if action.outcome.status is OutcomeStatus.LOST:
            error = LeaseLost(held.lock, action.outcome.detail or f"lease on {held.lock} was lost")
        pids = frozenset(binding.processes) if binding is not None else frozenset()
        self._ended[held.lease_id] = EndedLease(held.lock, action.outcome, error, pids)
        self._max_hold_due.pop(held.lease_id, None)
        self._deployed_revisions.pop(held.lease_id, None)
        kind = _OUTCOME_EVENTS.get(action.outcome.status)
        if kind is not None:
            self.events.emit(
                lease_event(
                    kind,
                    held.lease,
                    exit_code=action.outcome.exit_code,
                    revision=action.outcome.revision,
                    detail=action.outcome.detail,
                    duration=round(self._clock() - held.granted_at, 3),
                    output_tail=action.outcome.output_tail,
                    unlocked=held.degraded or None,
                )
            )
        while len(self._ended) > ENDED_LEASES_KEPT:
            self._ended.popitem(last=False)
        logger.info(
            "lease ended: lock=%s session=%s token=%d outcome=%s",
            held.lock,
            held.lease_id,
            held.lease.token,
            action.outcome.status,
        )

    # --- process watching ---

    def _watch(self, binding: Binding, identity: ProcessIdentity) -> None:
        """End the binding's lease, if nothing else keeps it, when the process exits."""
        watch = self._exit_watches.get(identity)
        # A watch whose idle time ran out is cancelled but may not have finished yet.
        if watch is None or watch.scope.cancel_called:
            watch = _ExitWatch(identity)
            self._exit_watches[identity] = watch
            self._spawn(self._watch_process, watch)
        watch.bindings.add(binding)
        watch.scope.deadline = math.inf

    def _unwatch(self, binding: Binding) -> None:
        """Stop watching the binding's processes for it; idle watches close later."""
        for identity in binding.processes.values():
            watch = self._exit_watches.get(identity)
            if watch is None or binding not in watch.bindings:
                continue
            watch.bindings.discard(binding)
            if not watch.bindings:
                watch.scope.deadline = anyio.current_time() + EXIT_WATCH_IDLE_KEEP

    async def _watch_process(self, watch: _ExitWatch) -> None:
        identity = watch.identity
        try:
            with watch.scope:
                await wait_for_exit(identity)
        finally:
            if self._exit_watches.get(identity) is watch:
                del self._exit_watches[identity]
        if watch.scope.cancelled_caught:
            return
        for binding in list(watch.bindings):
            binding.processes.pop(identity.pid, None)
            logger.info("bound process exited: session=%s pid=%d", binding.lease_id, identity.pid)
            self._end_if_unbound(binding, f"its process {identity.pid} exited")

    def _end_if_unbound(self, binding: Binding, why: str) -> None:
        if not binding.empty() or self._stopping:
            return
        held = self.coordinator.lease(binding.lease_id)
        if held is None:
            return
        outcome = Outcome(OutcomeStatus.ABANDONED, detail=f"holder gone: {why}")
        self._execute(self.coordinator.release(binding.lease_id, outcome, self._clock()))


def _log_after_wakeups(message: str, *args: object) -> None:
    """Log ``message`` at INFO after the tasks that are ready to run now.

    It is called right after a caller's response is set. The request handler
    then sends that response before the line is formatted and written, which
    takes about 0.09 ms in a daemon idle between requests (docs/benchmarks.md,
    finding 9).
    """
    # NOTE: asyncio's own call_soon, as anyio has none: the daemon runs on anyio's
    # asyncio backend, which the Firestore store's grpc.aio channel needs too.
    asyncio.get_running_loop().call_soon(functools.partial(logger.info, message, *args))


def _identify_or_raise(pid: int) -> ProcessIdentity:
    identity = identify(pid)
    if identity is None:
        raise InvalidArgument(
            f"process {pid} does not exist, so a lease cannot be bound to it; "
            "pass --pid with a running process, such as the deploy script's $$"
        )
    return identity


def renewed_event(held: HeldLease) -> dict[str, Any]:
    """Return the lease_renewed event: when the renewal was confirmed, on the daemon's clock.

    The daemon's clock is time.monotonic(), which on Linux and macOS is one
    clock for every process of the machine, so a client can compare it with
    its own to watch the renew deadline.
    """
    return {
        "event": "lease_renewed",
        "schema": EVENT_SCHEMA,
        "lock": held.lock,
        "lease_id": held.lease_id,
        "token": held.lease.token,
        "confirmed_at": held.confirmed_at,
        "expires_in": held.lease.expires_in,
    }
