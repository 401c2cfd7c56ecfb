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

from deployd.errors import ConfigError, ConfigErrors
from deployd_client import paths
from deployd_client.durations import parse_duration
from deployd_client.names import MAX_TTL, MIN_TTL, lock_name_problem

DEFAULT_TTL = 30.0
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
        # On Firestore every poll of the first waiter reads four documents, and
        # reads are billed: 1 s halves the cost of 0.5 s for a release noticed
        # up to half a second later.
        return 0.2 if self.kind == "sqlite" else 1.0


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


def _default_state_dir() -> str:
    """Return the state directory from the environment, or the default if that is invalid.

    load_config reports a relative DEPLOYD_STATE_DIR; a Config built without it
    (the one that logs a failed start) still gets a usable directory.
    """
    try:
        return paths.state_dir()
    except paths.PathError:
        return paths.default_state_dir()


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
    state_dir: str = field(default_factory=_default_state_dir)
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
    # NOTE: a relative path in the file is resolved against the current
    # directory, which is / for a daemon that a client started.
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return os.path.abspath(os.path.expanduser(text))


def _absolute_path(value: object) -> str:
    """Parse a path from a DEPLOYD_* variable: expand ``~``; the result must be absolute."""
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    expanded = os.path.expanduser(text)
    if not os.path.isabs(expanded):
        raise ValueError(_relative_rule(text))
    return os.path.normpath(expanded)


def _relative_rule(value: str, default: str | None = None) -> str:
    """Return the rule that a relative path from the environment breaks, with the fix."""
    rule = (
        "must be an absolute path, because a relative one names another path in each "
        f"working directory; set it to one such as {os.path.abspath(value)!r}"
    )
    if default is None:
        return f"{rule}, or unset it"
    return f"{rule}, or unset it to use the default {default}"


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

_SECTIONS = ("store", "lease", "slack", "log", "server")


def dotted(section: str | None, name: str) -> str:
    """Return the key as written in messages: ``lease.ttl`` or ``on_store_error``."""
    return f"{section}.{name}" if section else name


def env_name(section: str | None, name: str) -> str:
    """Return the environment variable that overrides a key."""
    return "DEPLOYD_" + (f"{section}_{name}" if section else name).upper()


# The DEPLOYD_* variables that deployd reads besides those of config keys: the
# client's own, those that a deploy under a lease gets from ``deployd run`` and
# ``deployd acquire --format env``, and the Slack credentials of
# deployd.notifiers.credentials.
OTHER_VARIABLES = (
    "DEPLOYD_SOCKET",
    "DEPLOYD_CONFIG",
    "DEPLOYD_NO_AUTOSTART",
    "DEPLOYD_DEBUG",
    "DEPLOYD_LEASE_ID",
    "DEPLOYD_LOCK",
    "DEPLOYD_FENCING_TOKEN",
    "DEPLOYD_LEASE_DEPTH",
    "DEPLOYD_OUTER_LEASES",
    "DEPLOYD_LEASE_OWNER",
    "DEPLOYD_SLACK_TOKEN",
    "DEPLOYD_SLACK_WEBHOOK_URL",
)

# The XDG base directory variables that deployd reads (deployd_client.paths).
XDG_VARIABLES = ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_CONFIG_HOME")


def known_variables() -> frozenset[str]:
    """Return every DEPLOYD_* variable that deployd reads."""
    return frozenset(env_name(*key) for key in _KEYS) | frozenset(OTHER_VARIABLES)


