"""Reloading the configuration while the daemon runs.

A reload starts when the config file changes (watchfiles watches its
directory), on SIGHUP, and on the ``reload`` op. A valid file is applied to
leases granted from then on and logged with every key that changed. An
invalid one is rejected with the key, value, rule and ``file:line`` at fault,
and the running config stays.

Some keys cannot change under a running daemon: the store and the state
directory it opened, the clock offset its store and coordinator were built
with, and the Slack notifier's settings. A reload keeps their running values
and reports each change as needing a restart.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio

from deployd.config import Config, load_config
from deployd.errors import ConfigError
from deployd.systemd import NotifySocket
from deployd_client import paths
from deployd_client.autostart import restart_command
from deployd_client.durations import format_duration
from deployd_client.redaction import mask_secrets

logger = logging.getLogger("deployd.config")

# Keys, or key prefixes ending in ".", whose new values apply only after a restart.
RESTART_ONLY = ("store.", "slack.", "state_dir", "clock_offset")

# watchfiles batches the changes of one save: it waits for STEP_MS without a
# change, and at most DEBOUNCE_MS in all, before it reports them. Editors that
# truncate and then write are read once they have finished.
DEBOUNCE_MS = 1000
STEP_MS = 200
# How long the watcher thread waits before it checks for cancellation.
WATCH_TIMEOUT_MS = 1000


def needs_restart(key: str) -> bool:
    """Return whether a change of ``key`` takes effect only when the daemon restarts."""
    return any(
        key == item or (item.endswith(".") and key.startswith(item)) for item in RESTART_ONLY
    )


def value_of(config: Config, key: str) -> Any:
    """Return the value of a dotted key such as ``lease.ttl`` or ``on_store_error``."""
    section, _, name = key.rpartition(".")
    owner = getattr(config, section) if section else config
    return getattr(owner, name)


def describe_value(value: Any, key: str = "") -> str:
    """Return a value as a person reads it: durations as ``30s``, a missing value as ``unset``."""
    if value is None:
        return "unset"
    if isinstance(value, float) and _is_duration(key):
        return format_duration(value) if value >= 0 else "-" + format_duration(-value)
    return mask_secrets(repr(value) if isinstance(value, str) else str(value), key)


def _is_duration(key: str) -> bool:
    name = key.rpartition(".")[2]
    return name in ("ttl", "renew_every", "renew_deadline", "max_hold", "clock_offset") or (
        name.endswith(("timeout", "interval"))
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One key whose value differs between two configs; ``source`` is where the new one is set."""

    key: str
    old: Any
    new: Any
    source: str

    def describe(self) -> str:
        """Return ``key old -> new (source)``."""
        old = describe_value(self.old, self.key)
        new = describe_value(self.new, self.key)
        return f"{self.key} {old} -> {new} ({self.source})"

    def to_json(self) -> dict[str, Any]:
        """Return the change for the ``reload`` op, values as text."""
        return {
            "key": self.key,
            "old": describe_value(self.old, self.key),
            "new": describe_value(self.new, self.key),
            "source": self.source,
        }


def config_changes(old: Config, new: Config) -> list[Change]:
    """Return every key whose value differs between ``old`` and ``new``, in key order."""
    keys = sorted(set(old.sources) | set(new.sources))
    return [
        Change(key, value_of(old, key), value_of(new, key), new.sources.get(key, "default"))
        for key in keys
        if value_of(old, key) != value_of(new, key)
    ]


