"""Where the socket, the state and the config live; shared by the client and the daemon.

Both sides must compute the same socket path from the same environment, so
every rule lives here and nowhere else.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

SOCKET_NAME = "deployd.sock"

# sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, including the
# terminating NUL byte.
MAX_SOCKET_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103


class PathError(Exception):
    """A path from the environment cannot be used; the message names the value and the fix."""


class RelativePath(PathError):
    """A path variable is set to a relative path, which means another path in each directory.

    ``what`` is what each working directory would get ("a daemon") and
    ``default`` what unsetting the variable gives ("the default socket").
    """

    def __init__(self, variable: str, value: str, what: str, default: str) -> None:
        self.variable = variable
        self.value = value
        super().__init__(
            f"{variable}={value!r} is a relative path, so each working directory would get "
            f"{what} of its own; set {variable} to an absolute path (such as "
            f"{os.path.abspath(value)!r}), or unset it to use {default}"
        )


class SocketPathTooLong(PathError):
    """The socket path does not fit in a Unix socket address on this platform."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"socket path {path!r} is {len(os.fsencode(path))} bytes long, but this "
            f"platform allows at most {MAX_SOCKET_PATH_BYTES}; set DEPLOYD_SOCKET to a "
            "shorter path"
        )


def runtime_dir() -> str:
    """Return the per-user directory that holds the socket directory.

    Order: ``$XDG_RUNTIME_DIR``; on macOS the per-user temporary directory;
    ``/run/user/UID`` when it exists and belongs to this user (so cron jobs and
    ``sudo -u`` shells, which lack ``XDG_RUNTIME_DIR``, find the same socket as
    a login shell); else ``/tmp``, where the socket directory is ``/tmp/deployd-UID``.
    A relative ``$XDG_RUNTIME_DIR`` is ignored, as for ``xdg_base()``.
    """
    configured = os.environ.get("XDG_RUNTIME_DIR")
    if configured and os.path.isabs(configured):
        return configured
    if sys.platform == "darwin":
        try:
            darwin_temp = os.confstr("CS_DARWIN_USER_TEMP_DIR")
        except (ValueError, OSError):
            darwin_temp = None
        if darwin_temp:
            return darwin_temp.rstrip("/")
    uid = os.getuid()
    systemd_dir = f"/run/user/{uid}"
    try:
        if os.stat(systemd_dir).st_uid == uid:
            return systemd_dir
    except OSError:
        pass
    return "/tmp"


def socket_dir() -> str:
    """Return the private directory (mode 0700) that contains the daemon's socket.

    Raises RelativePath when DEPLOYD_SOCKET is set to a relative path.
    """
    explicit = _explicit_socket()
    if explicit:
        return os.path.dirname(explicit)
    base = runtime_dir()
    if base == "/tmp":
        return f"/tmp/deployd-{os.getuid()}"
    return os.path.join(base, "deployd")


def socket_path() -> str:
    """Return the daemon's socket path: ``$DEPLOYD_SOCKET`` or ``socket_dir()/deployd.sock``.

    Raises RelativePath when DEPLOYD_SOCKET is set to a relative path.
    """
    explicit = _explicit_socket()
    if explicit:
        return explicit
    return os.path.join(socket_dir(), SOCKET_NAME)


def _explicit_socket() -> str | None:
    """Return ``$DEPLOYD_SOCKET`` normalized, None when unset; reject a relative path."""
    explicit = os.environ.get("DEPLOYD_SOCKET")
    if not explicit:
        return None
    if not os.path.isabs(explicit):
        raise RelativePath("DEPLOYD_SOCKET", explicit, "a daemon", "the default socket")
    return os.path.normpath(explicit)


def state_dir() -> str:
    """Return the directory for the store file, the daemon's state and its log.

    Raises RelativePath when DEPLOYD_STATE_DIR is set to a relative path.
    """
    explicit = _explicit_path("DEPLOYD_STATE_DIR", "a state directory", default_state_dir)
    return explicit or default_state_dir()


def default_state_dir() -> str:
    """Return the state directory when DEPLOYD_STATE_DIR is unset: in ``$XDG_STATE_HOME/``."""
    return os.path.join(xdg_base("XDG_STATE_HOME", ".local", "state"), "deployd")


def config_path() -> str:
    """Return the config file: ``$DEPLOYD_CONFIG`` or ``default_config_path()``.

    Raises RelativePath when DEPLOYD_CONFIG is set to a relative path.
    """
    explicit = _explicit_path("DEPLOYD_CONFIG", "a config file", default_config_path)
    return explicit or default_config_path()


def default_config_path() -> str:
    """Return the config file when DEPLOYD_CONFIG is unset: in ``$XDG_CONFIG_HOME/deployd/``."""
    return os.path.join(xdg_base("XDG_CONFIG_HOME", ".config"), "deployd", "config.toml")


def xdg_base(variable: str, *fallback: str) -> str:
    """Return the XDG base directory ``$variable``, or ``~/`` joined with ``fallback``.

    The XDG Base Directory Specification (version 0.8) states that a relative
    path in these variables is invalid and should be ignored, so a relative
    value counts as unset, as an empty one does.
    """
    base = os.environ.get(variable)
    if base and os.path.isabs(base):
        return base
    return os.path.join(os.path.expanduser("~"), *fallback)


def _explicit_path(variable: str, what: str, default: Callable[[], str]) -> str | None:
    """Return ``$variable`` with ``~`` expanded, None when unset; reject a relative path."""
    explicit = os.environ.get(variable)
    if not explicit:
        return None
    expanded = os.path.expanduser(explicit)
    if not os.path.isabs(expanded):
        raise RelativePath(variable, explicit, what, f"the default {default()}")
    return os.path.normpath(expanded)


class socket_address:
    """Give an address for ``path`` that fits in a Unix socket address, in a ``with`` block.

    A path within MAX_SOCKET_PATH_BYTES is used as it is. On Linux a longer one
    is reached through ``/proc/self/fd/N/NAME``, where N is an open descriptor of
    the socket's directory; the kernel resolves it to the same file, so the
    client and the daemon meet on the same socket whatever the path's length.
    Elsewhere a longer path raises SocketPathTooLong. The address is valid only
    inside the ``with`` block. (A class rather than contextlib.contextmanager,
    whose import would slow down every client call.)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._directory_fd: int | None = None

    def __enter__(self) -> str:
        path = self.path
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
            return path
        if not sys.platform.startswith("linux"):
            raise SocketPathTooLong(path)
        directory, name = os.path.split(path)
        self._directory_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        short = f"/proc/self/fd/{self._directory_fd}/{name}"
        if len(os.fsencode(short)) > MAX_SOCKET_PATH_BYTES:
            self._close()
            raise SocketPathTooLong(path)
        return short

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._directory_fd is not None:
            os.close(self._directory_fd)
            self._directory_fd = None
