"""The commands that read history and stats, and that freeze and unfreeze locks."""

from __future__ import annotations

import sys
import time

from deployd_client import exitcodes
from deployd_client.autostart import connect
from deployd_client.cli import RESPONSE_TIMEOUT, warn
from deployd_client.display import describe_freeze, use_color
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


def _history(args: Arguments) -> int:
    from deployd_client.reports import history_text

    _check_lock(args.lock)
    if args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    since = None if args.since is None else time.time() - args.since
    result = _request("history", lock=args.lock, limit=min(args.limit, 1000), since=since)
    if args.json:
        _print_json(result)
    else:
        print(history_text(result, use_color(sys.stdout)))
    return exitcodes.OK


def _stats(args: Arguments) -> int:
    from deployd_client.reports import stats_text

    if args.since <= 0:
        raise UsageError(f"--since must be longer than 0s, got {args.since:g}s")
    result = _request("stats", since=max(0.0, time.time() - args.since))
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
    """Return the epoch seconds of ``--until``: a duration, HH:MM today, or a local date-time."""
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
    return time.mktime(
        (today.tm_year, today.tm_mon, today.tm_mday, clock.tm_hour, clock.tm_min, 0, 0, 0, -1)
    )


def _freeze(args: Arguments) -> int:
    fields = _scope(args, "freeze")
    if not args.reason:
        raise UsageError("freeze needs --reason TEXT, shown to everyone it stops")
    until = None
    if args.until is not None:
        until = parse_until(args.until)
        if until <= time.time():
            raise UsageError(f"--until {args.until!r} is in the past")
    result = _request("freeze", reason=args.reason, until=until, **fields)
    warn(f"froze {describe_freeze(result['frozen'])}")
    return exitcodes.OK


def _unfreeze(args: Arguments) -> int:
    fields = _scope(args, "unfreeze")
    result = _request("unfreeze", **fields)
    lifted = result.get("unfrozen")
    if lifted:
        warn(f"unfroze {describe_freeze(lifted)}")
    elif args.all:
        warn("no freeze of all locks was in force; a freeze of one lock needs 'unfreeze LOCK'")
    else:
        warn(f"{args.lock} was not frozen")
    return exitcodes.OK