def environment_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Return a warning for each variable of the environment that deployd ignores.

    Those are DEPLOYD_* variables that deployd does not read, such as a
    misspelt config key, and XDG_* base directories set to a relative path.
    The warnings name variables, never their values, which may be secrets.
    Tools other than deployd may set DEPLOYD_* variables, so none of this is
    an error.
    """
    environ = os.environ if environ is None else environ
    known = known_variables()
    warnings = [
        _unknown_variable_warning(variable, known)
        for variable in sorted(environ)
        if variable.startswith("DEPLOYD_") and variable not in known
    ]
    for variable in XDG_VARIABLES:
        value = environ.get(variable)
        if value and not os.path.isabs(value):
            warnings.append(
                f"{variable} is a relative path, so deployd ignores it, as the XDG Base "
                "Directory Specification says to; set it to an absolute path, or unset it"
            )
    return warnings


def _unknown_variable_warning(variable: str, known: frozenset[str]) -> str:
    """Return the warning for a DEPLOYD_* variable that deployd does not read, with a guess."""
    suffix = variable.removeprefix("DEPLOYD_")
    # A key's name without its section (TTL for LEASE_TTL), or a section's name alone (LOG).
    suggestions = [
        env_name(*key) for key in _KEYS if suffix in (key[1].upper(), (key[0] or "").upper())
    ]
    if not suggestions:
        import difflib

        by_suffix = {name.removeprefix("DEPLOYD_"): name for name in sorted(known)}
        suggestions = [
            by_suffix[match] for match in difflib.get_close_matches(suffix, by_suffix, n=1)
        ]
    warning = f"{variable} is not a deployd variable, so it has no effect"
    if suggestions:
        return f"{warning}; did you mean {' or '.join(map(_describe_variable, suggestions))}?"
    return (
        f"{warning}; a config key is set by DEPLOYD_ followed by its section and name in upper "
        "case, such as DEPLOYD_LEASE_TTL for lease.ttl"
    )


def _describe_variable(variable: str) -> str:
    """Return the variable and the config key it sets, if any: ``DEPLOYD_LEASE_TTL (lease.ttl)``."""
    for key in _KEYS:
        if env_name(*key) == variable:
            return f"{variable} ({dotted(*key)})"
    return variable


# The project of the Firestore emulator when neither store.project nor
# GOOGLE_CLOUD_PROJECT names one.
# NOTE: deployd.stores.firestore.resolve_project applies the same rule with its
# own copy of this name; test_config_environment checks that they agree.
EMULATOR_PROJECT = "deployd-local"


def firestore_project(
    store: StoreConfig, environ: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """Return the Google Cloud project of the Firestore store and what chose it, or None.

    The order is ``store.project``, GOOGLE_CLOUD_PROJECT, then EMULATOR_PROJECT
    when FIRESTORE_EMULATOR_HOST is set.
    """
    environ = os.environ if environ is None else environ
    if store.project:
        return store.project, "store.project"
    if environ.get("GOOGLE_CLOUD_PROJECT"):
        return environ["GOOGLE_CLOUD_PROJECT"], "GOOGLE_CLOUD_PROJECT"
    if environ.get("FIRESTORE_EMULATOR_HOST"):
        return EMULATOR_PROJECT, "the emulator's project, as FIRESTORE_EMULATOR_HOST is set"
    return None


# Hints for unknown keys named like Slack credentials (``slack.token``,
# ``slack.webhook_url``): the config file never contains the credential itself.
# The variable names are those of deployd.notifiers.credentials.
_TOKEN_HINT = (
    "the config file holds no Slack token; put the bot token in a file that only you can "
    "read (chmod 600) and set slack.token_file to its path, or set DEPLOYD_SLACK_TOKEN "
    "(or SLACK_BOT_TOKEN), then remove this line"
)
_WEBHOOK_HINT = (
    "the config file holds no webhook URL; put the URL in a file that only you can read "
    "(chmod 600) and set slack.webhook_url_file to its path, or set "
    "DEPLOYD_SLACK_WEBHOOK_URL, then remove this line"
)


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the config file (if it exists) and the environment; validate everything.

    Raises ConfigError naming the key, the value and the rule, or ConfigErrors
    when several keys are invalid. An explicitly given ``path`` (``--config``)
    or ``DEPLOYD_CONFIG`` that does not exist is an error; the default path may
    be missing.
    """
    environ = os.environ if environ is None else environ
    if path is not None:
        named_by: str | None = "--config"
    elif "DEPLOYD_CONFIG" in environ:
        named_by = "DEPLOYD_CONFIG"
    else:
        named_by = None
    try:
        file_path = path or paths.config_path()
    except paths.RelativePath as exc:
        raise ConfigError(
            exc.variable, exc.value, _relative_rule(exc.value, paths.default_config_path())
        ) from None
    loader = _Loader()

    text = _read_file(file_path, named_by)
    if text is not None:
        loader.apply_file(file_path, text)
    loader.apply_environment(environ)
    loader.raise_problems()

    config = _build(loader.values, file_path if text is not None else None, loader.sources)
    loader.check_relations(config)
    loader.raise_problems()
    return config


