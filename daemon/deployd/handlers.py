"""The protocol's ops: check each request's fields, call the lease service, shape the result."""

from __future__ import annotations

import functools
import hmac
import logging
import os
import pwd
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from deployd import __version__
from deployd.coordinator import HeldLease
from deployd.errors import (
    InvalidArgument,
    InvalidRequest,
    LeaseLost,
    NotHolder,
    StoreError,
    StoreUnavailable,
)
from deployd.models import Outcome, Owner, Purpose
from deployd.notifiers import Notifier
from deployd.processes import ancestors, parent_pid
from deployd.reports import LEASE_SCHEMA
from deployd.server import PROTOCOL_VERSIONS, Connection, Handler
from deployd.service import AcquireSpec, LeaseService
from deployd.sessions import short_hostname
from deployd_client.durations import format_duration
from deployd_client.names import MAX_TEXT_LENGTHS, MAX_TTL, MAX_WAIT, MIN_TTL, lock_name_problem

logger = logging.getLogger("deployd.handlers")

# A lease id as handed to its holder: the session id, "+", and a secret key.
# Session ids are shown to everyone (status, errors); the key proves that a
# request comes from the holder.
LEASE_KEY_SEPARATOR = "+"
MAX_TEXT = {**MAX_TEXT_LENGTHS, "force_reason": MAX_TEXT_LENGTHS["reason"]}
# The last lines of a command's output that a release may carry, for the
# failure message in Slack: how many, and how long each may be.
OUTPUT_TAIL_LINES = 20
OUTPUT_LINE_LENGTH = 300
# Terminal escape sequences (colours, cursor moves, titles) in captured output.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.)")


@dataclass
class DaemonInfo:
    """Facts about this daemon run, for ``hello`` and ``status``."""

    daemon_id: str
    socket_path: str
    config_file: str | None
    store_kind: str
    store_location: str
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    pid: int = field(default_factory=os.getpid)

    def to_json(self) -> dict[str, Any]:
        """Return the facts for the protocol."""
        return {
            "version": __version__,
            "daemon_id": self.daemon_id,
            "pid": self.pid,
            "socket": self.socket_path,
            "config_file": self.config_file,
            "started_at": self.started_at,
            "uptime": round(time.monotonic() - self.started_monotonic, 3),
            "store": {"kind": self.store_kind, "location": self.store_location},
        }


class Params:
    """Typed access to a request's fields, raising InvalidArgument that names the field."""

    def __init__(self, request: dict[str, Any]) -> None:
        self._request = request

    def text(self, name: str, required: bool = False) -> str | None:
        """Return a string field; control characters are rejected."""
        value = self._request.get(name)
        if value is None:
            if required:
                raise InvalidArgument(f"missing field {name!r}")
            return None
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string, got {_kind(value)} {value!r}")
        limit = MAX_TEXT.get(name)
        if limit is not None and len(value) > limit:
            raise InvalidArgument(f"{name} is {len(value)} characters long; the maximum is {limit}")
        if _CONTROL_CHARACTER.search(value):
            raise InvalidArgument(
                f"{name} {value!r} contains control characters or text-direction marks; "
                "use one plain line"
            )
        return value

    def lock(self, name: str = "lock") -> str:
        """Return a required, valid lock name."""
        value = self._request.get(name)
        if value is None:
            raise InvalidArgument(f"missing field {name!r}: name the lock, for example 'api'")
        problem = lock_name_problem(value)
        if problem:
            raise InvalidArgument(problem)
        assert isinstance(value, str)
        return value

    def integer(
        self, name: str, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        """Return an optional integer field within bounds."""
        value = self._request.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{name} must be an integer, got {_kind(value)} {value!r}")
        if minimum is not None and value < minimum:
            raise InvalidArgument(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise InvalidArgument(f"{name} must be at most {maximum}, got {value}")
        return value

    def seconds(
        self, name: str, minimum: float, maximum: float, allow_zero: bool = False
    ) -> float | None:
        """Return an optional duration field in seconds within bounds."""
        value = self._request.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(
                f"{name} must be a number of seconds, got {_kind(value)} {value!r}"
            )
        seconds = float(value)
        if allow_zero and seconds == 0:
            return 0.0
        if not minimum <= seconds <= maximum:
            raise InvalidArgument(
                f"{name} must be between {format_duration(minimum)} and "
                f"{format_duration(maximum)}, got {value!r}"
            )
        return seconds

    def flag(self, name: str) -> bool:
        """Return an optional boolean field (default False)."""
        value = self._request.get(name, False)
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name} must be true or false, got {_kind(value)} {value!r}")
        return value

    def output_lines(self, name: str) -> tuple[str, ...] | None:
        """Return an optional list of output lines, cleaned for display.

        Only the type is checked strictly: terminal escapes and control
        characters are removed rather than rejected, because a release must
        not fail over what a command printed. The last OUTPUT_TAIL_LINES
        lines are kept, each cut to OUTPUT_LINE_LENGTH characters.
        """
        value = self._request.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
            raise InvalidArgument(f"{name} must be an array of strings, got {_kind(value)}")
        return tuple(_clean_output_line(line) for line in value[-OUTPUT_TAIL_LINES:])


def _clean_output_line(line: str) -> str:
    """Return one line of output without escapes, overwritten parts or control characters."""
    text = _ESCAPE_SEQUENCE.sub("", line)
    # A carriage return starts the line over, as a progress bar does on a terminal.
    text = text.rstrip("\r\n").rpartition("\r")[2].replace("\t", "    ")
    text = "".join(char for char in text if not _is_control(char))
    return text[:OUTPUT_LINE_LENGTH]


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )


def user_of(connection: Connection) -> str:
    """Return the login name of the user at the other end of ``connection``."""
    return _user_name(connection.peer.uid if connection.peer else os.getuid())


@functools.lru_cache(maxsize=64)
def _user_name(uid: int) -> str:
    """Return the login name of ``uid``; cached because every acquire needs it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class Ops:
    """The op handlers of one daemon, bound to its lease service."""

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
            "hello": self.hello,
            "acquire": self.acquire,
            "hold": self.hold,
            "bind": self.bind,
            "release": self.release,
            "event": self.event,
            "force_unlock": self.force_unlock,
        }

    async def hello(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Return the protocol versions, the daemon's identity and its store."""
        return {"versions": list(PROTOCOL_VERSIONS), **self.info.to_json()}

    # --- acquire and hold ---

    def _spec(self, connection: Connection, request: dict[str, Any], kind: str) -> AcquireSpec:
        params = Params(request)
        lock = params.lock()
        ttl = params.seconds("ttl", MIN_TTL, MAX_TTL)
        wait = params.seconds("wait", 0.001, MAX_WAIT, allow_zero=True)
        pid = params.integer("pid", minimum=1)
        force = params.flag("force")
        force_reason = params.text("force_reason")
        if force and not (force_reason or "").strip():
            raise InvalidArgument(
                "force needs a force_reason that is not blank, saying why the lock is taken"
            )
        if pid is None and kind == "process":
            peer_pid = connection.peer_pid
            pid = parent_pid(peer_pid) if peer_pid else None
            if pid is None:
                raise InvalidArgument("missing field 'pid': the process the lease is bound to")
        return AcquireSpec(
            lock=lock,
            user=user_of(connection),
            host=self.host,
            pid=pid,
            ttl=ttl,
            wait=wait or None,
            purpose=Purpose(commit=params.text("commit"), reason=params.text("reason")),
            force=force,
            force_reason=force_reason,
            kind=kind,
        )

    async def acquire(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Take a lock bound to a process (by default the client's parent shell)."""
        if request.get("join") is not None:
            return await self._join(connection, request)
        spec = self._spec(connection, request, "process")
        held = await self._acquire(connection, spec, request)
        return self._lease_result(held)

    async def hold(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Take a lock bound to this connection, or re-attach to a kept lease (``attach``)."""
        attach = Params(request).text("attach")
        if attach is not None:
            return await self._attach(connection, attach, request)
        if request.get("join") is not None:
            return await self._join(connection, request)
        spec = self._spec(connection, request, "connection")
        held = await self._acquire(connection, spec, request)
        return self._lease_result(held)

    async def _join(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Let a deploy's own helper join its lease instead of queueing behind it (nesting).

        ``join`` is the DEPLOYD_LEASE_ID that the deploy's process received. The
        answer is the same lease with ``joined: true``: no new grant, record or
        announcement. A lease that ended is reported as such, so the client
        can take the lock the normal way.
        """
        params = Params(request)
        lock = params.lock()
        join = params.text("join", required=True)
        assert join is not None
        session, _key = split_lease_id(join)
        held = self.service.coordinator.lease(session)
        if held is None:
            ended = self.service.ended(session)
            if ended is not None and ended.error is not None:
                raise await self._lost_error(ended.lock, ended.error)
            raise NotHolder(f"lease {session} is not held by this daemon; nothing to join")
        if held.lock != lock:
            raise InvalidArgument(f"lease {session} is on {held.lock}, not on {lock}")
        self._check_owner(connection, join, lease_id_given=True)
        logger.info("nested caller joined a lease: lock=%s session=%s", lock, session)
        return {**self._lease_result(held), "joined": True}

    async def _attach(
        self, connection: Connection, lease_id: str, request: dict[str, Any]
    ) -> dict[str, Any]:
        """Bind a client's connection again to its lease, after the daemon restarted.

        A lease this daemon does not know (its predecessor was killed and kept
        nothing) is taken over from the store when the store still shows it,
        valid, and the client is the process the lease was bound to.
        """
        session, key = split_lease_id(lease_id)
        if self.service.coordinator.lease(session) is None and self.service.ended(session) is None:
            lease = request.get("lease")
            lock = lease.get("lock") if isinstance(lease, dict) else None
            if lock_name_problem(lock) is not None:
                raise NotHolder(f"no lease {session} is held by this daemon; see 'deployd status'")
            pids = request.get("pids")
            if not isinstance(pids, list) or not all(
                isinstance(pid, int) and not isinstance(pid, bool) for pid in pids
            ):
                pids = []
            assert isinstance(lock, str)
            await self.service.adopt_from_store(lock, session, key, connection.peer_pid, pids)
        elif self.service.coordinator.lease(session) is None:
            ended = self.service.ended(session)
            assert ended is not None
            if ended.error is not None:
                raise await self._lost_error(ended.lock, ended.error)
            raise NotHolder(
                f"lease {session} on {ended.lock} already ended ({ended.outcome.status})"
            )
        self._check_owner(connection, lease_id, lease_id_given=True)
        held = self.service.bind_connection(session, connection)
        connection.bound_leases.add(held.lease_id)
        logger.info("client re-attached: lock=%s session=%s", held.lock, held.lease_id)
        return self._lease_result(held)

    async def _acquire(
        self, connection: Connection, spec: AcquireSpec, request: dict[str, Any]
    ) -> HeldLease:
        request_id = request.get("id")

        def emit(event: dict[str, Any]) -> None:
            connection.push({**event, "id": request_id})

        held = await self.service.acquire(spec, emit)
        if spec.kind == "connection":
            self.service.bind_connection(held.lease_id, connection)
            connection.bound_leases.add(held.lease_id)
        return held

    async def bind(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Bind a held lease to one more process: the command ``deployd run`` started."""
        params = Params(request)
        lease_id = params.text("lease_id", required=True)
        pid = params.integer("pid", minimum=1)
        if pid is None:
            raise InvalidArgument("missing field 'pid': the process to bind the lease to")
        assert lease_id is not None
        self._check_owner(connection, lease_id, lease_id_given=True)
        held = self.service.bind_process(split_lease_id(lease_id)[0], pid)
        return self._lease_result(held)

    def _lease_result(self, held: HeldLease) -> dict[str, Any]:
        binding = self.service.binding(held.lease_id)
        key = binding.key if binding is not None else None
        return {
            "schema": LEASE_SCHEMA,
            "lease": self.service.lease_json(held.lease),
            "lease_id": f"{held.lease_id}{LEASE_KEY_SEPARATOR}{key}" if key else held.lease_id,
            "session_id": held.lease_id,
            "lock": held.lock,
            "token": held.lease.token,
            "takeover": str(held.takeover),
            "waited": round(held.waited, 3),
            "timings": {
                "ttl": held.timings.ttl,
                "renew_every": held.timings.renew_every,
                "renew_deadline": held.timings.renew_deadline,
            },
            "binding": binding.to_json() if binding else None,
            "confirmed_at": held.confirmed_at,
            "degraded": held.degraded,
            "unlocked_reason": held.unlocked_reason if held.degraded else None,
        }

    # --- release ---

    async def release(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """End a lease named by ``lease_id`` or by ``lock``, recording the outcome."""
        params = Params(request)
        lease_id = params.text("lease_id")
        lock = params.lock() if request.get("lock") is not None else None
        if lease_id is None and lock is None:
            raise InvalidArgument("name the lease to release: give lease_id or lock")
        exit_code = params.integer("exit_code", minimum=0, maximum=255)
        revision = params.text("revision")
        outcome = Outcome.from_exit_code(exit_code, revision)
        output_tail = params.output_lines("output_tail")
        if output_tail:
            outcome = replace(outcome, output_tail=output_tail)

        if lease_id is not None:
            given = lease_id
            lease_id, _key = split_lease_id(given)
            held = self.service.coordinator.lease(lease_id)
            if held is None:
                return await self._release_unknown(connection, lease_id, lock, outcome)
            if lock is not None and held.lock != lock:
                raise InvalidArgument(f"lease {lease_id} is on {held.lock}, not on {lock}")
            self._check_owner(connection, given, lease_id_given=True)
        else:
            assert lock is not None
            held_here = self.service.holder_of(lock)
            if held_here is None:
                return await self._release_not_here(connection, lock)
            self._check_owner(connection, held_here.lease_id, lease_id_given=False)
            lease_id = held_here.lease_id

        lease = await self.service.release(lease_id, outcome)
        connection.bound_leases.discard(lease_id)
        return {
            "released": True,
            "lock": lease.lock,
            "lease_id": lease_id,
            "outcome": str(outcome.status),
        }

    def _check_owner(self, connection: Connection, lease_id: str, lease_id_given: bool) -> None:
        """Allow a change to a lease only by its holder.

        The holder is a client that names the lease id with its key (handed
        only to the holder, in DEPLOYD_LEASE_ID), a client on a connection
        bound to the lease, or a process running under one of the lease's
        bound processes. ``lease_id_given`` says that ``lease_id`` came from
        the request, so its key is checked.
        """
        lease_id, key = split_lease_id(lease_id)
        binding = self.service.binding(lease_id)
        key_matches = (
            lease_id_given
            and key is not None
            and binding is not None
            and bool(binding.key)
            and hmac.compare_digest(key, binding.key)
        )
        if key_matches:
            return
        if lease_id in connection.bound_leases:
            return
        peer_pid = connection.peer_pid
        if binding is not None and peer_pid is not None:
            lineage = {peer_pid, *ancestors(peer_pid)}
            if lineage & set(binding.processes):
                return
        held = self.service.coordinator.lease(lease_id)
        lock = held.lock if held else "the lock"
        owner = held.lease.owner if held else None
        holder = (
            f"{owner.user} on {owner.host} (pid {owner.pid}, session {lease_id})"
            if owner
            else lease_id
        )
        raise NotHolder(
            f"{lock} is held by {holder}, not by this shell; release it from the shell that "
            f"took it (its DEPLOYD_LEASE_ID), or take it with "
            f"'deployd force-unlock {lock} --reason TEXT'"
        )

    async def _release_unknown(
        self, connection: Connection, lease_id: str, lock: str | None, outcome: Outcome
    ) -> dict[str, Any]:
        ended = self.service.ended(lease_id)
        if ended is None:
            released = None
            if lock is not None:
                released = await self.service.release_from_store(
                    lock, lease_id, connection.peer_pid, outcome
                )
            if released is not None:
                return {
                    "released": True,
                    "lock": released.lock,
                    "lease_id": lease_id,
                    "outcome": str(outcome.status),
                }
            raise NotHolder(f"no lease {lease_id} is held by this daemon; see 'deployd status'")
        if ended.error is None:
            return {
                "released": False,
                "lock": ended.lock,
                "lease_id": lease_id,
                "outcome": str(ended.outcome.status),
                "message": (
                    f"lease {lease_id} on {ended.lock} had already ended ({ended.outcome.status})"
                ),
            }
        raise await self._lost_error(ended.lock, ended.error)

    async def _lost_error(self, lock: str, error: LeaseLost) -> LeaseLost:
        """Return a LeaseLost whose message names the lock's current holder."""
        current = error.current
        if current is None:
            try:
                with anyio.fail_after(self.service.config.store.timeout):
                    current = await self.service.store.inspect(lock)
            except (StoreError, TimeoutError):
                current = None
        lease = current.lease if current else None
        if lease is not None and not lease.expired:
            now_held = (
                f"; {lock} is now held by {lease.owner.user} on {lease.owner.host} "
                f"(session {lease.holder}, token {lease.token}), which was left untouched"
            )
        else:
            now_held = f"; {lock} is not held by anyone now"
        return LeaseLost(lock, f"{error}{now_held}", current)

    async def _release_not_here(self, connection: Connection, lock: str) -> dict[str, Any]:
        # A script that releases by the lock's name after its lease was lost
        # learns of the loss, as it would by naming the lease id.
        peer_pid = connection.peer_pid
        if peer_pid is not None:
            lost = self.service.lost_lease_of(lock, {peer_pid, *ancestors(peer_pid)})
            if lost is not None and lost.error is not None:
                raise await self._lost_error(lock, lost.error)
        state = await self._inspect(lock)
        lease = state.lease if state else None
        if lease is not None and not lease.expired:
            raise NotHolder(
                f"{lock} is held by {lease.owner.user} on {lease.owner.host} "
                f"(session {lease.holder}), not by this daemon's callers; "
                f"to take it anyway: deployd force-unlock {lock} --reason TEXT"
            )
        return {
            "released": False,
            "lock": lock,
            "message": f"{lock} was not held; nothing to release",
        }

    async def _inspect(self, lock: str) -> Any:
        with anyio.fail_after(self.service.config.store.timeout + 1):
            return await self.service.store.inspect(lock)

    # --- force ---

    async def force_unlock(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Free a lock whoever holds it, recording who forced it and why."""
        params = Params(request)
        lock = params.lock()
        reason = params.text("reason")
        if not reason or not reason.strip():
            raise InvalidArgument(
                "force_unlock needs a reason that is not blank, saying why the lock is taken away"
            )
        by = Owner(user_of(connection), self.host, connection.peer_pid, self.info.daemon_id)
        try:
            before = await self.service.force_unlock(lock, by, reason)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"the store did not respond to force-unlock of {lock} in time"
            ) from exc
        previous = before.lease
        return {
            "lock": lock,
            "forced": previous is not None,
            "previous": previous.to_json() if previous is not None else None,
            "token": before.token + 1 if previous is not None else before.token,
        }

    # --- deploy milestones ---

    async def event(self, connection: Connection, request: dict[str, Any]) -> dict[str, Any]:
        """Report a milestone of the caller's own deploy: ``deployed`` with its revision.

        Only the lease's holder may report, by the same rule as ``release``.
        """
        params = Params(request)
        lock = params.lock()
        name = params.text("event", required=True)
        if name != "deployed":
            raise InvalidArgument(f"unknown event {name!r}; the only event is 'deployed'")
        revision = params.text("revision")
        if not revision:
            raise InvalidArgument("the deployed event needs a revision: --revision REV")
        held = self.service.holder_of(lock)
        if held is None:
            raise NotHolder(
                f"{lock} is not held by a deploy on this workstation; run 'deployd event' "
                "from inside the deploy that holds the lock"
            )
        lease_id = params.text("lease_id")
        if lease_id is not None and split_lease_id(lease_id)[0] == held.lease_id:
            self._check_owner(connection, lease_id, lease_id_given=True)
        else:
            self._check_owner(connection, held.lease_id, lease_id_given=False)
        self.service.report_deployed(held.lease_id, revision)
        return {"lock": lock, "session_id": held.lease_id, "event": name, "revision": revision}


__all__ = ["DaemonInfo", "InvalidRequest", "Ops"]


def split_lease_id(text: str) -> tuple[str, str | None]:
    """Split a lease id as handed to a holder into the session id and the key, if any."""
    session, separator, key = text.rpartition(LEASE_KEY_SEPARATOR)
    if not separator:
        return text, None
    return session, key or None


# Characters that change how text around them is shown: bidirectional
# embeddings, overrides and isolates (Unicode UAX #9).
_TEXT_DIRECTION = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Every character for which _is_control is true, as one class that checks a whole string.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f" + "".join(sorted(_TEXT_DIRECTION)) + "]")


def _is_control(char: str) -> bool:
    """Return whether ``char`` is a C0 or C1 control character, DEL or a text-direction mark."""
    code = ord(char)
    return code < 32 or 127 <= code < 160 or char in _TEXT_DIRECTION
