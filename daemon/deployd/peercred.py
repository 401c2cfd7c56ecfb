"""The credentials of the process at the other end of a Unix socket connection."""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass

# macOS <sys/un.h>: the socket option level and option names for local sockets.
_SOL_LOCAL = 0
_LOCAL_PEERCRED = 0x001
_LOCAL_PEERPID = 0x002
# struct xucred: cr_version (u_int), cr_uid (uid_t), cr_ngroups (short), cr_groups[16] (gid_t).
_XUCRED_SIZE = 4 + 4 + 4 + 16 * 4


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The peer's user id, and its pid where the platform reports it."""

    uid: int
    pid: int | None


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """Return the peer's credentials: SO_PEERCRED on Linux, LOCAL_PEERCRED on macOS.

    Returns None on platforms that offer neither; the socket directory's
    0700 mode is then the only guard against other users.
    """
    if sys.platform.startswith("linux"):
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", data)
        return PeerCredentials(uid=uid, pid=pid or None)
    if sys.platform == "darwin":
        data = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE)
        _version, uid = struct.unpack_from("=II", data)
        try:
            pid_data = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID, struct.calcsize("i"))
            (pid,) = struct.unpack("i", pid_data)
        except OSError:
            pid = 0
        return PeerCredentials(uid=uid, pid=pid or None)
    return None