def _read_file(path: str, named_by: str | None) -> str | None:
    """Return the file's text, or None when it is missing and ``named_by`` is None."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        if named_by == "--config":
            raise ConfigError(
                "--config", path, "the file does not exist; create it, or leave --config out"
            ) from None
        if named_by is not None:
            raise ConfigError(
                named_by,
                path,
                "the file does not exist; create it (an empty file means the defaults), or "
                f"unset {named_by} to use the default path {paths.default_config_path()}",
            ) from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config file", path, f"the file cannot be read: {exc}") from exc


class _Loader:
    """The values of one load: parsed, as written, where each came from, and every problem."""

    def __init__(self) -> None:
        self.values: dict[tuple[str | None, str], Any] = {}
        self.sources: dict[str, str] = {}
        # The raw value of each key set in the file or the environment, so that
        # messages quote it as the user wrote it ("30s", not 30.0).
        self.written: dict[str, object] = {}
        self.problems: list[ConfigError] = []

    def raise_problems(self) -> None:
        """Raise the problems found so far: one ConfigError, or ConfigErrors for several."""
        if len(self.problems) == 1:
            raise self.problems[0]
        if self.problems:
            raise ConfigErrors(self.problems)

    def apply_file(self, path: str, text: str) -> None:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config file", path, f"invalid TOML: {exc}") from exc

        for top_key, top_value in document.items():
            if top_key not in _SECTIONS and isinstance(top_value, dict):
                source = _section_source(path, text, top_key)
                rule = _unknown_section_rule(top_key, top_value)
                self.problems.append(ConfigError(top_key, top_value, rule, source, shown="a table"))
            elif top_key not in _SECTIONS:
                source = _file_source(path, text, None, top_key)
                self.set((None, top_key), top_value, source)
            elif not isinstance(top_value, dict):
                rule = "must be a table, for example [lease]"
                self.problems.append(ConfigError(top_key, top_value, rule, path))
            else:
                for name, value in top_value.items():
                    source = _file_source(path, text, top_key, name)
                    self.set((top_key, name), value, source)

    def apply_environment(self, environ: Mapping[str, str]) -> None:
        for key in _KEYS:
            variable = env_name(*key)
            if variable in environ:
                self.set(key, environ[variable], variable, from_environment=True)

    def set(
        self,
        key: tuple[str | None, str],
        raw: object,
        source: str,
        from_environment: bool = False,
    ) -> None:
        """Parse and keep one value; note a problem instead when it is invalid.

        A path from the environment must be absolute, as ``paths`` requires of
        DEPLOYD_STATE_DIR, so the client and the daemon agree on it.
        """
        name = dotted(*key)
        parser = _KEYS.get(key)
        if parser is None:
            self.problems.append(ConfigError(name, raw, _unknown_key_rule(key), source))
            return
        if parser is _path and from_environment:
            parser = _absolute_path
        try:
            self.values[key] = parser(raw)
        except ValueError as exc:
            self.problems.append(ConfigError(name, raw, str(exc), source))
            return
        self.sources[name] = source
        self.written[name] = raw

    def check_relations(self, config: Config) -> None:
        """Check the rules that involve more than one key."""
        lease = config.lease
        if not MIN_TTL <= lease.ttl <= MAX_TTL:
            self._relation_problem(
                config, "lease.ttl", lease.ttl, f"must be between {MIN_TTL:g}s and {MAX_TTL:g}s"
            )
        timings = lease.timings()
        renew_every_valid = timings.renew_every < lease.ttl
        if not renew_every_valid:
            self._relation_problem(
                config,
                "lease.renew_every",
                timings.renew_every,
                f"must be shorter than lease.ttl ({lease.ttl:g}s), "
                "or the lease expires between renewals",
            )
        # A derived deadline is not reported as well when renew_every is at fault.
        deadline_checked = renew_every_valid or "lease.renew_deadline" in self.written
        if deadline_checked and not timings.renew_every < timings.renew_deadline < lease.ttl:
            self._relation_problem(
                config,
                "lease.renew_deadline",
                timings.renew_deadline,
                f"must be longer than lease.renew_every ({timings.renew_every:g}s) and shorter "
                f"than lease.ttl ({lease.ttl:g}s), so a holder learns of a loss "
                "before others can take the lock",
            )
        if config.store.kind == "firestore" and firestore_project(config.store) is None:
            self._relation_problem(
                config,
                "store.project",
                None,
                "the Firestore store needs a Google Cloud project; set store.project "
                "or GOOGLE_CLOUD_PROJECT",
            )

    def _relation_problem(self, config: Config, key: str, value: object, rule: str) -> None:
        """Note a problem with ``key``, quoting its value as written, or saying it is unset."""
        if key in self.written:
            problem = ConfigError(key, self.written[key], rule, config.sources.get(key))
        elif value is None:
            problem = ConfigError(key, None, rule, shown="unset")
        else:
            shown = f"{value:g}s (unset, so derived from lease.ttl)"
            problem = ConfigError(key, value, rule, shown=shown)
        self.problems.append(problem)


def _unknown_key_rule(key: tuple[str | None, str]) -> str:
    """Return the rule for an unknown key: where a key of that name goes, and the known keys."""
    section, name = key
    lowered = name.lower()
    if "token" in lowered:
        return f"unknown key; {_TOKEN_HINT}"
    if "webhook" in lowered:
        return f"unknown key; {_WEBHOOK_HINT}"
    known = ", ".join(dotted(*known_key) for known_key in _KEYS if known_key[0] == section)
    if section is None:
        known += f", and the sections {_section_list()}"
    suggestions = _suggest_keys(section, name)
    if not suggestions:
        return f"unknown key; known keys here: {known}"
    places = " or ".join(_place(suggested, section) for suggested in suggestions)
    return f"unknown key; did you mean {places}? Known keys here: {known}"


def _unknown_section_rule(name: str, table: dict[str, Any]) -> str:
    """Return the rule for an unknown ``[name]`` table: the section meant, and every section.

    The section meant contains every key of the table, or else has a name close to ``name``.
    """
    import difflib

    suggestions = []
    if table:
        suggestions = [
            section for section in _SECTIONS if all((section, key) in _KEYS for key in table)
        ]
    if not suggestions:
        suggestions = difflib.get_close_matches(name, _SECTIONS, n=2)
    top_level = ", ".join(dotted(*key) for key in _KEYS if key[0] is None)
    known = f"sections are {_section_list()}, and the top-level keys {top_level}"
    if not suggestions:
        return f"unknown section; the {known}"
    sections = " or ".join(f"[{section}]" for section in suggestions)
    return f"unknown section; did you mean {sections}? The {known}"


def _suggest_keys(section: str | None, name: str) -> list[tuple[str | None, str]]:
    """Return the known keys that an unknown ``name`` in ``section`` probably means.

    First the keys of that name in other sections (``ttl`` at the top level
    means ``lease.ttl``), then close spellings in the same section, then close
    spellings anywhere.
    """
    import difflib

    same_name = [key for key in _KEYS if key[1] == name and key[0] != section]
    if same_name:
        return same_name
    here = [key[1] for key in _KEYS if key[0] == section]
    close = difflib.get_close_matches(name, here, n=2)
    if close:
        return [(section, match) for match in close]
    names = sorted({key[1] for key in _KEYS})
    close = difflib.get_close_matches(name, names, n=2)
    return [key for key in _KEYS if key[1] in close]


def _place(key: tuple[str | None, str], section: str | None) -> str:
    """Return where ``key`` is written, for a message about a key found in ``section``."""
    known_section, name = key
    if known_section == section:
        return dotted(*key)
    if known_section is None:
        return f"{name} at the top level, before the first [section]"
    return f"{name} under [{known_section}] ({dotted(*key)})"


def _section_list() -> str:
    return ", ".join(f"[{section}]" for section in _SECTIONS)


def _section_source(path: str, text: str, section: str) -> str:
    """Return ``PATH:LINE`` for the ``[section]`` line, or just the path."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() == f"[{section}]":
            return f"{path}:{number}"
    return path


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


def with_overrides(config: Config, **changes: Any) -> Config:
    """Return a copy of ``config`` with top-level fields replaced (for tests and tools)."""
    return replace(config, **changes)
