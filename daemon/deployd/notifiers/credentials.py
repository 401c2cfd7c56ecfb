"""Slack credentials: a bot token or an incoming-webhook URL, and how to keep them secret.

Where they come from, first match wins: ``DEPLOYD_SLACK_TOKEN``, then
``SLACK_BOT_TOKEN``, then the file named by ``slack.token_file``; then
``DEPLOYD_SLACK_WEBHOOK_URL``, then the file named by
``slack.webhook_url_file``. A token wins over a webhook URL because only a
token can thread and update messages. A credentials file must not be
readable or writable by group or others.

The value is wrapped in Secret, whose ``str`` and ``repr`` are masked, and
every error text that leaves the notifier goes through ``Secret.redact``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from deployd.config import SlackConfig
from deployd.errors import ConfigError

TOKEN_VARIABLES = ("DEPLOYD_SLACK_TOKEN", "SLACK_BOT_TOKEN")
WEBHOOK_VARIABLE = "DEPLOYD_SLACK_WEBHOOK_URL"
MASK = "[masked]"

# Slack token and webhook shapes, masked in any text as a second line of
# defence after the exact values.
_TOKEN_PATTERN = re.compile(r"xox[a-z]-[A-Za-z0-9-]+|xoxe\.[A-Za-z0-9.-]+")
_WEBHOOK_PATTERN = re.compile(r"(/services/)[A-Za-z0-9/_-]+")


def redact(text: str) -> str:
    """Return ``text`` with anything shaped like a Slack token or webhook URL path masked.

    For text that may hold a secret that is not at hand as a Secret, such as
    a config value under a misspelt key.
    """
    text = _TOKEN_PATTERN.sub(MASK, text)
    return _WEBHOOK_PATTERN.sub(r"\1" + MASK, text)


class Secret:
    """A token or webhook URL. Printing it shows a masked form; ``reveal()`` returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself, for the HTTP client only."""
        return self._value

    def masked(self) -> str:
        """Return a form that identifies the kind of secret without revealing it."""
        if self._value.startswith(("http://", "https://")):
            scheme, _, rest = self._value.partition("://")
            return f"{scheme}://{rest.split('/', 1)[0]}/{MASK}"
        return f"{self._value[:5]}{MASK}" if self._value.startswith("xox") else MASK

    def redact(self, text: str) -> str:
        """Return ``text`` with this secret, its URL path and anything token-shaped masked."""
        if self._value:
            text = text.replace(self._value, self.masked())
        if self._value.startswith(("http://", "https://")):
            path = "/" + self._value.partition("://")[2].partition("/")[2]
            if len(path) > 1:
                text = text.replace(path, "/" + MASK)
        text = _TOKEN_PATTERN.sub(MASK, text)
        return _WEBHOOK_PATTERN.sub(r"\1" + MASK, text)

    def __repr__(self) -> str:
        return f"Secret({self.masked()!r})"

    __str__ = masked


@dataclass(frozen=True, slots=True)
class SlackCredentials:
    """The credentials the daemon uses: ``mode`` is ``bot`` or ``webhook``.

    ``source`` names where the secret came from (a variable or a file path)
    and is safe to show.
    """

    mode: str
    secret: Secret
    source: str


def load_credentials(
    config: SlackConfig, environ: Mapping[str, str] | None = None
) -> SlackCredentials | None:
    """Return the configured Slack credentials, or None when Slack is off.

    Raises ConfigError naming the variable or file at fault when a value is
    empty or malformed, or when a credentials file cannot be read or is open
    to group or others.
    """
    environ = os.environ if environ is None else environ
    for variable in TOKEN_VARIABLES:
        if environ.get(variable, "").strip():
            return SlackCredentials("bot", _token(environ[variable], variable, None), variable)
    if config.token_file:
        text = read_secret_file(config.token_file, "slack.token_file")
        return SlackCredentials(
            "bot", _token(text, "slack.token_file", config.token_file), config.token_file
        )
    if environ.get(WEBHOOK_VARIABLE, "").strip():
        url = _webhook_url(environ[WEBHOOK_VARIABLE], WEBHOOK_VARIABLE, None)
        return SlackCredentials("webhook", url, WEBHOOK_VARIABLE)
    if config.webhook_url_file:
        text = read_secret_file(config.webhook_url_file, "slack.webhook_url_file")
        url = _webhook_url(text, "slack.webhook_url_file", config.webhook_url_file)
        return SlackCredentials("webhook", url, config.webhook_url_file)
    return None


def read_secret_file(path: str, key: str) -> str:
    """Return the contents of a credentials file after checking that only its owner can use it."""
    try:
        with open(path, encoding="utf-8") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            if mode & 0o077:
                raise ConfigError(
                    key,
                    path,
                    f"the file is readable or writable by group or others (mode {mode:04o}), "
                    f"so the secret in it is not private; run 'chmod 600 {path}'",
                )
            return handle.read()
    except FileNotFoundError:
        raise ConfigError(key, path, "the file does not exist") from None
    except PermissionError:
        raise ConfigError(
            key, path, "the file cannot be read by this user; make it yours with mode 600"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, path, f"the file cannot be read: {exc}") from None


def _token(text: str, key: str, path: str | None) -> Secret:
    value = text.strip()
    display_value = path if path is not None else MASK
    if not value:
        raise ConfigError(key, display_value, "the Slack token is empty")
    if value.startswith(("http://", "https://")):
        raise ConfigError(
            key,
            display_value,
            "holds a URL, not a bot token; put an incoming-webhook URL in "
            f"slack.webhook_url_file or {WEBHOOK_VARIABLE} instead",
        )
    if any(char.isspace() for char in value):
        raise ConfigError(key, display_value, "the Slack token contains spaces or several lines")
    return Secret(value)


def _webhook_url(text: str, key: str, path: str | None) -> Secret:
    value = text.strip()
    display_value = path if path is not None else MASK
    if not value.startswith(("http://", "https://")) or any(char.isspace() for char in value):
        raise ConfigError(
            key,
            display_value,
            "must hold one incoming-webhook URL (https://hooks.slack.com/services/...)",
        )
    return Secret(value)
