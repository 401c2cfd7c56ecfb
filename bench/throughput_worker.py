"""One client of the throughput benchmark: hold and release one lock in a closed loop.

Usage: throughput_worker.py SOCKET LOCK

Protocol with the coordinator (throughput.py): the worker connects, prints
``ready``, then reads one line ``START END`` (CLOCK_MONOTONIC seconds, which
all processes of the machine share). From START until END it sends ``hold``
with a wait, and ``release`` by lease id as soon as the hold is granted. At END
it abandons a hold still waiting by closing its connection, so the daemon
withdraws the request. It then prints one JSON object: the send, grant and
release times of every pair, the errors by code and the pushed events by name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from deployd_client.protocol import ClientError, Connection, DaemonError

# Longer than any run, so a waiting hold ends by END, never by its own timeout.
HOLD_WAIT = 120.0
RELEASE_TIMEOUT = 10.0


def run_pairs(connection: Connection, lock: str, end: float) -> dict[str, Any]:
    """Hold and release ``lock`` until ``end``, and return the pairs, errors and events."""
    pairs: list[tuple[float, float, float]] = []
    errors: dict[str, int] = {}
    events: dict[str, int] = {}
    pid = os.getpid()

    def count_event(message: dict[str, Any]) -> None:
        name = str(message.get("event"))
        events[name] = events.get(name, 0) + 1

    while time.monotonic() < end:
        sent = time.monotonic()
        try:
            lease = connection.request(
                "hold", count_event, timeout=end - sent, lock=lock, pid=pid, wait=HOLD_WAIT
            )
        except DaemonError as exc:
            errors[exc.code] = errors.get(exc.code, 0) + 1
            continue
        except ClientError:
            break  # END passed while the hold was waiting
        granted = time.monotonic()
        try:
            connection.request("release", timeout=RELEASE_TIMEOUT, lease_id=lease["lease_id"])
        except DaemonError as exc:
            errors[f"release:{exc.code}"] = errors.get(f"release:{exc.code}", 0) + 1
            continue
        pairs.append((sent, granted, time.monotonic()))
    return {"pairs": pairs, "errors": errors, "events": events}


def main() -> None:
    socket_path, lock = sys.argv[1], sys.argv[2]
    connection = Connection.connect(socket_path)
    try:
        connection.request("hello", timeout=30)
        print("ready", flush=True)
        start, end = (float(value) for value in sys.stdin.readline().split())
        time.sleep(max(0.0, start - time.monotonic()))
        result = run_pairs(connection, lock, end)
    finally:
        connection.close()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
