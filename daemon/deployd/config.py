"""Configuration: a TOML file plus ``DEPLOYD_*`` environment variables.

Every key has a default, so a missing file means SQLite in the state
directory with Slack off. A value in the environment wins over the file. Each
effective value remembers where it came from, for ``deployd config show``.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from deployd.errors import ConfigError
from deployd_client import paths
from deployd_client.durations import parse_duration
from deployd_client.names import lock_name_problem

DEFAULT_TTL = 30.0
MIN_TTL = 1.0
MAX_TTL = 86400.0
DEFAULT_CHANNEL = "#daily-orchestration"


def default_renew_every(ttl: float) -> float:
    """Return the renewal interval for ``ttl``: a third of it."""
    return ttl / 3


def default_renew_deadline(ttl: float) -> float:
    """Return how long renewals may fail before the lease counts as lost.

    ``ttl - 5s``, but never more than two thirds of ``ttl``, so short test TTLs
    still leave the holder time to stop before the lease expires for others.
    """
    return ttl - min(5.0, ttl / 3)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The ``[store]`` section: which lease store and where."""

    kind: str = "sqlite"
    path: str | None = None
    project: str | None = None
    database: str = "(default)"
    namespace: str = "default"
    timeout: float = 5.0
    poll_interval: float | None = None
    busy_timeout: float = 60.0

    def sqlite_path(self, state_dir: str) -> str:
        """Return the SQLite file: ``path`` or ``locks.sqlite3`` in the state directory."""
        return self.path or os.path.join(state_dir, "locks.sqlite3")

    def effective_poll_interval(self) -> float:
        """Return how often a queued waiter re-reads a lock held by another daemon."""
        if self.poll_interval is not None:
            return self.poll_interval
        return 0.2 if self.kind == "sqlite" else 0.5


@dataclass(frozen=True, slots=True)
class LeaseTimings:
    """TTL, renewal interval and renew deadline of one lease, in seconds."""

    ttl: float
    renew_every: float
    renew_deadline: float


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    """The ``[lease]`` section."""

    ttl: float = DEFAULT_TTL
    renew_every: float | None = None
    renew_deadline: float | None = None
    max_hold: float = 1200.0

    def timings(self, ttl: float | None = None) -> LeaseTimings:
        """Return the timings for a lease of ``ttl`` (default: the configured TTL).

        Configured ``renew_every`` and ``renew_deadline`` apply to the configured
        TTL only; a lease that asks for another TTL gets them derived from it.
        """
        if ttl is None or ttl == self.ttl:
            return LeaseTimings(
                self.ttl,
                self.renew_every or default_renew_every(self.ttl),
                self.renew_deadline or default_renew_deadline(self.ttl),
            )
        return LeaseTimings(ttl, default_renew_every(ttl), default_renew_deadline(ttl))


