"""The ``deployd`` command.

Every subcommand except ``serve`` uses only the standard library and talks
to the daemon over its socket, starting the daemon first when none answers.
Exit codes follow sysexits (see ``deployd_client.exitcodes``); every
non-zero exit prints one line saying what failed and what to do next.
"""

from __future__ import annotations

import os
import sys

from deployd_client import __version__, exitcodes, paths
from deployd_client.autostart import DaemonStartFailed
from deployd_client.durations import format_duration, parse_duration
from deployd_client.names import (
    MAX_TEXT_LENGTHS,
    MAX_TTL,
    MAX_WAIT,
    MIN_TTL,
    lock_name_problem,
)
from deployd_client.options import (
    Arguments,
    Command,
    Option,
    Positional,
    UsageError,
    top_level_help,
)
from deployd_client.protocol import (
    ClientError,
    Connection,
    DaemonError,
    NoDaemon,
    SocketPermissionDenied,
)

# Importing typing costs a client call several milliseconds, so annotations
# only name its types for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["UsageError", "lease_fields", "main", "warn_if_unlocked"]

# How long a quick request (status, release, ...) may wait for the daemon's answer.
RESPONSE_TIMEOUT = 30.0


def _whole_number(text: str) -> int:
    # Digits only: int() also takes "1_0", "+5" and non-ASCII digits.
    digits = text[1:] if text.startswith("-") else text
    if not digits or any(char not in "0123456789" for char in digits):
        raise ValueError(f"must be a whole number, got {text!r}")
    return int(text)


def _lease_options() -> list[Option]:
    return [
        Option(
            ["--wait"],
            "wait up to DURATION (such as 30s or 10m) for the lock instead of failing at once",
            metavar="DURATION",
            convert=parse_duration,
        ),
        Option(
            ["--commit"], "the commit being deployed, shown to others", metavar="SHA", convert=str
        ),
        Option(
            ["--reason"],
            "why you deploy, shown to others and kept in history",
            metavar="TEXT",
            convert=str,
        ),
        Option(
            ["--ttl"],
            "lease TTL: how long the lock outlives a daemon that stops renewing it (default 30s)",
            metavar="DURATION",
            convert=parse_duration,
        ),
        Option(
            ["--force"],
            "take the lock even from a live holder; needs --reason, asks for confirmation "
            "(or --yes), and is recorded and announced",
        ),
        Option(
            ["--yes", "-y"],
            "with --force: do not ask for confirmation (needed when not on a terminal)",
        ),
        Option(["--quiet", "-q"], "print no progress while waiting"),
    ]


_LOCK = Positional(
    "lock", "LOCK", "the lock to take: the service, optionally with an environment (api, prod:api)"
)

