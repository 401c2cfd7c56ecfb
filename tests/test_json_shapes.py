"""The JSON shapes that docs/json.md documents, read from a real daemon.

Each test checks the exact set of fields of one shape, so that a field added
or removed in the code without the page shows up here.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

from harness import DaemonProcess, RawConnection, Workstation, raw_connection

LEASE_RECORD_FIELDS = {
    "lock",
    "holder",
    "session_id",
    "acquisition_id",
    "token",
    "owner",
    "purpose",
    "ttl",
    "acquired_at",
    "renewed_at",
    "expires_in",
}
LEASE_FIELDS = {
    "schema",
    "lease",
    "lease_id",
    "session_id",
    "lock",
    "token",
    "takeover",
    "waited",
    "timings",
    "binding",
    "confirmed_at",
    "degraded",
    "unlocked_reason",
}


def next_event(connection: RawConnection, name: str) -> dict[str, Any]:
    """Return the next event called ``name``, skipping responses and other events."""
    while True:
        message = connection.read(timeout=20)
        if message.get("event") == name:
            return message


def test_acquire_json_shape(workstation: Workstation, start: Callable[..., DaemonProcess]) -> None:
    start(workstation)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        result = workstation.deployd(
            "acquire", "api", "--pid", str(sleeper.pid), "--format", "json"
        )
    finally:
        sleeper.kill()
        sleeper.wait()

    assert result.returncode == 0, result.stderr
    lease = json.loads(result.stdout)
    assert set(lease) == LEASE_FIELDS | {"depth"}
    assert lease["schema"] == 1
    assert lease["depth"] == 1
    assert set(lease["lease"]) == LEASE_RECORD_FIELDS
    assert set(lease["timings"]) == {"ttl", "renew_every", "renew_deadline"}
    assert set(lease["binding"]) == {"kind", "connections", "pids"}
    assert lease["binding"]["pids"] == [sleeper.pid]
    assert lease["lease_id"].startswith(lease["session_id"] + "+")


def test_event_shapes(workstation: Workstation, start: Callable[..., DaemonProcess]) -> None:
    """queue_position, lease_renewed and lease_lost, as a holder and a waiter receive them."""
    start(workstation)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with (
            raw_connection(workstation.socket) as holder,
            raw_connection(workstation.socket) as waiter,
        ):
            granted = holder.call("hold", lock="api", ttl=3)
            assert granted["ok"], granted
            assert set(granted["result"]) == LEASE_FIELDS
            renewed = next_event(holder, "lease_renewed")

            request_id = waiter.send("acquire", lock="api", wait=30, pid=sleeper.pid)
            position = next_event(waiter, "queue_position")

            forced = workstation.deployd("force-unlock", "api", "--reason", "shape test", "--yes")
            assert forced.returncode == 0, forced.stderr
            lost = next_event(holder, "lease_lost")
            waiter.response(request_id, timeout=20)
    finally:
        sleeper.kill()
        sleeper.wait()

    assert set(renewed) == {
        "event",
        "schema",
        "lock",
        "lease_id",
        "token",
        "confirmed_at",
        "expires_in",
    }
    assert renewed["schema"] == 1
    assert renewed["lease_id"] == granted["result"]["session_id"]
    assert set(position) == {
        "event",
        "schema",
        "id",
        "lock",
        "position",
        "holder",
        "waiting_for",
        "eta",
        "typical_duration",
        "frozen",
    }
    assert position["schema"] == 1
    assert position["id"] == request_id
    assert position["position"] == 1
    assert set(position["holder"]) == LEASE_RECORD_FIELDS
    assert position["eta"] is None
    assert position["frozen"] is None
    assert set(lost) == {"event", "schema", "lock", "lease_id", "message", "new_holder"}
    assert lost["schema"] == 1
    assert "shape test" in lost["message"]