@dataclass(frozen=True, slots=True)
class SlackConfig:
    """The ``[slack]`` section. Slack is off unless a token or webhook URL is configured.

    ``commit_url`` and ``revision_url`` are link templates whose placeholders
    are listed in LINK_PLACEHOLDERS. ``timeout`` bounds each request to Slack.
    """

    channel: str = DEFAULT_CHANNEL
    token_file: str | None = None
    webhook_url_file: str | None = None
    api_url: str | None = None
    commit_url: str | None = None
    revision_url: str | None = None
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    """The ``[log]`` section."""

    level: str = "info"
    file: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The ``[server]`` section: limits on client connections to the socket."""

    # Seconds a client may leave a request line without its newline before the
    # daemon responds with an error and closes the connection.
    half_line_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Config:
    """The daemon's effective configuration.

    ``sources`` maps each dotted key to where its value came from: ``default``,
    the file path with its line, or the environment variable.
    """

    store: StoreConfig = field(default_factory=StoreConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    slack: SlackConfig = field(default_factory=SlackConfig)
    log: LogConfig = field(default_factory=LogConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    on_store_error: str = "open"
    state_dir: str = field(default_factory=paths.state_dir)
    clock_offset: float = 0.0
    file: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    def wall_clock(self) -> Callable[[], float]:
        """Return this daemon's wall clock: the system's, moved by ``clock_offset``.

        ``clock_offset`` exists to test that a workstation whose clock is wrong
        still judges leases correctly; the wall clock only labels times.
        """
        offset = self.clock_offset
        if not offset:
            return time.time
        return lambda: time.time() + offset


# --- value parsers: each returns the parsed value or raises ValueError with the rule ---


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    return value


def _duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s or 10m, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"must be a duration such as 30s or 10m, got {type(value).__name__}")


def _signed_duration(value: object) -> float:
    """Parse a duration that may be negative, such as ``-10m`` for a clock that is behind."""
    if isinstance(value, str) and value.strip().startswith("-"):
        return -_duration(value.strip()[1:])
    return _duration(value)


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _string(value)
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def _path(value: object) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return os.path.abspath(os.path.expanduser(text))


def _namespace(value: object) -> str:
    text = _string(value)
    problem = lock_name_problem(text)
    if problem:
        raise ValueError(problem.replace("lock name", "namespace"))
    return text


def _log_level(value: object) -> str:
    text = _string(value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return text


# The placeholders of slack.commit_url and slack.revision_url: ``service`` is
# the lock name after its last ``:`` and ``environment`` the part before it
# (empty when the lock has no ``:``), so ``prod:api`` gives ``api`` and ``prod``.
LINK_PLACEHOLDERS = ("lock", "service", "environment", "commit", "revision")


def _channel(value: object) -> str:
    text = _string(value).strip()
    if not text or any(char.isspace() for char in text):
        raise ValueError(
            "must be a channel name such as #deploys or a channel ID such as C0123ABCD"
        )
    return text


def _http_url(value: object) -> str:
    text = _string(value).strip()
    if not text.startswith(("http://", "https://")) or len(text) <= len("https://"):
        raise ValueError("must be an http:// or https:// URL")
    return text


def _link_template(*required: str) -> Callable[[object], str]:
    """Return a parser for a link template that uses one of ``required``."""

    def parse(value: object) -> str:
        import string

        text = _http_url(value)
        try:
            fields = [item[1:] for item in string.Formatter().parse(text) if item[1] is not None]
        except ValueError as exc:
            raise ValueError(f"is not a valid template: {exc}") from None
        known = ", ".join("{" + name + "}" for name in LINK_PLACEHOLDERS)
        for name, spec, conversion in fields:
            if name not in LINK_PLACEHOLDERS or spec or conversion:
                raise ValueError(f"uses {{{name}}}; the placeholders are {known}")
        if not any(name in required for name, _, _ in fields):
            wanted = " or ".join("{" + name + "}" for name in required)
            raise ValueError(f"must contain {wanted}")
        return text

    return parse


# Every key: (section, name) -> parser. The environment variable is
# DEPLOYD_ + SECTION_ + NAME in upper case, for example DEPLOYD_LEASE_TTL.
_KEYS: dict[tuple[str | None, str], Callable[[object], Any]] = {
    (None, "on_store_error"): _choice("open", "closed"),
    (None, "state_dir"): _path,
    (None, "clock_offset"): _signed_duration,
    ("store", "kind"): _choice("sqlite", "firestore"),
    ("store", "path"): _path,
    ("store", "project"): _string,
    ("store", "database"): _string,
    ("store", "namespace"): _namespace,
    ("store", "timeout"): _positive_duration,
    ("store", "poll_interval"): _positive_duration,
    ("store", "busy_timeout"): _positive_duration,
    ("lease", "ttl"): _positive_duration,
    ("lease", "renew_every"): _positive_duration,
    ("lease", "renew_deadline"): _positive_duration,
    ("lease", "max_hold"): _positive_duration,
    ("slack", "channel"): _channel,
    ("slack", "token_file"): _path,
    ("slack", "webhook_url_file"): _path,
    ("slack", "api_url"): _http_url,
    ("slack", "commit_url"): _link_template("commit"),
    ("slack", "revision_url"): _link_template("revision", "service"),
    ("slack", "timeout"): _positive_duration,
    ("log", "level"): _log_level,
    ("log", "file"): _path,
    ("server", "half_line_timeout"): _positive_duration,
}

_SECTIONS = {"store", "lease", "slack", "log", "server"}


def dotted(section: str | None, name: str) -> str:
    """Return the key as written in messages: ``lease.ttl`` or ``on_store_error``."""
    return f"{section}.{name}" if section else name


def env_name(section: str | None, name: str) -> str:
    """Return the environment variable that overrides a key."""
    return "DEPLOYD_" + (f"{section}_{name}" if section else name).upper()


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the config file (if it exists) and the environment; validate everything.

    Raises ConfigError naming the key, the value and the rule on the first
    invalid entry. An explicitly given ``path`` that does not exist is an error;
    the default path may be missing.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or "DEPLOYD_CONFIG" in environ
    file_path = path or paths.config_path()
    values: dict[tuple[str | None, str], Any] = {}
    sources: dict[str, str] = {}

    text = _read_file(file_path, required=explicit)
    if text is not None:
        _apply_file(file_path, text, values, sources)
    _apply_environment(environ, values, sources)

    config = _build(values, file_path if text is not None else None, sources)
    _check_relations(config)
    return config


def _read_file(path: str, required: bool) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        if required:
            raise ConfigError("config", path, "the file does not exist") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", path, f"the file cannot be read: {exc}") from exc


def _apply_file(
    path: str,
    text: str,
    values: dict[tuple[str | None, str], Any],
    sources: dict[str, str],
) -> None:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", path, f"invalid TOML: {exc}") from exc

    for top_key, top_value in document.items():
        if top_key in _SECTIONS:
            if not isinstance(top_value, dict):
                raise ConfigError(top_key, top_value, "must be a table, for example [lease]", path)
            for name, value in top_value.items():
                _set(
                    values, sources, (top_key, name), value, _file_source(path, text, top_key, name)
                )
        else:
            _set(
                values, sources, (None, top_key), top_value, _file_source(path, text, None, top_key)
            )


def _file_source(path: str, text: str, section: str | None, name: str) -> str:
    """Return ``PATH:LINE`` for the line that sets the key, or just the path."""
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped.strip("[]").strip()
            continue
        key = stripped.split("=", 1)[0].strip().strip('"')
        if "=" in stripped and key == name and current == section:
            return f"{path}:{number}"
    return path


def _apply_environment(
    environ: Mapping[str, str],
    values: dict[tuple[str | None, str], Any],
    sources: dict[str, str],
) -> None:
    for key in _KEYS:
        variable = env_name(*key)
        if variable in environ:
            _set(values, sources, key, environ[variable], variable)


def _set(
    values: dict[tuple[str | None, str], Any],
    sources: dict[str, str],
    key: tuple[str | None, str],
    raw: object,
    source: str,
) -> None:
    parser = _KEYS.get(key)
    if parser is None:
        known = ", ".join(dotted(*known_key) for known_key in _KEYS if known_key[0] == key[0])
        raise ConfigError(dotted(*key), raw, f"unknown key; known keys here: {known}", source)
    try:
        values[key] = parser(raw)
    except ValueError as exc:
        raise ConfigError(dotted(*key), raw, str(exc), source) from exc
    sources[dotted(*key)] = source


def _build(
    values: dict[tuple[str | None, str], Any], file_path: str | None, sources: dict[str, str]
) -> Config:
    def section(name: str) -> dict[str, Any]:
        return {key[1]: value for key, value in values.items() if key[0] == name}

    top = section(None)  # type: ignore[arg-type]
    for key in _KEYS:
        sources.setdefault(dotted(*key), "default")
    return Config(
        store=StoreConfig(**section("store")),
        lease=LeaseConfig(**section("lease")),
        slack=SlackConfig(**section("slack")),
        log=LogConfig(**section("log")),
        server=ServerConfig(**section("server")),
        file=file_path,
        sources=sources,
        **top,
    )


def _check_relations(config: Config) -> None:
    """Check rules that involve more than one key."""
    lease = config.lease
    source = config.sources.get
    if not MIN_TTL <= lease.ttl <= MAX_TTL:
        raise ConfigError(
            "lease.ttl",
            lease.ttl,
            f"must be between {MIN_TTL:g}s and {MAX_TTL:g}s",
            source("lease.ttl"),
        )
    timings = lease.timings()
    if timings.renew_every >= lease.ttl:
        raise ConfigError(
            "lease.renew_every",
            timings.renew_every,
            f"must be shorter than lease.ttl ({lease.ttl:g}s), "
            "or the lease expires between renewals",
            source("lease.renew_every"),
        )
    if not timings.renew_every < timings.renew_deadline < lease.ttl:
        raise ConfigError(
            "lease.renew_deadline",
            timings.renew_deadline,
            f"must be longer than lease.renew_every ({timings.renew_every:g}s) and shorter "
            f"than lease.ttl ({lease.ttl:g}s), so a holder learns of a loss "
            "before others can take the lock",
            source("lease.renew_deadline"),
        )
    project_known = bool(
        config.store.project
        or os.environ.get("GOOGLE_CLOUD_PROJECT")
        or os.environ.get("FIRESTORE_EMULATOR_HOST")
    )
    if config.store.kind == "firestore" and not project_known:
        raise ConfigError(
            "store.project",
            None,
            "the Firestore store needs a Google Cloud project; set store.project "
            "or GOOGLE_CLOUD_PROJECT",
            source("store.project"),
        )


def with_overrides(config: Config, **changes: Any) -> Config:
    """Return a copy of ``config`` with top-level fields replaced (for tests and tools)."""
    return replace(config, **changes)
