"""Notifiers, the parts that send deploy events to people, chosen by the config.

Slack is the only notifier. It is on when a bot token or an incoming-webhook
URL is configured (see ``deployd.notifiers.credentials``), and slack-sdk is
imported only then.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from deployd.config import Config
from deployd.errors import ConfigError
from deployd.notifiers.base import Notifier
from deployd.notifiers.credentials import TOKEN_VARIABLES, WEBHOOK_VARIABLE, load_credentials

__all__ = ["Notifier", "create_notifier", "notifier_off"]


def create_notifier(
    config: Config, state_path: str, environ: Mapping[str, str] | None = None
) -> Notifier | None:
    """Return the configured notifier with its outbox in ``state_path``, or None when off.

    Raises ConfigError when a credentials file is missing, unreadable, open to
    group or others, or contains a malformed value.
    """
    credentials = load_credentials(config.slack, environ)
    if credentials is None:
        return None
    missing = [name for name in ("slack_sdk", "aiohttp") if importlib.util.find_spec(name) is None]
    if missing:
        packages = " ".join(name.replace("_", "-") for name in missing)
        raise ConfigError(
            "slack",
            credentials.source,
            f"Slack is configured but {packages} is not installed; install it with "
            f"'pip install {packages}' in deployd's environment, or remove the Slack credentials",
        )
    from deployd.notifiers.outbox import Outbox
    from deployd.notifiers.sender import SlackNotifier

    return SlackNotifier(config.slack, credentials, Outbox(state_path))


def notifier_off(config: Config) -> dict[str, Any]:
    """Return the ``status`` entry of a daemon without a notifier."""
    variables = ", ".join((*TOKEN_VARIABLES, WEBHOOK_VARIABLE))
    return {
        "configured": False,
        "kind": "slack",
        "channel": config.slack.channel,
        "hint": f"Slack is off; set slack.token_file (or {variables}) to turn it on",
    }
