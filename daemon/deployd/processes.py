"""Process identities and exit notification for process-bound leases.

A pid alone does not name a process: once a process has exited and been reaped,
the kernel may give its pid to a new process. A ``ProcessIdentity`` pairs the
pid with the process's start time, so a lease bound to a process is never kept
by a later process that happens to get the same pid.

Exits are noticed without polling where the OS allows it: through a pidfd on
Linux 5.3 and later, and through a kqueue ``EVFILT_PROC`` filter on macOS and
the BSDs. Elsewhere, and where the OS rejects those calls, the process is polled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import select
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import anyio.to_thread

logger = logging.getLogger("deployd.processes")

# Upper bound on the parents that ancestors() follows, far above the depth of
# real process trees.
_MAX_ANCESTRY_DEPTH = 1024

# pidfd_open or kqueue errors that mean the mechanism is missing or forbidden for
# every process (an old kernel, a seccomp filter), not only for one pid.
_PERMANENT_ERRNOS = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES})

# Mechanisms that failed with one of the errors above, so they are not tried again.
_unavailable_mechanisms: set[str] = set()

# Reasons for polling that have been logged, so each is logged once per daemon.
_logged_fallbacks: set[str] = set()

_PS_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process named by its pid and its start time.

    ``start_time`` is an opaque string. It is equal for two readings of the same
    process and differs for a later process that gets the same pid, within the
    resolution that ``identify`` documents.
    """

    pid: int
    start_time: str

    def __post_init__(self) -> None:
        _check_pid(self.pid)

    def to_json(self) -> dict[str, object]:
        """Return the identity as a JSON object for the daemon's state file."""
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProcessIdentity:
        """Build an identity from ``to_json()`` output. Raise ValueError on any other shape."""
        pid = data.get("pid")
        start_time = data.get("start_time")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(
                f"invalid pid {pid!r} in process identity: expected a positive integer"
            )
        if not isinstance(start_time, str) or not start_time:
            raise ValueError(
                f"invalid start_time {start_time!r} for pid {pid}: expected a non-empty string"
            )
        return cls(pid=pid, start_time=start_time)


@dataclass(frozen=True, slots=True)
class _ProcessStatus:
    """One reading of a process's start time, parent and exit state from the OS."""

    start_time: str
    parent_pid: int
    has_exited: bool


# --- Linux: /proc ---------------------------------------------------------------


@functools.cache
def _linux_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        # NOTE: without a boot id, a process from an earlier boot with the same
        # pid and start tick as a live one would be taken for it.
        return "unknown-boot"


def _read_procfs(pid: int) -> _ProcessStatus | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None

    # Field 2, the command name, is in parentheses and may itself contain spaces
    # and parentheses, so fields are counted from the last ")". After it, index 0
    # is field 3 (state), index 1 is field 4 (ppid), index 19 is field 22 (starttime).
    fields = stat[stat.rindex(b")") + 1 :].split()
    state = fields[0].decode("ascii")
    parent = int(fields[1])
    start_ticks = fields[19].decode("ascii")

    # "Z" is a zombie, exited but not yet reaped. "X" is a process being torn down.
    return _ProcessStatus(
        start_time=f"{_linux_boot_id()}:{start_ticks}",
        parent_pid=parent,
        has_exited=state in ("Z", "X"),
    )


# --- macOS: libproc -------------------------------------------------------------

_PROC_PIDTBSDINFO = 3
_MAXCOMLEN = 16
_SZOMB = 5


