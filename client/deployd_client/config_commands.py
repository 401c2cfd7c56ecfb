"""``deployd config check|show|reload``.

``check`` and ``show`` read the config as a daemon started from this shell
would: the file (``--config``, ``DEPLOYD_CONFIG`` or the default path) and
the ``DEPLOYD_*`` variables of this environment. They use the daemon's own
config code, so, like ``serve``, they load the daemon package, which costs
more start-up time than other commands. Both warn on stderr of variables
that deployd ignores (``deployd.config.environment_warnings``). ``reload``
makes the running daemon read its config again.

Secrets never appear in the output: Slack credentials are shown by where
they come from, with the value masked, and anything shaped like a Slack
token or webhook URL in a value is masked too.
"""

from __future__ import annotations

import os
import sys

from deployd_client import exitcodes, paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from deployd.config import Config
    from deployd.notifiers.credentials import SlackCredentials
    from deployd_client.options import Arguments

ACTIONS = ("check", "show", "reload")


def run(args: Arguments) -> int:
    """Run ``deployd config ACTION`` and return the exit code."""
    from deployd_client.options import UsageError

    if args.action not in ACTIONS:
        raise UsageError(
            f"unknown action {args.action!r}; use one of {', '.join(ACTIONS)} "
            "(see 'deployd config --help')"
        )
    if args.action == "reload":
        if args.config is not None:
            raise UsageError(
                "--config goes with check and show; the daemon reloads the file it started with"
            )
        return _reload(args.json)
    try:
        from deployd.config import environment_warnings, load_config
        from deployd.errors import ConfigError
    except ImportError as exc:
        print(
            f"deployd: cannot read the config here, because the daemon's package is missing "
            f"({exc}); run this where 'deployd serve' runs",
            file=sys.stderr,
        )
        return exitcodes.INTERNAL
    # Variables that deployd ignores, such as a misspelt DEPLOYD_LEASE_TTL, leave
    # the config valid, so they are warnings, printed whatever the outcome.
    for warning in environment_warnings():
        print(f"deployd: warning: {warning}", file=sys.stderr)
    try:
        config = load_config(args.config)
        credentials = _credentials(config)
    except ConfigError as exc:
        # One line for each invalid key; ConfigError masks secrets in its message.
        for problem in exc.problems:
            print(f"deployd: {problem}", file=sys.stderr)
        return exitcodes.CONFIG
    if args.action == "check":
        return _check(config, args.config)
    return _show(config, credentials, args.config, args.json)


def _credentials(config: Config) -> SlackCredentials | None:
    """Return the Slack credentials the daemon would use; raise ConfigError like its start."""
    from deployd.notifiers.credentials import load_credentials

    return load_credentials(config.slack)


def _check(config: Config, path: str | None) -> int:
    file_path = config.file or (os.path.abspath(path) if path else paths.config_path())
    from_file = sum(1 for source in config.sources.values() if source.startswith(file_path))
    from_env = sum(1 for source in config.sources.values() if source.startswith("DEPLOYD_"))
    if config.file:
        print(
            f"{config.file} is valid: {_keys(from_file)} set in the file, {from_env} by "
            "DEPLOYD_* variables, the rest default"
        )
    else:
        print(
            f"no config file at {file_path}, so the defaults apply ({_keys(from_env)} set by "
            "DEPLOYD_* variables); the configuration is valid"
        )
    return exitcodes.OK


def _keys(count: int) -> str:
    return f"{count} key" if count == 1 else f"{count} keys"


# --- show ---


def effective_values(config: Config) -> list[tuple[str, Any, str]]:
    """Return (key, effective value, source) for every key, in key order.

    Values the daemon derives when a key is unset (the renewal interval and
    deadline from the TTL, the poll interval from the store kind) are shown
    as derived, with the rule in the source.
    """
    from deployd.config import firestore_project
    from deployd.reload import value_of

    timings = config.lease.timings()
    derived: dict[str, tuple[Any, str]] = {
        "lease.renew_every": (timings.renew_every, "default: lease.ttl / 3"),
        "lease.renew_deadline": (
            timings.renew_deadline,
            "default: lease.ttl - min(5s, lease.ttl / 3)",
        ),
        "store.poll_interval": (
            config.store.effective_poll_interval(),
            f"default for store.kind {config.store.kind}",
        ),
    }
    project = firestore_project(config.store)
    if config.store.kind == "firestore" and project is not None:
        derived["store.project"] = (project[0], f"default: {project[1]}")
    rows = []
    for key in sorted(config.sources):
        value = value_of(config, key)
        source = config.sources[key]
        if value is None and key in derived:
            value, source = derived[key]
        rows.append((key, value, source))
    return rows


