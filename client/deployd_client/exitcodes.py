"""Exit codes of the ``deployd`` command, after BSD sysexits.h."""

OK = 0
USAGE = 64  # bad arguments or a request the daemon rejected as invalid
UNAVAILABLE = 69  # the lease store cannot be reached and the policy is "closed"
INTERNAL = 70  # a bug or an unexpected error in deployd itself
BUSY = 75  # the lock is held by someone else, or a wait timed out
LEASE_LOST = 76  # the lease was lost while the deploy ran
NO_PERMISSION = 77  # the socket is not ours, or the lease belongs to someone else
CONFIG = 78  # the configuration is invalid

# Error codes of the protocol, mapped to the exit code the command ends with.
BY_ERROR_CODE = {
    "bad_request": USAGE,
    "invalid_argument": USAGE,
    "unsupported_version": USAGE,
    "unknown_op": USAGE,
    "line_too_long": USAGE,
    "lock_busy": BUSY,
    "wait_timeout": BUSY,
    "frozen": BUSY,
    "store_busy": BUSY,
    "store_unavailable": UNAVAILABLE,
    "lease_lost": LEASE_LOST,
    "not_holder": NO_PERMISSION,
    "permission_denied": NO_PERMISSION,
    "config_invalid": CONFIG,
    "shutting_down": UNAVAILABLE,
    "too_many_connections": BUSY,
    "internal": INTERNAL,
}


# Exit codes of a daemon that failed to start which a client passes on as they are.
DAEMON_START_CODES = frozenset({NO_PERMISSION, CONFIG, UNAVAILABLE})


def for_error_code(code: str) -> int:
    """Return the exit code for a protocol error code; unknown codes are internal errors."""
    return BY_ERROR_CODE.get(code, INTERNAL)
