"""Identifiers: session ids of deploys, acquisition ids and daemon ids."""

from __future__ import annotations

import secrets
import socket
import string
import time

_ALPHABET = string.ascii_lowercase + string.digits
_HOST_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-")
_USER_CHARACTERS = _HOST_CHARACTERS | frozenset("._")


def random_suffix(length: int = 6) -> str:
    """Return ``length`` random lowercase letters and digits.

    They are the base-36 digits of one number below 36 ** ``length``, drawn
    with one call of secrets.randbelow() instead of one call per character.
    """
    number = secrets.randbelow(len(_ALPHABET) ** length)
    characters = []
    for _ in range(length):
        number, digit = divmod(number, len(_ALPHABET))
        characters.append(_ALPHABET[digit])
    return "".join(characters)


def short_hostname() -> str:
    """Return the host name up to the first dot, with unusual characters replaced by ``-``."""
    name = socket.gethostname().split(".", 1)[0] or "localhost"
    return "".join(char if char in _HOST_CHARACTERS else "-" for char in name)


def _clean_user(user: str) -> str:
    return "".join(char if char in _USER_CHARACTERS else "-" for char in user) or "unknown"


def new_session_id(user: str, host: str, now: float | None = None) -> str:
    """Return a deploy's session id: ``{user}@{host}_{UTC timestamp}_{random}``.

    For example ``ana@build-7_20260204T101500Z_k3f9q2``.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{_clean_user(user)}@{host}_{stamp}_{random_suffix()}"


def new_acquisition_id() -> str:
    """Return a random id for one acquisition attempt."""
    return secrets.token_hex(8)


def new_daemon_id(host: str) -> str:
    """Return an id for one run of a daemon: ``{host}-{random}``."""
    return f"{host}-{random_suffix(8)}"
