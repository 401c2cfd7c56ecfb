"""The daemon's error types.

Each error carries the protocol error code that the client maps to an exit
code, and a message that names the value at fault and what to do next. Errors
from SQLite, Google's client library and sockets are translated into these at
the boundary where they occur, with the cause chained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployd.models import Lease, LockState


class DeploydError(Exception):
    """Base class of every error the daemon reports to a client."""

    code = "internal"

    def details(self) -> dict[str, Any]:
        """Return extra fields for the protocol's error object."""
        return {}


class InvalidRequest(DeploydError):
    """A request is malformed or one of its fields has a wrong type or value."""

    code = "bad_request"


class InvalidArgument(InvalidRequest):
    """A field of a well-formed request holds a value the daemon rejects."""

    code = "invalid_argument"


class ConfigError(DeploydError):
    """The configuration is invalid: names the key, the value and the rule.

    The message masks secrets (``deployd_client.redaction``): a value that
    contains one is shown as ``'[masked]'``, and one that the rule quotes is
    masked there too. ``shown`` replaces the value's ``repr`` in the message,
    for a value that the file does not contain as such (a derived default).
    ``value`` and ``rule`` keep what was passed, so never print them alone.
    """

    code = "config_invalid"

    def __init__(
        self,
        key: str,
        value: object,
        rule: str,
        source: str | None = None,
        shown: str | None = None,
    ) -> None:
        from deployd_client.redaction import MASK, mask_secrets

        self.key = key
        self.value = value
        self.rule = rule
        self.source = source
        if shown is None:
            shown = repr(value)
            if mask_secrets(shown, key) != shown:
                shown = repr(MASK)
        where = f" in {mask_secrets(source)}" if source else ""
        rule_text = mask_secrets(rule, key)
        if isinstance(value, str) and len(value) >= 8 and shown == repr(MASK):
            rule_text = rule_text.replace(value, MASK)
        super().__init__(f"invalid {mask_secrets(key)} = {shown}{where}: {rule_text}")

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        """Return every invalid key this error reports, in the order they were found."""
        return (self,)


class ConfigErrors(ConfigError):
    """Several keys of the configuration are invalid; ``problems`` lists them all.

    Its attributes are those of the first problem. The message gives every
    problem on one line, each starting with ``invalid``.
    """

    def __init__(self, problems: list[ConfigError]) -> None:
        first = problems[0]
        super().__init__(first.key, first.value, first.rule, first.source)
        self._problems = tuple(problems)
        self.args = ("; also ".join(str(problem) for problem in problems),)

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        return self._problems


class StoreError(DeploydError):
    """The lease store failed an operation."""

    code = "store_unavailable"


class StoreUnavailable(StoreError):
    """The lease store could not be reached or did not answer within its deadline."""


class StoreBusy(StoreError):
    """The lease store stayed locked by other writers for longer than the busy limit."""

    code = "store_busy"


class LeaseLost(DeploydError):
    """A lease is no longer ours: it expired, was forced away or was released by someone else.

    ``current`` is the store's view of the lock when the loss was found, so the
    message can name the new holder.
    """

    code = "lease_lost"

    def __init__(self, lock: str, message: str, current: LockState | None = None) -> None:
        self.lock = lock
        self.current = current
        super().__init__(message)

    @property
    def new_holder(self) -> Lease | None:
        """Return the lease that replaced ours, when the store showed one."""
        return self.current.lease if self.current else None


class LockBusy(DeploydError):
    """The lock is held by another holder, or waiters are queued ahead of the caller."""

    code = "lock_busy"

    def __init__(self, message: str, state: LockState | None = None) -> None:
        self.state = state
        super().__init__(message)

    def details(self) -> dict[str, Any]:
        """Return the lock's state (holder, waiters, freeze), when the store showed it."""
        return {"lock_state": self.state.to_json()} if self.state is not None else {}


class WaitTimedOut(LockBusy):
    """A caller waited for the lock for as long as it allowed and did not get it."""

    code = "wait_timeout"


class Frozen(LockBusy):
    """The lock, or every lock, is frozen: no new grants until the freeze ends."""

    code = "frozen"


class NotHolder(DeploydError):
    """A caller tried to release or change a lease that belongs to someone else."""

    code = "not_holder"


class ShuttingDown(DeploydError):
    """The daemon is stopping and takes no new requests."""

    code = "shutting_down"
