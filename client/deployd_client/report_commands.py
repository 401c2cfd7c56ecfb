"""The commands that read history and stats, and that freeze and unfreeze locks."""

from __future__ import annotations

import sys
import time

from deployd_client import exitcodes
from deployd_client.autostart import connect
from deployd_client.cli import RESPONSE_TIMEOUT, warn
from deployd_client.display import (
    ALL_LOCKS,
    clock_time,
    describe_freeze,
    describe_freeze_origin,
    use_color,
)
from deployd_client.durations import parse_duration
from deployd_client.names import lock_name_problem
from deployd_client.options import Arguments, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any


def run(args: Arguments) -> int:
    """Run ``history``, ``stats``, ``freeze`` or ``unfreeze``; return the exit code."""
    if args.command == "history":
        return _history(args)
    if args.command == "stats":
        return _stats(args)
    if args.command == "freeze":
        return _freeze(args)
    return _unfreeze(args)


def _request(op: str, **fields: Any) -> dict[str, Any]:
    with connect() as connection:
        return connection.request(op, timeout=RESPONSE_TIMEOUT, **fields)


def _print_json(result: dict[str, Any]) -> None:
    import json

    print(json.dumps(result, indent=2, sort_keys=True))


def _check_lock(lock: str | None) -> None:
    problem = lock_name_problem(lock) if lock is not None else None
    if problem:
        raise UsageError(problem)


# The maximum number of records that ``history`` returns; the daemon enforces the same.
MAX_LIMIT = 1000


def since_epoch(text: str, now: float | None = None) -> float:
    """Return the start of the period ``--since TEXT`` (a duration back from now) in epoch seconds.

    A period that reaches back before 1970 starts at the epoch, so it covers
    every recorded deploy. Raises UsageError, quoting ``text``, for a value
    that is not a duration or is not longer than zero.
    """
    now = time.time() if now is None else now
    try:
        period = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None
    if period <= 0:
        raise UsageError(
            f"--since {text!r} is an empty period; give a duration longer than 0s, such as 2h or 1d"
        )
    return max(0.0, now - period)


def _history(args: Arguments) -> int:
    from deployd_client.reports import history_text

    _check_lock(args.lock)
    if not 1 <= args.limit <= MAX_LIMIT:
        raise UsageError(f"--limit must be between 1 and {MAX_LIMIT}, got {args.limit}")
    since = None if args.since is None else since_epoch(args.since)
    result = _request("history", lock=args.lock, limit=args.limit, since=since)
    if args.json:
        _print_json(result)
    else:
        print(history_text(result, use_color(sys.stdout)))
    return exitcodes.OK


def _stats(args: Arguments) -> int:
    from deployd_client.reports import stats_text

    result = _request("stats", since=since_epoch(args.since))
    if args.json:
        _print_json(result)
    else:
        print(stats_text(result, use_color(sys.stdout)))
    return exitcodes.OK


def _scope(args: Arguments, verb: str) -> dict[str, Any]:
    if args.all and args.lock:
        raise UsageError(f"{verb} takes either LOCK or --all, not both")
    if not args.all and not args.lock:
        raise UsageError(f"name the lock to {verb}, or give --all")
    _check_lock(args.lock)
    return {"all": True} if args.all else {"lock": args.lock}


def parse_until(text: str, now: float | None = None) -> float:
    """Return the epoch seconds of ``--until``.

    ``text`` is a duration from now, a local date-time (YYYY-MM-DD, with
    ``THH:MM`` or `` HH:MM``), or a bare local ``HH:MM``: the next time the
    clock shows it, today or, once it has passed today, tomorrow (as ``at``
    reads it).
    """
    now = time.time() if now is None else now
    try:
        return now + parse_duration(text)
    except ValueError:
        pass
    for pattern in ("%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text, pattern))
        except ValueError:
            continue
    try:
        clock = time.strptime(text, "%H:%M")
    except ValueError:
        raise UsageError(
            f"invalid --until {text!r}: use a duration (2h), HH:MM, or YYYY-MM-DD[THH:MM]"
        ) from None
    today = time.localtime(now)

    def on_day(days_ahead: int) -> float:
        # mktime carries a day past the month's end over, and tm_isdst -1 lets it
        # find the zone's offset on that day.
        day = today.tm_mday + days_ahead
        return time.mktime(
            (today.tm_year, today.tm_mon, day, clock.tm_hour, clock.tm_min, 0, 0, 0, -1)
        )

    until = on_day(0)
    return until if until > now else on_day(1)


def _reason(args: Arguments, message: str) -> str:
    """Return ``--reason``; raise UsageError with ``message`` when it is missing or blank."""
    reason: str | None = args.reason
    if reason is None or not reason.strip():
        raise UsageError(message)
    return reason


def _freeze(args: Arguments) -> int:
    fields = _scope(args, "freeze")
    reason = _reason(args, "freeze needs --reason TEXT (not blank), shown to everyone it stops")
    until = None
    if args.until is not None:
        until = parse_until(args.until)
        if until <= time.time():
            raise UsageError(f"--until {args.until!r} is in the past")
    result = _request("freeze", reason=reason, until=until, **fields)
    message = f"froze {describe_freeze(result['frozen'])}"
    replaced = result.get("replaced")
    if replaced:
        message += f"; this replaces the freeze by {describe_freeze_origin(replaced)}"
    warn(message)
    return exitcodes.OK


def _unfreeze(args: Arguments) -> int:
    fields = _scope(args, "unfreeze")
    result = _request("unfreeze", **fields)
    lifted = result.get("unfrozen")
    if lifted:
        in_force = result.get("was_in_force")
        until = lifted.get("until")
        if in_force is None:  # an older daemon sends no was_in_force
            in_force = not isinstance(until, int | float) or until > time.time()
        if in_force:
            warn(f"unfroze {describe_freeze(lifted)}")
        else:
            what = "all locks" if lifted.get("scope") == ALL_LOCKS else str(lifted.get("scope"))
            ended = f" at {clock_time(float(until))}" if isinstance(until, int | float) else ""
            warn(
                f"the freeze of {what} by {lifted.get('by')} ({lifted.get('reason')!r}) had "
                f"already ended{ended}; removed it"
            )
    elif args.all:
        warn("no freeze of all locks was in force; a freeze of one lock needs 'unfreeze LOCK'")
    elif not result.get("all_locks_freeze"):
        warn(f"{args.lock} was not frozen")
    all_locks = result.get("all_locks_freeze")
    if all_locks and not args.all:
        own = "" if lifted else " (it has no freeze of its own)"
        warn(
            f"{args.lock} is still frozen{own} by the freeze of all locks: "
            f"{describe_freeze_origin(all_locks)}. 'deployd unfreeze --all' lifts that one"
        )
    return exitcodes.OK