class _ProcBsdInfo(ctypes.Structure):
    """``struct proc_bsdinfo`` from macOS's <sys/proc_info.h>."""

    _fields_ = [
        ("pbi_flags", ctypes.c_uint32),
        ("pbi_status", ctypes.c_uint32),
        ("pbi_xstatus", ctypes.c_uint32),
        ("pbi_pid", ctypes.c_uint32),
        ("pbi_ppid", ctypes.c_uint32),
        ("pbi_uid", ctypes.c_uint32),
        ("pbi_gid", ctypes.c_uint32),
        ("pbi_ruid", ctypes.c_uint32),
        ("pbi_rgid", ctypes.c_uint32),
        ("pbi_svuid", ctypes.c_uint32),
        ("pbi_svgid", ctypes.c_uint32),
        ("rfu_1", ctypes.c_uint32),
        ("pbi_comm", ctypes.c_char * _MAXCOMLEN),
        ("pbi_name", ctypes.c_char * (2 * _MAXCOMLEN)),
        ("pbi_nfiles", ctypes.c_uint32),
        ("pbi_pgid", ctypes.c_uint32),
        ("pbi_pjobc", ctypes.c_uint32),
        ("e_tdev", ctypes.c_uint32),
        ("e_tpgid", ctypes.c_uint32),
        ("pbi_nice", ctypes.c_int32),
        ("pbi_start_tvsec", ctypes.c_uint64),
        ("pbi_start_tvusec", ctypes.c_uint64),
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    return ctypes.CDLL(library, use_errno=True)


def _read_libproc(pid: int) -> _ProcessStatus | None:
    # NOTE: this path is written against the macOS headers but is not run by the
    # test suite, which runs on Linux.
    libc = _libc()
    if libc is None:
        return _read_ps(pid)

    info = _ProcBsdInfo()
    size = libc.proc_pidinfo(
        pid, _PROC_PIDTBSDINFO, ctypes.c_uint64(0), ctypes.byref(info), ctypes.sizeof(info)
    )
    if size <= 0:
        if ctypes.get_errno() == errno.ESRCH:
            return None
        # Any error but ESRCH means that the process exists, so ps reads it instead.
        return _read_ps(pid)
    if size < ctypes.sizeof(info):
        return _read_ps(pid)

    return _ProcessStatus(
        start_time=f"{info.pbi_start_tvsec}.{info.pbi_start_tvusec:06d}",
        parent_pid=info.pbi_ppid,
        has_exited=info.pbi_status == _SZOMB,
    )


# --- Other platforms: ps ----------------------------------------------------------


def _read_ps(pid: int) -> _ProcessStatus | None:
    # NOTE: `ps -o lstart` has a resolution of one second, so a pid reused within
    # the second its previous process started is taken for that process.
    command = ["ps", "-o", "stat=", "-o", "ppid=", "-o", "lstart=", "-p", str(pid)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        timeout=_PS_TIMEOUT_SECONDS,
        env={**os.environ, "LC_ALL": "C"},
    )

    # ps exits with 1 and prints nothing when no process has the pid.
    parts = result.stdout.split()
    if result.returncode != 0 or len(parts) < 3:
        return None
    return _ProcessStatus(
        start_time=" ".join(parts[2:]),
        parent_pid=int(parts[1]),
        has_exited=parts[0].startswith("Z"),
    )


def _select_reader() -> Callable[[int], _ProcessStatus | None]:
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/stat"):
        return _read_procfs
    if sys.platform == "darwin":
        return _read_libproc
    return _read_ps


_read_status = _select_reader()


# --- Public queries ----------------------------------------------------------------


def _check_pid(pid: int) -> None:
    if pid <= 0:
        raise ValueError(f"invalid pid {pid}: expected a positive integer")


def identify(pid: int) -> ProcessIdentity | None:
    """Read the identity of the process with this pid.

    Return None when no process has the pid, and also when the process is a
    zombie: it has exited and only waits for its parent to reap it, so a lease
    bound to it must be freed.

    The start time comes from field 22 of ``/proc/PID/stat`` (clock ticks since
    boot, 10 ms where USER_HZ is 100) and the boot id on Linux, from ``proc_pidinfo`` (1 µs)
    on macOS, and from ``ps -o lstart`` (1 s) elsewhere. A pid that is reused
    within one such unit of its previous process's start is not detected.
    On platforms that use ``ps`` this starts a process, so async callers should
    run it in a worker thread. Raise ValueError when pid is not positive.
    """
    _check_pid(pid)
    status = _read_status(pid)
    if status is None or status.has_exited:
        return None
    return ProcessIdentity(pid=pid, start_time=status.start_time)


def is_alive(identity: ProcessIdentity) -> bool:
    """Return whether the process still runs.

    It does when its pid exists, is not a zombie and has the recorded start time.
    """
    current = identify(identity.pid)
    return current is not None and current.start_time == identity.start_time


def parent_pid(pid: int) -> int | None:
    """Return the pid of the process's parent.

    Return None when no process has the pid, and when its parent is outside this
    pid namespace or it has none (the kernel reports 0 for both). A zombie
    still reports its parent.
    """
    _check_pid(pid)
    status = _read_status(pid)
    if status is None or status.parent_pid <= 0:
        return None
    return status.parent_pid


def ancestors(pid: int) -> list[int]:
    """Return the pids of the process's parent, grandparent and so on, up to pid 1.

    The tree is read one process at a time, so a process that exits during the
    walk ends the list early. The list is empty when no process has the pid.
    """
    chain: list[int] = []
    current = pid
    for _ in range(_MAX_ANCESTRY_DEPTH):
        parent = parent_pid(current)

        # A pid seen before means the tree changed while it was read.
        if parent is None or parent == pid or parent in chain:
            break

        chain.append(parent)
        if parent == 1:
            break
        current = parent
    return chain


# --- Waiting for an exit -------------------------------------------------------------


def _log_polling_fallback(reason: str) -> None:
    if reason in _logged_fallbacks:
        return
    _logged_fallbacks.add(reason)
    logger.warning("%s, so process exits are polled from now on", reason)


def _record_setup_failure(mechanism: str, identity: ProcessIdentity, error: OSError) -> None:
    if error.errno in _PERMANENT_ERRNOS:
        _unavailable_mechanisms.add(mechanism)
        _log_polling_fallback(f"{mechanism} is unavailable ({error})")
        return
    logger.warning(
        "%s failed for pid %d, so its exit is polled: %s", mechanism, identity.pid, error
    )


async def _wait_readable(fd: int, identity: ProcessIdentity, mechanism: str) -> bool:
    """Wait until fd, which watches identity's pid, reports an exit.

    Return False when the wait failed and the caller should poll instead.
    """
    # The pid may have been reused between identify() and opening fd, and then fd
    # watches the new process, so the identity is checked once fd exists.
    if not is_alive(identity):
        return True
    try:
        await anyio.wait_readable(fd)
    except OSError as exc:
        logger.warning(
            "waiting on %s for pid %d failed, so its exit is polled: %s",
            mechanism,
            identity.pid,
            exc,
        )
        return False
    return True


async def _wait_with_pidfd(identity: ProcessIdentity) -> bool:
    if sys.platform != "linux":
        return False

    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return True
    except OSError as exc:
        _record_setup_failure("pidfd_open", identity, exc)
        return False

    try:
        return await _wait_readable(pidfd, identity, "pidfd_open")
    finally:
        os.close(pidfd)


async def _wait_with_kqueue(identity: ProcessIdentity) -> bool:
    # NOTE: this path is written for macOS and the BSDs but is not run by the test
    # suite, which runs on Linux.
    if sys.platform == "linux" or sys.platform == "win32":
        return False

    try:
        queue = select.kqueue()
    except OSError as exc:
        _record_setup_failure("kqueue", identity, exc)
        return False

    try:
        # The kqueue's own descriptor becomes readable once NOTE_EXIT is pending, so
        # the event loop can watch it like a socket.
        event = select.kevent(
            identity.pid,
            filter=select.KQ_FILTER_PROC,
            flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
            fflags=select.KQ_NOTE_EXIT,
        )
        try:
            queue.control([event], 0, 0)
        except ProcessLookupError:
            return True
        except OSError as exc:
            _record_setup_failure("kqueue", identity, exc)
            return False
        return await _wait_readable(queue.fileno(), identity, "kqueue")
    finally:
        queue.close()


async def _check_alive(identity: ProcessIdentity) -> bool:
    # The ps reader starts a process, which must not block the event loop.
    if _read_status is _read_ps:
        return await anyio.to_thread.run_sync(is_alive, identity)
    return is_alive(identity)


async def _wait_by_polling(identity: ProcessIdentity, poll_interval: float) -> None:
    while await _check_alive(identity):
        await anyio.sleep(poll_interval)


def _notification_mechanism() -> str | None:
    if hasattr(os, "pidfd_open") and "pidfd_open" not in _unavailable_mechanisms:
        return "pidfd_open"
    if hasattr(select, "kqueue") and "kqueue" not in _unavailable_mechanisms:
        return "kqueue"
    return None


async def wait_for_exit(
    identity: ProcessIdentity, poll_interval: float = 0.25, *, force_polling: bool = False
) -> None:
    """Wait until the process of ``identity`` has exited.

    Return at once when it has already exited, is a zombie, or its pid now
    belongs to another process. The exit is reported by a pidfd on Linux and a
    kqueue on macOS and the BSDs. When those are missing or rejected, or when
    ``force_polling`` is true, ``is_alive`` is checked every ``poll_interval``
    seconds. Cancelling the wait closes every descriptor it opened. Raise
    ValueError when ``poll_interval`` is not positive.
    """
    if poll_interval <= 0:
        raise ValueError(f"invalid poll_interval {poll_interval!r}: expected seconds > 0")

    mechanism = None if force_polling else _notification_mechanism()
    if mechanism == "pidfd_open" and await _wait_with_pidfd(identity):
        return
    if mechanism == "kqueue" and await _wait_with_kqueue(identity):
        return

    if mechanism is None and not force_polling:
        _log_polling_fallback(f"no pidfd_open or kqueue on {sys.platform}")
    await _wait_by_polling(identity, poll_interval)
