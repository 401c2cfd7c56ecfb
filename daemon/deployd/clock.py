"""The machine clock that judges lease expiry in a store shared by one machine.

Wall-clock time can jump (NTP steps, a user setting the date), which would
expire leases early or keep them late. Expiry on one machine is therefore
measured on a clock that never jumps and keeps counting while the machine
sleeps, tagged with the boot it belongs to: a reading from an earlier boot
means every daemon of that boot is gone, so its leases are expired.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClockReading:
    """A point in time on the machine clock: the boot it belongs to and seconds since an origin."""

    boot_id: str
    seconds: float


def _linux_boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_int32)]


def _darwin_boot_id() -> str | None:
    """Return macOS's boot time (``kern.boottime``) as the boot id."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    libc = ctypes.CDLL(library, use_errno=True)
    boot_time = _Timeval()
    size = ctypes.c_size_t(ctypes.sizeof(boot_time))
    result = libc.sysctlbyname(
        b"kern.boottime", ctypes.byref(boot_time), ctypes.byref(size), None, 0
    )
    if result != 0:
        return None
    return f"{boot_time.tv_sec}.{boot_time.tv_usec:06d}"


class MachineClock:
    """Read the machine clock: CLOCK_BOOTTIME on Linux, CLOCK_MONOTONIC on macOS.

    Both count time spent asleep. Where neither the clock nor a boot id is
    available, the wall clock is used and wall-clock jumps are not guarded.
    """

    def __init__(self) -> None:
        boot_id: str | None = None
        self._clock_id: int | None = None
        if sys.platform.startswith("linux"):
            boot_id = _linux_boot_id()
            self._clock_id = getattr(time, "CLOCK_BOOTTIME", None)
        elif sys.platform == "darwin":
            boot_id = _darwin_boot_id()
            self._clock_id = time.CLOCK_MONOTONIC
        if boot_id is None or self._clock_id is None:
            # NOTE: wall-clock fallback: a clock step moves every expiry with it.
            self._clock_id = None
            boot_id = "wall-clock"
        self.boot_id = boot_id

    def __call__(self) -> ClockReading:
        if self._clock_id is None:
            return ClockReading(self.boot_id, time.time())
        return ClockReading(self.boot_id, time.clock_gettime(self._clock_id))
