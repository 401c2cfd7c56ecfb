"""A daemon at its connection limit rejects new clients with a clear error and a quiet log.

The limit is 256 connections. Clients past it get ``too_many_connections``
(exit 75, a temporary failure: retry later), and rejections write at most
one log line per 10 s, not one per client.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from harness import DaemonProcess, Workstation, wait_until

LIMIT = 256


def test_full_daemon_rejects_quietly(
    workstation: Workstation, start: Callable[..., DaemonProcess]
) -> None:
    start(workstation)
    offset = workstation.log_file.stat().st_size
    connections: list[socket.socket] = []
    try:
        for _ in range(LIMIT):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(workstation.socket))
            connections.append(client)
        # The daemon accepts in the background: full once a client is turned away.
        wait_until(lambda: workstation.deployd("status").returncode == 75, timeout=30)
        rejected = [workstation.deployd("status") for _ in range(5)]
    finally:
        for client in connections:
            client.close()

    for result in rejected:
        assert result.returncode == 75, result.stderr
        assert "too many connections (256); close idle clients and retry" in result.stderr
    log = workstation.log_file.read_bytes()[offset:].decode(errors="replace")
    # At least six rejections, and one line per 10 s of them.
    assert 1 <= log.count("too many connections") <= 2, log
    wait_until(lambda: workstation.deployd("status").returncode == 0, timeout=30)