COMMANDS = (
    Command(
        "serve",
        "run the daemon in the foreground (what the service units start)",
        options=[
            Option(
                ["--config"],
                "config file (default $XDG_CONFIG_HOME/deployd/config.toml)",
                metavar="PATH",
                convert=str,
            )
        ],
    ),
    Command(
        "run",
        "hold LOCK while a command runs; its exit code passes through",
        positionals=[_LOCK],
        options=[
            *_lease_options(),
            Option(
                ["--on-lost"],
                "what to do to the command if the lease is lost: terminate (SIGTERM to its "
                "process group, SIGKILL after --grace), interrupt (SIGINT) or warn "
                "(default terminate)",
                metavar="ACTION",
                convert=str,
                choices=("terminate", "interrupt", "warn"),
                default="terminate",
            ),
            Option(
                ["--grace"],
                "how long a terminated command may take to exit before SIGKILL (default 10s)",
                metavar="DURATION",
                convert=parse_duration,
                default=10.0,
            ),
            Option(
                ["--capture-output"],
                "pass the command's output through deployd and, when the command fails, send "
                "its last 20 lines for the failure message in Slack; the command then writes "
                "to pipes instead of the terminal",
            ),
        ],
        usage="deployd run LOCK [options] -- COMMAND [ARG...]",
        takes_command=True,
    ),
    Command(
        "acquire",
        "take LOCK for the calling shell and print the lease",
        positionals=[_LOCK],
        options=[
            *_lease_options(),
            Option(
                ["--pid"],
                "bind the lease to this process; it is released when the process exits "
                "(default: the shell that runs deployd)",
                metavar="PID",
                convert=_whole_number,
            ),
            Option(
                ["--format"],
                "text, json, or env: 'export' lines for eval (default text)",
                metavar="FORMAT",
                convert=str,
                choices=("text", "json", "env"),
                default="text",
            ),
        ],
    ),
    Command(
        "release",
        "release a lease by its id or its lock",
        positionals=[
            Positional(
                "target",
                "LEASE_ID|LOCK",
                "the lease id or lock to release (default: $DEPLOYD_LEASE_ID)",
                required=False,
            )
        ],
        options=[
            Option(
                ["--exit-code"],
                "the deploy's exit code, recorded as its outcome",
                metavar="N",
                convert=_whole_number,
            ),
            Option(["--revision"], "the revision that was deployed", metavar="REV", convert=str),
        ],
    ),
    Command(
        "event",
        "report a milestone of the deploy that holds LOCK: 'deployed' with its revision",
        positionals=[
            Positional("lock", "LOCK", "the lock your deploy holds"),
            Positional("event", "EVENT", "what happened; the only event is 'deployed'"),
        ],
        options=[
            Option(
                ["--revision"],
                "the revision now serving traffic (required for 'deployed')",
                metavar="REV",
                convert=str,
            ),
        ],
        usage="deployd event LOCK deployed --revision REV",
    ),
    Command(
        "force-unlock",
        "take LOCK away from its holder, live or dead; recorded and announced",
        positionals=[Positional("lock", "LOCK", "the lock to free")],
        options=[
            Option(
                ["--reason"],
                "why you take the lock away (required), shown to the holder and kept in history",
                metavar="TEXT",
                convert=str,
            ),
            Option(["--yes", "-y"], "do not ask for confirmation (needed when not on a terminal)"),
        ],
    ),
    Command(
        "history",
        "list deploys, newest first, of every lock or of LOCK",
        positionals=[Positional("lock", "LOCK", "only deploys of this lock", required=False)],
        options=[
            Option(
                ["--limit"],
                "how many deploys to show, 1 to 1000 (default 20)",
                metavar="N",
                convert=_whole_number,
                default=20,
            ),
            Option(
                ["--since"],
                "only deploys started within DURATION (such as 1d or 2h)",
                metavar="DURATION",
                convert=str,  # checked by report_commands.since_epoch, which quotes it
            ),
            Option(["--json"], "print the history as JSON"),
        ],
    ),
    Command(
        "stats",
        "show deploy counts, waits, stale leases and latencies of a period",
        options=[
            Option(
                ["--since"],
                "the period: deploys started within DURATION (default 7d)",
                metavar="DURATION",
                convert=str,  # checked by report_commands.since_epoch, which quotes it
                default="7d",
            ),
            Option(["--json"], "print the stats as JSON"),
        ],
    ),
    Command(
        "freeze",
        "stop new grants of LOCK, or of every lock with --all, until unfrozen",
        positionals=[Positional("lock", "LOCK", "the lock to freeze", required=False)],
        options=[
            Option(["--all"], "freeze every lock"),
            Option(
                ["--reason"],
                "why (required), shown to everyone it stops",
                metavar="TEXT",
                convert=str,
            ),
            Option(
                ["--until"],
                "end the freeze at TIME: a duration from now (2h); HH:MM, local time, today "
                "or, if that time has passed, tomorrow; or YYYY-MM-DD[THH:MM], local time",
                metavar="TIME",
                convert=str,
            ),
        ],
    ),
    Command(
        "unfreeze",
        "lift the freeze of LOCK, or with --all the freeze of all locks",
        positionals=[Positional("lock", "LOCK", "the lock to unfreeze", required=False)],
        options=[
            Option(
                ["--all"],
                "lift the freeze of all locks that 'freeze --all' set; freezes of single "
                "locks stay until 'unfreeze LOCK'",
            )
        ],
    ),
    Command(
        "status",
        "show the daemon, the store, every lock and its queue",
        options=[Option(["--json"], "print the status as JSON")],
    ),
    Command(
        "service",
        "run the daemon as a systemd user service (Linux) or a launchd agent (macOS)",
        positionals=[
            Positional(
                "action",
                "install|uninstall|status",
                "install: write the unit files or agent and start it; uninstall: stop and "
                "remove it; status: show whether it is installed, enabled and running",
            )
        ],
        options=[
            Option(
                ["--dry-run"],
                "print the files that install or uninstall would write and the commands it "
                "would run, and change nothing",
            )
        ],
    ),
    Command(
        "config",
        "check or show the configuration, or make the daemon reload it",
        positionals=[
            Positional(
                "action",
                "check|show|reload",
                "check: validate the config (exit 78 naming key, value and rule); show: every "
                "effective value and where it comes from, secrets masked; reload: make the "
                "running daemon read its config again",
            )
        ],
        options=[
            Option(
                ["--config"],
                "config file to check or show (default $XDG_CONFIG_HOME/deployd/config.toml)",
                metavar="PATH",
                convert=str,
            ),
            Option(["--json"], "print the values (show) or the changes (reload) as JSON"),
        ],
    ),
    Command(
        "doctor",
        "check the socket, daemon, store, Slack and config, and print what to fix",
    ),
)
_BY_NAME = {command.name: command for command in COMMANDS}


