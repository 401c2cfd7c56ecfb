"""Where the socket, the state and the config live; shared by the client and the daemon.

Both sides must compute the same socket path from the same environment, so
every rule lives here and nowhere else.
"""

import os
import sys

SOCKET_NAME = "deployd.sock"

# sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, including the
# terminating NUL byte.
MAX_SOCKET_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103


class SocketPathTooLong(Exception):
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
    """Return the private directory (mode 0700) that holds the daemon's socket."""
    explicit = os.environ.get("DEPLOYD_SOCKET")
    if explicit:
        return os.path.dirname(os.path.abspath(explicit))
    base = runtime_dir()
    if base == "/tmp":
        return f"/tmp/deployd-{os.getuid()}"
    return os.path.join(base, "deployd")


def socket_path() -> str:
    """Return the daemon's socket path: ``$DEPLOYD_SOCKET`` or ``socket_dir()/deployd.sock``."""
    explicit = os.environ.get("DEPLOYD_SOCKET")
    if explicit:
        return os.path.abspath(explicit)
    return os.path.join(socket_dir(), SOCKET_NAME)


def state_dir() -> str:
    """Return the directory for the store file, the daemon's state and its log."""
    explicit = os.environ.get("DEPLOYD_STATE_DIR")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "deployd")


def config_path() -> str:
    """Return the config file: ``$DEPLOYD_CONFIG`` or ``$XDG_CONFIG_HOME/deployd/config.toml``."""
    explicit = os.environ.get("DEPLOYD_CONFIG")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "deployd", "config.toml")


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
