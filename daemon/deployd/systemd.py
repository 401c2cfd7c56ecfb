"""The parts of systemd's service protocol that the daemon uses, with the standard library only.

Socket activation: systemd binds the listening socket itself (``deployd.socket``)
and passes it to the service as file descriptor 3, naming the process it is meant
for in ``LISTEN_PID`` and the count in ``LISTEN_FDS`` (see sd_listen_fds(3)).

Readiness and watchdog: the daemon sends ``READY=1``, ``RELOADING=1``,
``STOPPING=1``, ``STATUS=...`` and ``WATCHDOG=1`` as datagrams to the Unix socket
named by ``NOTIFY_SOCKET``. An address starting with ``@`` is in the abstract
namespace (see sd_notify(3)).

Both read their variables once and remove them from the environment, as
sd_listen_fds and sd_notify do with ``unset_environment``, so that no process
started later mistakes them for its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import MutableMapping

import anyio

logger = logging.getLogger("deployd.systemd")

# The first descriptor that systemd passes (SD_LISTEN_FDS_START in sd-daemon.h).
LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ActivationError(Exception):
    """The socket that systemd passed cannot serve as deployd's listening socket."""


def take_listening_socket(
    environ: MutableMapping[str, str] | None = None,
) -> socket.socket | None:
    """Return the listening socket that systemd passed as fd 3, or None when there is none.

    Returns None when ``LISTEN_PID`` names another process (the variables were
    inherited, not meant for this one). Raises ActivationError when the
    variables are malformed, when more than one socket was passed, or when
    fd 3 is not a listening AF_UNIX stream socket.
    """
    environ = os.environ if environ is None else environ
    listen_pid = environ.get("LISTEN_PID")
    listen_fds = environ.get("LISTEN_FDS")
    for name in _LISTEN_VARIABLES:
        environ.pop(name, None)
    if listen_pid is None and listen_fds is None:
        return None
    if listen_pid != str(os.getpid()):
        logger.debug(
            "ignoring LISTEN_FDS: LISTEN_PID=%s names another process than %d",
            listen_pid,
            os.getpid(),
        )
        return None
    if listen_fds is None or not listen_fds.isdigit():
        raise ActivationError(
            f"LISTEN_FDS must be a number of descriptors, got {listen_fds!r}; "
            "start deployd through deployd.socket or without the LISTEN_* variables"
        )
    count = int(listen_fds)
    if count == 0:
        return None
    if count != 1:
        raise ActivationError(
            f"systemd passed {count} sockets, but deployd serves exactly one; give "
            "deployd.socket a single ListenStream= line"
        )
    return _listening_unix_socket(LISTEN_FDS_START)


def _listening_unix_socket(fd: int) -> socket.socket:
    """Wrap ``fd`` after checking that it is a listening AF_UNIX stream socket."""
    try:
        # The daemon starts no programs, but a descriptor it keeps must not leak into one.
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(
            f"file descriptor {fd} from systemd is not a usable socket: {exc.strerror}"
        ) from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(
            f"file descriptor {fd} from systemd is a {sock.family.name} {sock.type.name} "
            "socket; deployd.socket must use ListenStream= with a file system path"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"file descriptor {fd} from systemd is not a listening socket")
    sock.setblocking(False)
    return sock


def check_socket_path(sock: socket.socket, expected: str) -> None:
    """Check that ``sock`` is bound to the file at ``expected``, where clients look for it.

    Raises ActivationError naming both paths otherwise, because a daemon that
    serves a socket no client finds looks to every client like no daemon.
    """
    bound = sock.getsockname()
    if not isinstance(bound, str) or not bound.startswith("/"):
        raise ActivationError(
            f"the socket from systemd is bound to {bound!r}, not to a file; set "
            f"ListenStream={expected} in deployd.socket"
        )
    try:
        same = os.path.samefile(bound, expected)
    except OSError:
        same = False
    if not same:
        raise ActivationError(
            f"the socket from systemd is {bound}, but clients look for {expected}; make "
            "ListenStream= in deployd.socket and DEPLOYD_SOCKET (or XDG_RUNTIME_DIR) agree"
        )


class NotifySocket:
    """The service manager's notification socket (``NOTIFY_SOCKET``) and watchdog interval.

    Without ``NOTIFY_SOCKET`` every call does nothing, so the daemon sends its
    notifications whether or not systemd started it. A message that cannot be
    sent is logged and dropped: a missed notification must not stop the daemon.
    """

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._failures = 0

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> NotifySocket:
        """Read and remove ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        environ = os.environ if environ is None else environ
        values = {name: environ.pop(name, None) for name in _NOTIFY_VARIABLES}
        address = values["NOTIFY_SOCKET"] or None
        if address is not None and not address.startswith(("/", "@")):
            logger.warning(
                "ignoring NOTIFY_SOCKET=%s: only file system and abstract (@) Unix socket "
                "addresses are supported",
                address,
            )
            address = None
        return cls(address, _watchdog_interval(values["WATCHDOG_USEC"], values["WATCHDOG_PID"]))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens for notifications."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; return whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, address)
        except OSError as exc:
            self._failures += 1
            # The first failure and then every hundredth, so a gone manager cannot flood the log.
            if self._failures % 100 == 1:
                logger.warning(
                    "cannot send %s to NOTIFY_SOCKET %s: %s (failures so far: %d)",
                    assignments[0].partition("=")[0],
                    self.address,
                    exc,
                    self._failures,
                )
            return False
        return True

    def ready(self, status: str) -> None:
        """Tell the manager that the daemon serves its socket."""
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """Tell the manager that the daemon reloads its configuration; ``ready`` ends it."""
        self.send("RELOADING=1", "STATUS=reloading the configuration")

    def stopping(self, status: str) -> None:
        """Tell the manager that the daemon has begun to stop."""
        self.send("STOPPING=1", f"STATUS={status}")

    async def run_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every half watchdog interval until cancelled.

        The pings come from the event loop, so a loop that hangs stops them and
        systemd restarts the daemon (``Restart=on-failure``).
        """
        if self.address is None or self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await anyio.sleep(self.watchdog_interval / 2)


def _watchdog_interval(usec: str | None, pid: str | None) -> float | None:
    """Return the watchdog interval in seconds, or None when the watchdog is off or not ours."""
    if usec is None:
        return None
    if pid is not None and pid != str(os.getpid()):
        logger.debug("ignoring WATCHDOG_USEC: WATCHDOG_PID=%s names another process", pid)
        return None
    if not usec.isdigit() or int(usec) == 0:
        logger.warning(
            "ignoring WATCHDOG_USEC=%r: expected a positive number of microseconds", usec
        )
        return None
    return int(usec) / 1_000_000