def parse_arguments(argv: Sequence[str]) -> Arguments | str:
    """Parse the whole command line; return the arguments, or text to print (help, version)."""
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            raise UsageError("missing COMMAND (see 'deployd --help')")
        return top_level_help(COMMANDS, __version__)
    if argv[0] == "--version":
        return f"deployd {__version__}\n"
    command = _BY_NAME.get(argv[0])
    if command is None:
        if argv[0].startswith("-"):
            raise UsageError(f"unknown option {argv[0]} (see 'deployd --help')")
        known = ", ".join(_BY_NAME)
        raise UsageError(
            f"unknown command {argv[0]!r}; the commands are {known} (see 'deployd --help')"
        )
    args = command.parse(argv[1:])
    if args.help:
        return command.help_text()
    return args


def warn(message: str) -> None:
    """Print one line to stderr, unless stderr is closed or broken."""
    if sys.stderr is None:
        return
    try:
        print(f"deployd: {message}", file=sys.stderr)
    except OSError:
        pass


def fail(message: str, code: int) -> int:
    """Print one error line to stderr and return ``code``."""
    warn(message)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_arguments(arguments)
        if isinstance(args, str):
            sys.stdout.write(args)
            return exitcodes.OK
        if args.command == "serve":
            from deployd.daemon import serve_main

            return serve_main(args.config)
        return _dispatch(args, args.argv)
    except UsageError as exc:
        return fail(str(exc), exitcodes.USAGE)
    except SocketPermissionDenied as exc:
        return fail(str(exc), exitcodes.NO_PERMISSION)
    except paths.PathError as exc:
        return fail(str(exc), exitcodes.CONFIG)
    except DaemonStartFailed as exc:
        # The daemon's own exit code says why (78 configuration, 77 permissions, ...).
        code = exc.exit_code if exc.exit_code in exitcodes.DAEMON_START_CODES else None
        return fail(str(exc), code or exitcodes.UNAVAILABLE)
    except NoDaemon as exc:
        hint = "" if "DEPLOYD_NO_AUTOSTART" not in os.environ else " (DEPLOYD_NO_AUTOSTART is set)"
        return fail(f"{exc}{hint}; start it with 'deployd serve'", exitcodes.UNAVAILABLE)
    except DaemonError as exc:
        return fail(str(exc), exitcodes.for_error_code(exc.code))
    except ClientError as exc:
        return fail(f"{exc}; see 'deployd status' and the daemon log", exitcodes.UNAVAILABLE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (deployd status --json | head): say nothing more.
        sys.stdout = None
        return 141
    except Exception as exc:
        # The daemon logs its own errors with their tracebacks.
        if os.environ.get("DEPLOYD_DEBUG") or arguments[:1] == ["serve"]:
            raise
        return fail(
            f"internal error: {type(exc).__name__}: {exc}; run again with DEPLOYD_DEBUG=1 "
            "for the traceback, and report it",
            exitcodes.INTERNAL,
        )


def _dispatch(args: Arguments, command: list[str]) -> int:
    if args.command in ("run", "acquire"):
        _check_lease_arguments(args)
    if args.command == "run":
        if not command:
            raise UsageError(
                "name the command to run after '--': deployd run LOCK -- COMMAND [ARG...]"
            )
        from deployd_client.runner import run

        return run(args, command)
    if args.command == "acquire":
        return _acquire(args)
    if args.command == "release":
        return _release(args)
    if args.command == "event":
        return _event(args)
    if args.command == "status":
        return _status(args)
    if args.command == "force-unlock":
        return _force_unlock(args)
    if args.command in ("history", "stats", "freeze", "unfreeze"):
        from deployd_client import report_commands

        return report_commands.run(args)
    if args.command == "service":
        from deployd_client import user_service

        return user_service.run(args)
    if args.command == "config":
        from deployd_client import config_commands

        return config_commands.run(args)
    if args.command == "doctor":
        from deployd_client import doctor

        return doctor.run(args)
    raise UsageError(f"unknown command {args.command!r}")


def _check_lease_arguments(args: Arguments) -> None:
    problem = lock_name_problem(args.lock)
    if problem:
        raise UsageError(problem)
    if args.ttl is not None and args.ttl <= 0:
        raise UsageError(f"--ttl must be longer than 0s, got {args.ttl:g}s; the default is 30s")
    if args.ttl is not None and not MIN_TTL <= args.ttl <= MAX_TTL:
        raise UsageError(
            f"--ttl must be between {format_duration(MIN_TTL)} and {format_duration(MAX_TTL)}, "
            f"got {format_duration(args.ttl)}; the default is 30s"
        )
    if args.wait is not None and args.wait < 0:
        raise UsageError(f"--wait must not be negative, got {args.wait:g}s")
    if args.wait is not None and args.wait > MAX_WAIT:
        raise UsageError(
            f"--wait must be at most {format_duration(MAX_WAIT)}, got {format_duration(args.wait)}"
        )
    for name in ("reason", "commit"):
        check_text_length(name, getattr(args, name))
    if args.force and not (args.reason or "").strip():
        raise UsageError(
            "--force needs --reason TEXT (not blank) saying why you take the lock from its holder"
        )


def check_text_length(name: str, value: str | None) -> None:
    """Raise UsageError when the ``--NAME`` text is longer than the daemon accepts."""
    limit = MAX_TEXT_LENGTHS[name]
    if value is not None and len(value) > limit:
        raise UsageError(
            f"--{name} is {len(value)} characters long; the maximum is {limit}. "
            "Shorten it, and link to longer notes instead"
        )


def lease_fields(args: Arguments) -> dict[str, Any]:
    """Return the request fields shared by ``acquire`` and ``hold``."""
    return {
        "lock": args.lock,
        "wait": args.wait or None,
        "commit": args.commit,
        "reason": args.reason,
        "ttl": args.ttl,
        "force": args.force or None,
        "force_reason": args.reason if args.force else None,
    }


def _acquire(args: Arguments) -> int:
    from deployd_client.display import WaitDisplay
    from deployd_client.waiting import wait_for_lease

    pid = args.pid if args.pid is not None else os.getppid()
    if pid <= 1:
        raise UsageError(
            f"--pid must name the process the lease is bound to (greater than 1), got {pid}"
        )
    joined = join_outer_lease("acquire", args.lock)
    if joined is not None:
        _print_lease(joined, args.format, joined_depth(args.lock))
        return exitcodes.OK
    if not confirm_forced_lease(args):
        return exitcodes.BUSY
    display = WaitDisplay(args.lock, quiet=args.quiet)
    try:
        connection, result = wait_for_lease(
            "acquire", {"pid": pid, **lease_fields(args)}, args.wait, display
        )
    except DaemonError as exc:
        display.abandon()  # the error line that follows gives the reason
        if args.format == "json":
            _print_acquire_error(exc)
        raise exc from None
    connection.close()
    display.finish("got the lock")
    warn_if_unlocked(result)
    _print_lease(result, args.format, 1)
    return exitcodes.OK


def lease_depth() -> int:
    """Return DEPLOYD_LEASE_DEPTH: 1 under the deploy that took the lease, more when nested."""
    text = os.environ.get("DEPLOYD_LEASE_DEPTH", "")
    return int(text) if text.isdigit() else 1


def outer_leases() -> dict[str, str]:
    """Return the lease ids of the deploys this process runs under, by lock.

    The innermost lease comes from DEPLOYD_LOCK and DEPLOYD_LEASE_ID, the ones
    around it from DEPLOYD_OUTER_LEASES (``lock=lease_id`` entries separated
    by spaces), so ``run api -- run web -- run api`` joins the outermost lease.
    """
    leases: dict[str, str] = {}
    for entry in os.environ.get("DEPLOYD_OUTER_LEASES", "").split():
        lock, separator, lease_id = entry.partition("=")
        if separator and lock and lease_id:
            leases[lock] = lease_id
    inner_lock = os.environ.get("DEPLOYD_LOCK")
    inner_lease_id = os.environ.get("DEPLOYD_LEASE_ID")
    if inner_lock and inner_lease_id:
        leases[inner_lock] = inner_lease_id
    return leases


def outer_leases_around(lock: str) -> str:
    """Return DEPLOYD_OUTER_LEASES for a command that runs under a lease on ``lock``."""
    leases = outer_leases()
    leases.pop(lock, None)
    return " ".join(f"{name}={lease_id}" for name, lease_id in leases.items())


def joined_depth(lock: str) -> int:
    """Return DEPLOYD_LEASE_DEPTH for a caller that joined the outer lease on ``lock``."""
    if os.environ.get("DEPLOYD_LOCK") == lock:
        return lease_depth() + 1
    return 2


def join_outer_lease(op: str, lock: str) -> dict[str, Any] | None:
    """Join the lease of a deploy this process runs under, if one holds ``lock``.

    A deploy script's helpers often take the same lock again; queueing behind
    their own deploy would wait forever. Returns the joined lease, or None
    when there is no such lease (the caller then takes the lock normally).
    """
    from deployd_client.autostart import connect

    outer = outer_leases().get(lock)
    if not outer:
        return None
    with connect() as connection:
        try:
            result = connection.request(op, timeout=RESPONSE_TIMEOUT, lock=lock, join=outer)
        except DaemonError as exc:
            if exc.code in ("not_holder", "invalid_argument"):
                return None
            raise
    warn(f"joined the lease on {lock} of the deploy this runs under")
    return result


def force_target(connection: Connection, lock: str) -> str | None:
    """Return a description of the holder of ``lock`` for ``--force``, or None when it is free."""
    from deployd_client.display import describe_holder

    locks = connection.request("locks", timeout=RESPONSE_TIMEOUT)["locks"]
    state = next((entry for entry in locks if entry["lock"] == lock), None)
    if state is None or state.get("lease") is None:
        return None
    expired = "" if state.get("held") else " (its lease has expired)"
    return describe_holder(state["lease"]) + expired


def confirm_force(lock: str, holder: str, yes: bool) -> bool:
    """Prompt for confirmation to take ``lock`` from ``holder``; return False if declined.

    With ``yes`` there is no prompt. Without a terminal, ``yes`` is required
    and UsageError is raised.
    """
    if yes:
        return True
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageError(
            f"{lock} is held by {holder}; not on a terminal, so add --yes "
            "to take it away without confirmation"
        )
    sys.stderr.write(f"{lock} is held by {holder}.\nTake it away? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def confirm_forced_lease(args: Arguments) -> bool:
    """Confirm ``run/acquire --force`` when the lock has a holder; return False if declined."""
    if not args.force:
        return True
    from deployd_client.autostart import connect

    with connect() as connection:
        holder = force_target(connection, args.lock)
    if holder is None or confirm_force(args.lock, holder, args.yes):
        return True
    warn("not forced")
    return False


def warn_if_unlocked(result: dict[str, Any]) -> None:
    """Print a warning when the daemon granted a lease without the store's lock."""
    if result.get("degraded"):
        warn(
            f"WARNING: going ahead WITHOUT a team-wide lock on {result['lock']}: "
            f"{result.get('unlocked_reason') or 'the lease store is unreachable'}. Deploys on "
            "this workstation are still one at a time; the daemon takes the real lock when "
            "the store is back and reports any overlap (on_store_error = open)"
        )


def _print_acquire_error(error: DaemonError) -> None:
    """Print why ``acquire --format json`` failed as JSON, so scripts need not parse stderr."""
    import json

    failure = {
        "code": error.code,
        "message": str(error),
        "exit_code": exitcodes.for_error_code(error.code),
        "details": error.details,
    }
    print(json.dumps({"schema": 1, "error": failure}, indent=2, sort_keys=True))


def _print_lease(result: dict[str, Any], output_format: str, depth: int) -> None:
    if output_format == "json":
        import json

        print(json.dumps({**result, "depth": depth}, indent=2, sort_keys=True))
    elif output_format == "env":
        import shlex

        print(f"export DEPLOYD_LEASE_ID={shlex.quote(result['lease_id'])}")
        print(f"export DEPLOYD_LOCK={shlex.quote(result['lock'])}")
        print(f"export DEPLOYD_FENCING_TOKEN={int(result['token'])}")
        # Greater than 1 for a joined lease: its release is left to the deploy that took it.
        print(f"export DEPLOYD_LEASE_DEPTH={depth}")
        print(f"export DEPLOYD_OUTER_LEASES={shlex.quote(outer_leases_around(result['lock']))}")
        # The shell took this lease, so its own 'deployd release' ends it.
        print("export DEPLOYD_LEASE_OWNER=acquire")
    else:
        print(
            f"acquired {result['lock']}: lease {result['lease_id']}, "
            f"fencing token {result['token']}, TTL {result['timings']['ttl']:g}s"
        )


def _release(args: Arguments) -> int:
    from deployd_client.autostart import connect

    target = args.target or os.environ.get("DEPLOYD_LEASE_ID")
    if not target:
        raise UsageError("name the lease id or lock to release, or set DEPLOYD_LEASE_ID")
    if args.exit_code is not None and not 0 <= args.exit_code <= 255:
        raise UsageError(f"--exit-code must be between 0 and 255, got {args.exit_code}")
    fields: dict[str, Any] = {"exit_code": args.exit_code, "revision": args.revision}
    outer = (os.environ.get("DEPLOYD_LEASE_ID"), os.environ.get("DEPLOYD_LOCK"))
    if lease_depth() > 1 and target in outer:
        warn(f"{outer[1]} was joined, not taken, here; the deploy that took it releases it")
        return exitcodes.OK
    if os.environ.get("DEPLOYD_LEASE_OWNER") == "run" and target in outer:
        warn(
            f"the lease on {outer[1]} belongs to the 'deployd run' that this runs under; "
            "it is released when that command exits, so nothing was released"
        )
        return exitcodes.OK
    check_text_length("revision", args.revision)
    if "@" in target:
        fields["lease_id"] = target
        if target == os.environ.get("DEPLOYD_LEASE_ID") and os.environ.get("DEPLOYD_LOCK"):
            # Lets a daemon that replaced a killed one find the lease in the store.
            fields["lock"] = os.environ["DEPLOYD_LOCK"]
    else:
        problem = lock_name_problem(target)
        if problem:
            raise UsageError(problem)
        fields["lock"] = target
        env_lease = os.environ.get("DEPLOYD_LEASE_ID")
        if env_lease and os.environ.get("DEPLOYD_LOCK") == target:
            fields["lease_id"] = env_lease
    with connect() as connection:
        result = connection.request("release", timeout=RESPONSE_TIMEOUT, **fields)
    if result.get("released"):
        warn(f"released {result['lock']} ({result['outcome']})")
    else:
        warn(result.get("message", "nothing to release"))
    return exitcodes.OK


def _event(args: Arguments) -> int:
    from deployd_client.autostart import connect

    problem = lock_name_problem(args.lock)
    if problem:
        raise UsageError(problem)
    if args.event != "deployed":
        raise UsageError(f"unknown event {args.event!r}; the only event is 'deployed'")
    if not args.revision:
        raise UsageError("'deployed' needs --revision REV: the revision now serving traffic")
    check_text_length("revision", args.revision)
    fields: dict[str, Any] = {"lock": args.lock, "event": args.event, "revision": args.revision}
    env_lease = os.environ.get("DEPLOYD_LEASE_ID")
    if env_lease and os.environ.get("DEPLOYD_LOCK") == args.lock:
        fields["lease_id"] = env_lease
    with connect() as connection:
        connection.request("event", timeout=RESPONSE_TIMEOUT, **fields)
    return exitcodes.OK


def _status(args: Arguments) -> int:
    from deployd_client.autostart import connect
    from deployd_client.display import status_text, use_color

    with connect() as connection:
        result = connection.request("status", timeout=RESPONSE_TIMEOUT)
    if args.json:
        import json

        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(status_text(result, color=use_color(sys.stdout)))
    return exitcodes.OK


def _force_unlock(args: Arguments) -> int:
    from deployd_client.autostart import connect

    problem = lock_name_problem(args.lock)
    if problem:
        raise UsageError(problem)
    if not (args.reason or "").strip():
        raise UsageError(
            "force-unlock needs --reason TEXT (not blank) saying why you take the lock away"
        )
    check_text_length("reason", args.reason)
    with connect() as connection:
        holder = force_target(connection, args.lock)
        if holder is None:
            warn(f"{args.lock} is not held; nothing to force")
            return exitcodes.OK
        if not confirm_force(args.lock, holder, args.yes):
            warn("not forced")
            return exitcodes.BUSY
        result = connection.request(
            "force_unlock", timeout=RESPONSE_TIMEOUT, lock=args.lock, reason=args.reason
        )
    if result.get("forced"):
        warn(f"forced {args.lock} away from {holder}; fencing token is now {result['token']}")
    else:
        warn(f"{args.lock} was already free")
    return exitcodes.OK
