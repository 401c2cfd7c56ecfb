"""Masking secrets in text that people see: config errors, log lines, start failures.

A Slack token or webhook URL pasted into the wrong config key must not be
quoted back in an error message, a log line or ``deployd status``. This
module masks anything shaped like one wherever it appears, and under keys
named like a secret (``token``, ``secret``, ``webhook``, ``password``) also
any long random-looking word. The daemon's notifier masks the credentials it
has by their exact value as well (``deployd.notifiers.credentials``).
"""

import re

MASK = "[masked]"

# Slack tokens: bot (xoxb-), user (xoxp-), app-level (xapp-), the legacy
# kinds (xoxa-, xoxo-, xoxr-, xoxs-) and rotating refresh tokens (xoxe.).
_TOKEN = re.compile(r"xox[a-z]-[A-Za-z0-9-]+|xapp-[A-Za-z0-9-]+|xoxe\.[A-Za-z0-9.-]+")
# The secret part of a webhook URL is its path: /services/T../B../XXXX on
# hooks.slack.com (or on a proxy in front of it), /workflows/ and /triggers/.
_SLACK_HOOK = re.compile(r"(hooks\.slack(?:-gov)?\.com/)[^\s'\"\\]+")
_SERVICES_PATH = re.compile(r"(/services/)[A-Za-z0-9/_-]+")
# A word that may be a generated secret: at least 16 letters and digits
# mixed, or 24 of one case mixed with the other (base64, hex, random ids).
_WORD = re.compile(r"[A-Za-z0-9+=]{16,}")
_SECRET_KEY_WORDS = ("token", "secret", "webhook", "password")


def is_secret_key(key: str) -> bool:
    """Return whether a config key or variable name is named like a secret."""
    name = key.rpartition(".")[2].lower()
    return any(word in name for word in _SECRET_KEY_WORDS)


def mask_secrets(text: str, key: str = "") -> str:
    """Return ``text`` with Slack tokens and webhook URL paths masked.

    When ``key`` is named like a secret, long random-looking words are masked
    too, because a secret pasted under such a key need not look like Slack's.
    """
    text = _TOKEN.sub(MASK, text)
    text = _SLACK_HOOK.sub(r"\1" + MASK, text)
    text = _SERVICES_PATH.sub(r"\1" + MASK, text)
    if key and is_secret_key(key):
        text = _WORD.sub(_mask_random_word, text)
    return text


def _mask_random_word(match: re.Match[str]) -> str:
    word = match.group()
    has_digit = any(char.isdigit() for char in word)
    has_letter = any(char.isalpha() for char in word)
    mixed_case = word.lower() != word and word.upper() != word
    if (has_digit and has_letter) or (mixed_case and len(word) >= 24):
        return MASK
    return word
