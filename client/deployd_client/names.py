"""Validation of lock names, shared by the client and the daemon."""

LOCK_NAME_RULE = "[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
MAX_LOCK_NAME_LENGTH = 128
# Limits that the daemon applies to requests. The client checks them first, so
# a bad value gets a message that names the option instead of a protocol error.
MAX_TEXT_LENGTHS = {"reason": 1000, "commit": 200, "revision": 200}
MIN_TTL = 1.0
MAX_TTL = 86400.0
MAX_WAIT = 7 * 86400.0

_ALPHANUMERIC = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ALLOWED = _ALPHANUMERIC | frozenset("._:-")


def lock_name_problem(name: object) -> str | None:
    """Return why ``name`` is not a valid lock name, or None when it is valid.

    The rule is the regular expression in LOCK_NAME_RULE; it is checked by hand
    because importing ``re`` would slow down every client call.
    """
    if not isinstance(name, str):
        return f"lock name must be a string, got {type(name).__name__}"
    if not name:
        return (
            f"invalid lock name '': the name is empty. It must match {LOCK_NAME_RULE}, "
            "for example 'api' or 'prod:api'"
        )
    if len(name) > MAX_LOCK_NAME_LENGTH:
        return (
            f"lock name {name[:20]!r}... is {len(name)} characters long; "
            f"the maximum is {MAX_LOCK_NAME_LENGTH} (rule: {LOCK_NAME_RULE})"
        )
    if name[0] in _ALPHANUMERIC and all(char in _ALLOWED for char in name):
        return None
    return (
        f"invalid lock name {name!r}: it must match {LOCK_NAME_RULE} "
        "(letters, digits and . _ : -, starting with a letter or digit)"
    )