def socket_source() -> str:
    """Return what decided the socket path: a variable or the fallback rule."""
    if os.environ.get("DEPLOYD_SOCKET"):
        return "DEPLOYD_SOCKET"
    configured = os.environ.get("XDG_RUNTIME_DIR")
    if configured and os.path.isabs(configured):
        return "XDG_RUNTIME_DIR"
    # A relative XDG_RUNTIME_DIR is ignored (paths.runtime_dir).
    unset = "is relative, so ignored" if configured else "is unset"
    if sys.platform == "darwin":
        return f"the per-user temporary directory, as XDG_RUNTIME_DIR {unset}"
    if paths.runtime_dir() == "/tmp":
        return f"fallback to /tmp, as XDG_RUNTIME_DIR {unset} and /run/user/{os.getuid()} missing"
    return f"fallback to /run/user/{os.getuid()}, as XDG_RUNTIME_DIR {unset}"


def _config_file_source(path: str | None) -> str:
    if path is not None:
        return "--config"
    if os.environ.get("DEPLOYD_CONFIG"):
        return "DEPLOYD_CONFIG"
    return "default"


def _show(
    config: Config, credentials: SlackCredentials | None, path: str | None, as_json: bool
) -> int:
    from deployd.config import env_name
    from deployd_client.redaction import mask_secrets

    file_path = config.file or (os.path.abspath(path) if path else paths.config_path())
    rows = effective_values(config)
    slack = None
    if credentials is not None:
        slack = {
            "mode": credentials.mode,
            "value": credentials.secret.masked(),
            "source": credentials.source,
        }
    if as_json:
        import json

        document = {
            "file": {
                "path": file_path,
                "exists": config.file is not None,
                "source": _config_file_source(path),
            },
            "socket": {"path": paths.socket_path(), "source": socket_source()},
            "values": {
                key: {
                    "value": mask_secrets(value, key) if isinstance(value, str) else value,
                    "source": source,
                    "env": env_name(*_split(key)),
                }
                for key, value, source in rows
            },
            "slack_credentials": slack,
        }
        print(json.dumps(document, indent=2, sort_keys=True))
        return exitcodes.OK

    exists = "" if config.file else " (missing: the defaults apply)"
    table = [
        ("config file", file_path + exists, _config_file_source(path)),
        ("socket", paths.socket_path(), socket_source()),
        *((key, _display(key, value), source) for key, value, source in rows),
    ]
    if slack is not None:
        table.append(("slack credentials", f"{slack['mode']} {slack['value']}", slack["source"]))
    else:
        table.append(("slack credentials", "none: Slack is off", "default"))
    key_width = max(len(row[0]) for row in table) + 2
    value_width = max(len(row[1]) for row in table) + 2
    print(f"{'KEY'.ljust(key_width)}{'VALUE'.ljust(value_width)}SOURCE")
    for key, value, source in table:
        print(f"{key.ljust(key_width)}{value.ljust(value_width)}{source}")
    return exitcodes.OK


def _split(key: str) -> tuple[str | None, str]:
    section, _, name = key.rpartition(".")
    return (section or None, name)


def _display(key: str, value: Any) -> str:
    from deployd.reload import describe_value
    from deployd_client.redaction import mask_secrets

    if isinstance(value, str):
        return mask_secrets(value, key)
    return describe_value(value, key)


# --- reload ---


def _reload(as_json: bool) -> int:
    from deployd_client.autostart import connect

    with connect(autostart=False) as connection:
        result = connection.request("reload", timeout=30.0)
    if as_json:
        import json

        print(json.dumps(result, indent=2, sort_keys=True))
        return exitcodes.OK
    where = result.get("file") or "the defaults (no config file)"
    changes = result.get("changed") or []
    if not changes:
        print(f"reloaded {where}: no changes")
    else:
        print(f"reloaded {where}; applied to leases granted from now on:")
        for change in changes:
            print(f"  {_describe(change)}")
    waiting = result.get("restart_required") or []
    if waiting:
        print("not applied until the daemon restarts:")
        for change in waiting:
            print(f"  {_describe(change)}")
    return exitcodes.OK


def _describe(change: dict[str, Any]) -> str:
    return f"{change['key']} {change['old']} -> {change['new']} ({change['source']})"
