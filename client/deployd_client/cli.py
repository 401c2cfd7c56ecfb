"""The ``deployd`` command.

Every subcommand except ``serve`` uses only the standard library and talks
to the daemon over its socket, starting the daemon first when none answers.
Exit codes follow sysexits (see ``deployd_client.exitcodes``); every
non-zero exit prints one line saying what failed and what to do next.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from deployd_client import __version__, exitcodes
from deployd_client.durations import parse_duration
from deployd_client.names import lock_name_problem
from deployd_client.protocol import ClientError, DaemonError, NoDaemon, SocketPermissionDenied

# Options that take a value. A value that starts with "-" (a reason such as
# "-rollback") is still taken word for word: such a pair is joined into
# "--option=value" before argparse sees it, because argparse would read the
# value as another option.
VALUE_OPTIONS = frozenset(
    {
        "--reason",
        "--commit",
        "--wait",
        "--ttl",
        "--pid",
        "--format",
        "--revision",
        "--on-lost",
        "--grace",
        "--config",
        "--exit-code",
    }
)


class UsageError(Exception):
    """The command line is invalid."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # self.prog is "deployd" for the top-level parser and "deployd run" for a subcommand.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _duration_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_lease_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "lock", help="the lock to take: the service, optionally with an environment (api, prod:api)"
    )
    parser.add_argument(
        "--wait",
        type=_duration_argument,
        metavar="DURATION",
        help="wait up to DURATION (such as 30s or 10m) for the lock instead of failing at once",
    )
    parser.add_argument(
        "--commit", metavar="SHA", help="the commit being deployed, shown to others"
    )
    parser.add_argument(
        "--reason", metavar="TEXT", help="why you deploy, shown to others and kept in history"
    )
    parser.add_argument(
        "--ttl",
        type=_duration_argument,
        metavar="DURATION",
        help="lease TTL: how long the lock outlives a daemon that stops renewing it (default 30s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="take the lock even from a live holder; needs --reason, and is recorded and announced",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="print no progress while waiting"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = _Parser(
        prog="deployd",
        description="Coordinate deploys: one holder per lock, others wait their turn.",
    )
    parser.add_argument("--version", action="version", version=f"deployd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    serve = commands.add_parser(
        "serve", help="run the daemon in the foreground (what the service units start)"
    )
    serve.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default $XDG_CONFIG_HOME/deployd/config.toml)",
    )

    run = commands.add_parser(
        "run",
        help="hold LOCK while a command runs; its exit code passes through",
        usage="deployd run LOCK [options] -- COMMAND [ARG...]",
    )
    _add_lease_options(run)
    run.add_argument(
        "--on-lost",
        choices=("terminate", "interrupt", "warn"),
        default="terminate",
        help="what to do to the command if the lease is lost: SIGTERM its process group "
        "(then SIGKILL after --grace), SIGINT it, or only warn (default terminate)",
    )
    run.add_argument(
        "--grace",
        type=_duration_argument,
        default=10.0,
        metavar="DURATION",
        help="how long a terminated command may take to exit before SIGKILL (default 10s)",
    )

    acquire = commands.add_parser(
        "acquire", help="take LOCK for the calling shell and print the lease"
    )
    _add_lease_options(acquire)
    acquire.add_argument(
        "--pid",
        type=int,
        metavar="PID",
        help="bind the lease to this process; it is released when the process exits "
        "(default: the shell that runs deployd)",
    )
    acquire.add_argument(
        "--format",
        choices=("text", "json", "env"),
        default="text",
        help="text, json, or env: 'export' lines for eval (default text)",
    )

    release = commands.add_parser("release", help="release a lease by its id or its lock")
    release.add_argument(
        "target",
        nargs="?",
        metavar="LEASE_ID|LOCK",
        help="the lease id or lock to release (default: $DEPLOYD_LEASE_ID)",
    )
    release.add_argument(
        "--exit-code", type=int, metavar="N", help="the deploy's exit code, recorded as its outcome"
    )
    release.add_argument("--revision", metavar="REV", help="the revision that was deployed")

    status = commands.add_parser(
        "status", help="show the daemon, the store, every lock and its queue"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def _join_value_options(argv: list[str]) -> list[str]:
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in VALUE_OPTIONS and index + 1 < len(argv):
            joined.append(f"{token}={argv[index + 1]}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``run`` arguments at the first ``--`` into options and the command."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def fail(message: str, code: int) -> int:
    """Print one error line to stderr and return ``code``."""
    print(f"deployd: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        options, command = split_command(arguments)
        args = build_parser().parse_args(_join_value_options(options))
        if args.command == "serve":
            if command:
                raise UsageError("serve takes no command after --")
            from deployd.daemon import serve_main

            return serve_main(args.config)
        if args.command != "run" and command:
            raise UsageError(
                f"'--' and a command only go with 'deployd run', not with '{args.command}'"
            )
        return _dispatch(args, command)
    except UsageError as exc:
        return fail(str(exc), exitcodes.USAGE)
    except SocketPermissionDenied as exc:
        return fail(str(exc), exitcodes.NO_PERMISSION)
    except NoDaemon as exc:
        hint = "" if "DEPLOYD_NO_AUTOSTART" not in os.environ else " (DEPLOYD_NO_AUTOSTART is set)"
        return fail(f"{exc}{hint}; start it with 'deployd serve'", exitcodes.UNAVAILABLE)
    except DaemonError as exc:
        return fail(str(exc), exitcodes.for_error_code(exc.code))
    except ClientError as exc:
        return fail(f"{exc}; see 'deployd status' and the daemon log", exitcodes.UNAVAILABLE)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, command: list[str]) -> int:
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
    if args.command == "status":
        return _status(args)
    raise UsageError(f"unknown command {args.command!r}")


def _check_lease_arguments(args: argparse.Namespace) -> None:
    problem = lock_name_problem(args.lock)
    if problem:
        raise UsageError(problem)
    if args.ttl is not None and args.ttl <= 0:
        raise UsageError(f"--ttl must be longer than 0s, got {args.ttl:g}s; the default is 30s")
    if args.wait is not None and args.wait < 0:
        raise UsageError(f"--wait must not be negative, got {args.wait:g}s")
    if args.force and not args.reason:
        raise UsageError("--force needs --reason TEXT saying why you take the lock from its holder")


def lease_fields(args: argparse.Namespace) -> dict[str, Any]:
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


def _acquire(args: argparse.Namespace) -> int:
    from deployd_client.autostart import connect
    from deployd_client.display import WaitDisplay

    pid = args.pid if args.pid is not None else os.getppid()
    if pid <= 0:
        raise UsageError(f"--pid must be a process id greater than 0, got {pid}")
    display = WaitDisplay(args.lock, quiet=args.quiet)
    with connect() as connection:
        try:
            result = connection.request(
                "acquire", on_event=display.update, pid=pid, **lease_fields(args)
            )
        except DaemonError as exc:
            display.finish("gave up")
            raise exc from None
    display.finish("got the lock")
    _print_lease(result, args.format)
    return exitcodes.OK


def _print_lease(result: dict[str, Any], output_format: str) -> None:
    if output_format == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
    elif output_format == "env":
        import shlex

        print(f"export DEPLOYD_LEASE_ID={shlex.quote(result['lease_id'])}")
        print(f"export DEPLOYD_LOCK={shlex.quote(result['lock'])}")
        print(f"export DEPLOYD_FENCING_TOKEN={int(result['token'])}")
    else:
        print(
            f"acquired {result['lock']}: lease {result['lease_id']}, fencing token {result['token']}, "
            f"TTL {result['timings']['ttl']:g}s"
        )


def _release(args: argparse.Namespace) -> int:
    from deployd_client.autostart import connect

    target = args.target or os.environ.get("DEPLOYD_LEASE_ID")
    if not target:
        raise UsageError("name the lease id or lock to release, or set DEPLOYD_LEASE_ID")
    if args.exit_code is not None and not 0 <= args.exit_code <= 255:
        raise UsageError(f"--exit-code must be between 0 and 255, got {args.exit_code}")
    fields: dict[str, Any] = {"exit_code": args.exit_code, "revision": args.revision}
    if "@" in target:
        fields["lease_id"] = target
    else:
        problem = lock_name_problem(target)
        if problem:
            raise UsageError(problem)
        fields["lock"] = target
        env_lease = os.environ.get("DEPLOYD_LEASE_ID")
        if env_lease and os.environ.get("DEPLOYD_LOCK") == target:
            fields["lease_id"] = env_lease
    with connect() as connection:
        result = connection.request("release", **fields)
    if result.get("released"):
        print(f"deployd: released {result['lock']} ({result['outcome']})", file=sys.stderr)
    else:
        print(f"deployd: {result.get('message', 'nothing to release')}", file=sys.stderr)
    return exitcodes.OK


def _status(args: argparse.Namespace) -> int:
    from deployd_client.autostart import connect
    from deployd_client.display import status_text, use_color

    with connect() as connection:
        result = connection.request("status")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(status_text(result, color=use_color(sys.stdout)))
    return exitcodes.OK
