"""Benchmark 3: the daemon's resident memory, idle and with 200 leases held.

One fresh daemon on SQLite goes through these phases, and VmRSS is read
from /proc/PID/status after each, once the daemon has settled:
1. idle, after start;
2. 200 connection-bound leases: 200 connections, each holding its own lock
   with ``hold`` and no pid, so each lease lives exactly as long as its connection;
3. those 200 connections closed, so the daemon has released every lease;
4. 200 process-bound leases: ``acquire`` with ``pid`` set to one of 200
   sleeping child processes, as ``deployd acquire --pid`` does;
5. those 200 processes stopped, so the daemon has released every lease.
VmHWM, the peak RSS of the daemon's life, is read at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from typing import Any

from benchlib import (
    check_installed_client,
    memory_kib,
    running_daemon,
    stop_process,
    wait_for,
    write_result,
)

TARGET_MIB = 40.0
SETTLE_SECONDS = 1.0
RELEASE_TIMEOUT = 30.0


def wait_for_lease_count(socket_path: str, count: int, what: str) -> None:
    """Wait until the daemon holds ``count`` leases. Raise BenchError after RELEASE_TIMEOUT."""
    wait_for(lambda: held_lease_count(socket_path) == count, RELEASE_TIMEOUT, what, interval=0.2)


def held_lease_count(socket_path: str) -> int:
    """Return how many leases the daemon holds, from its ``status``."""
    from deployd_client.protocol import Connection

    with Connection.connect(socket_path) as connection:
        return len(connection.request("status", timeout=30)["leases"])


def hold_over_connections(socket_path: str, count: int) -> list[Any]:
    """Open ``count`` connections, each holding a lock of its own, and return them."""
    from deployd_client.protocol import Connection

    connections = []
    try:
        for index in range(count):
            connection = Connection.connect(socket_path)
            connections.append(connection)
            connection.request("hold", timeout=30, lock=f"bench-mem-hold-{index}")
    except BaseException:
        for connection in connections:
            connection.close()
        raise
    return connections


def acquire_for_processes(socket_path: str, processes: list[Any]) -> None:
    """Take one lock per process, bound to that process, over one connection."""
    from deployd_client.protocol import Connection

    with Connection.connect(socket_path) as connection:
        for index, process in enumerate(processes):
            connection.request(
                "acquire", timeout=30, lock=f"bench-mem-pid-{index}", pid=process.pid
            )


def sample(pid: int, phase: str, samples: dict[str, Any]) -> None:
    """Record the daemon's memory for ``phase`` after letting it settle."""
    time.sleep(SETTLE_SECONDS)
    samples[phase] = memory_kib(pid)
    print(f"{phase:28} VmRSS {samples[phase]['VmRSS'] / 1024:6.1f} MiB", flush=True)


def measure(leases: int) -> dict[str, Any]:
    """Run the five phases against a fresh daemon and return VmRSS per phase and VmHWM."""
    samples: dict[str, Any] = {}
    with running_daemon() as daemon:
        sample(daemon.pid, "idle", samples)

        connections = hold_over_connections(daemon.socket, leases)
        try:
            wait_for_lease_count(daemon.socket, leases, "the holds")
            sample(daemon.pid, f"{leases}_connection_bound", samples)
        finally:
            for connection in connections:
                connection.close()
        wait_for_lease_count(daemon.socket, 0, "the releases")
        sample(daemon.pid, "after_connection_release", samples)

        sleepers = [
            subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL) for _ in range(leases)
        ]
        try:
            acquire_for_processes(daemon.socket, sleepers)
            sample(daemon.pid, f"{leases}_process_bound", samples)
        finally:
            for sleeper in sleepers:
                stop_process(sleeper)
        wait_for_lease_count(daemon.socket, 0, "the releases")
        sample(daemon.pid, "after_process_release", samples)
        peak = memory_kib(daemon.pid)["VmHWM"]

    rss_mib = {phase: values["VmRSS"] / 1024 for phase, values in samples.items()}
    largest = max(rss_mib.values())
    return {
        "leases": leases,
        "target_mib": TARGET_MIB,
        "rss_mib": rss_mib,
        "peak_rss_mib": peak / 1024,
        "samples_kib": samples,
        "target_met": largest < TARGET_MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leases", type=int, default=200, help="leases per phase (default 200)")
    args = parser.parse_args()
    check_installed_client()
    results = measure(args.leases)
    write_result("memory", results)
    verdict = "met" if results["target_met"] else "MISSED"
    print(f"peak RSS {results['peak_rss_mib']:.1f} MiB; target < {TARGET_MIB:g} MiB {verdict}")


if __name__ == "__main__":
    main()