def keep_restart_only(running: Config, new: Config) -> Config:
    """Return ``new`` with the running values (and sources) of the keys that need a restart."""
    sources = dict(new.sources)
    for key in running.sources:
        if needs_restart(key):
            sources[key] = running.sources[key]
    return replace(
        new,
        store=running.store,
        slack=running.slack,
        state_dir=running.state_dir,
        clock_offset=running.clock_offset,
        sources=sources,
    )


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of a successful reload: the changes applied and those waiting for a restart."""

    file: str | None
    applied: tuple[Change, ...]
    restart_required: tuple[Change, ...]

    def to_json(self) -> dict[str, Any]:
        """Return the result of the ``reload`` op."""
        return {
            "file": self.file,
            "changed": [change.to_json() for change in self.applied],
            "restart_required": [change.to_json() for change in self.restart_required],
        }


class ConfigReloader:
    """Reloads the daemon's config and hands each valid one to ``apply``.

    ``path`` is the config file given on the command line, or None for the
    default (``DEPLOYD_CONFIG`` or ``$XDG_CONFIG_HOME/deployd/config.toml``),
    as for ``load_config``. ``apply`` receives the new effective config, with
    the running values of the keys that need a restart.
    """

    def __init__(
        self,
        config: Config,
        path: str | None,
        apply: Callable[[Config], None],
        notify: NotifySocket | None = None,
        ready_status: str = "serving",
    ) -> None:
        self.config = config
        self.path = path
        self.file_path = os.path.abspath(path) if path else paths.config_path()
        self._apply = apply
        self._notify = notify
        self._ready_status = ready_status
        self._lock = anyio.Lock()
        self._last_text = _read_text(self.file_path)

    async def reload(self, reason: str) -> ReloadResult:
        """Read the config again and apply it; raise ConfigError and keep the old one if invalid."""
        async with self._lock:
            if self._notify is not None:
                self._notify.reloading()
            try:
                return await self._reload(reason)
            finally:
                if self._notify is not None:
                    self._notify.ready(self._ready_status)

    async def _reload(self, reason: str) -> ReloadResult:
        try:
            loaded = await anyio.to_thread.run_sync(load_config, self.path)
        except ConfigError as exc:
            # The message masks secrets (ConfigError), so it may be logged and returned.
            logger.warning("config reload (%s) rejected, the running config stays: %s", reason, exc)
            raise

        new = keep_restart_only(self.config, loaded)
        applied = tuple(config_changes(self.config, new))
        waiting = tuple(
            change for change in config_changes(self.config, loaded) if needs_restart(change.key)
        )
        self.config = new
        self._apply(new)

        where = loaded.file or f"{self.file_path} (missing, so the defaults)"
        if applied:
            logger.info(
                "config reloaded (%s) from %s: %s",
                reason,
                where,
                "; ".join(change.describe() for change in applied),
            )
        else:
            logger.info("config reloaded (%s) from %s: no changes", reason, where)
        if waiting:
            logger.warning(
                "config changes that take effect only after a restart of the daemon (%s), "
                "which keeps the running values until then: %s",
                restart_command(os.getpid(), self._notify is not None and self._notify.enabled),
                "; ".join(change.describe() for change in waiting),
            )
        return ReloadResult(loaded.file, applied, waiting)

    async def reload_quietly(self, reason: str) -> None:
        """Reload, leaving a rejected config to the log line ``reload`` writes."""
        with contextlib.suppress(ConfigError):
            await self.reload(reason)

    async def reload_op(self, connection: object, request: dict[str, Any]) -> dict[str, Any]:
        """Reload now, for the ``reload`` op; an invalid file raises a ``config_invalid`` error."""
        result = await self.reload("reload request")
        return result.to_json()

    async def watch(self, stop: anyio.Event) -> None:
        """Reload whenever the config file's content changes, until ``stop`` is set.

        The file's directory is watched, not the file, so a file that an editor
        or a deploy tool replaces by renaming another over it is seen too. While
        that directory does not exist, its nearest existing parent is watched
        until it appears.
        """
        from watchfiles import awatch

        # watchfiles logs every batch of changes at INFO.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        directory = os.path.dirname(self.file_path)
        while not stop.is_set():
            watched = _nearest_directory(directory)
            logger.debug("watching %s for changes of %s", watched, self.file_path)
            await self._reload_if_changed()
            try:
                async for _changes in awatch(
                    watched,
                    stop_event=stop,
                    recursive=False,
                    debounce=DEBOUNCE_MS,
                    step=STEP_MS,
                    rust_timeout=WATCH_TIMEOUT_MS,
                    # An empty batch every WATCH_TIMEOUT_MS re-reads the file, so an
                    # edit made before the watch took hold is still applied.
                    yield_on_timeout=True,
                    watch_filter=functools.partial(self._concerns_config, watched),
                ):
                    if watched != directory and os.path.isdir(directory):
                        break  # watch the config directory itself from now on
                    if not os.path.isdir(watched):
                        break  # the directory went away: watch its nearest parent
                    await self._reload_if_changed()
            except (OSError, RuntimeError) as exc:
                # watchfiles reports a failed watch as OSError or as its own RuntimeError.
                logger.warning(
                    "cannot watch %s for config changes, so edits apply only on SIGHUP or "
                    "'deployd config reload': %s",
                    watched,
                    exc,
                )
                return

    def _concerns_config(self, watched: str, change: object, path: str) -> bool:
        """Return whether a change of ``path`` may change the config file.

        Other files in the directory (a token file, a log) are ignored. Names
        starting with ``..`` are kept for directories whose files are symlinks
        into a ``..data`` directory that is swapped on each update (Kubernetes
        ConfigMap volumes).
        """
        directory = os.path.dirname(self.file_path)
        if watched != directory:
            return directory == path or directory.startswith(path.rstrip(os.sep) + os.sep)
        name = os.path.basename(path)
        return name == os.path.basename(self.file_path) or name.startswith("..")

    async def _reload_if_changed(self) -> None:
        text = await anyio.to_thread.run_sync(_read_text, self.file_path)
        if text == self._last_text:
            return
        self._last_text = text
        await self.reload_quietly("the file changed")


def _read_text(path: str) -> str | None:
    """Return the file's text, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _nearest_directory(path: str) -> str:
    """Return ``path`` if it is a directory, else its nearest ancestor that is one."""
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
