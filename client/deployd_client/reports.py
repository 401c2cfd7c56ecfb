"""Text output of ``deployd history`` and ``deployd stats``."""

from __future__ import annotations

from deployd_client.display import ago, clock_time, paint, table
from deployd_client.durations import format_duration

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

_OUTCOME_COLORS = {
    "succeeded": "green",
    "failed": "red",
    "lost": "red",
    "forced": "yellow",
    "expired": "yellow",
    "abandoned": "yellow",
}


def _seconds(value: object) -> str:
    return format_duration(float(value)) if isinstance(value, int | float) else "-"


def _outcome(record: dict[str, Any], color: bool) -> str:
    outcome = record.get("outcome")
    if outcome is None:
        return paint("running", "cyan", color)
    text = str(outcome)
    if record.get("exit_code") not in (None, 0):
        text += f" ({record['exit_code']})"
    return paint(text, _OUTCOME_COLORS.get(str(outcome), ""), color)


def history_text(result: dict[str, Any], color: bool = False) -> str:
    """Render the result of the ``history`` op as aligned columns, newest first."""
    records = result.get("deployments", [])
    if not records:
        lock = result.get("lock")
        return f"no deploys of {lock} recorded" if lock else "no deploys recorded"
    rows = [["STARTED", "LOCK", "WHO", "COMMIT", "OUTCOME", "TOOK", "WAITED", "TOKEN", "REVISION"]]
    for record in records:
        owner = record.get("owner") or {}
        purpose = record.get("purpose") or {}
        token = str(record.get("token") or "-")
        if record.get("degraded"):
            token += " unlocked"
        rows.append(
            [
                ago(float(record["started_at"])),
                str(record["lock"]),
                f"{owner.get('user')}@{owner.get('host')}",
                str(purpose.get("commit") or "-"),
                _outcome(record, color),
                _seconds(record.get("duration")),
                _seconds(record.get("waited")) if record.get("waited") else "-",
                token,
                str(record.get("revision") or "-"),
            ]
        )
    return table(rows, color)


def stats_text(result: dict[str, Any], color: bool = False) -> str:
    """Render the result of the ``stats`` op: totals, shares, latency, then per lock."""
    lines = [f"since {clock_time(float(result['since']))} ({ago(float(result['since']))})", ""]
    deploys = result.get("deploys", 0)
    if not deploys:
        lines.append("no deploys in this period")
    else:
        outcomes = result.get("outcomes") or {}
        counted = ", ".join(f"{count} {name}" for name, count in sorted(outcomes.items()))
        running = result.get("running", 0)
        lines.append(
            f"deploys      {deploys} ({counted}{', ' if counted and running else ''}"
            f"{f'{running} running' if running else ''})"
        )
        lines.append(
            f"blocked      {_percent(result.get('blocked_share'))} waited for another holder"
        )
        lines.append(
            f"stale        {_percent(result.get('stale_share'))} of leases expired unreleased"
        )
        if result.get("degraded"):
            lines.append(
                f"unlocked     {result['degraded']} ran without a lock (store unreachable)"
            )
    latency = result.get("acquire_latency") or {}
    if latency.get("samples"):
        lines.append(
            f"acquire      p50 {_seconds(latency.get('p50'))}, p95 {_seconds(latency.get('p95'))} "
            f"({latency['samples']} grants by this daemon without waiting)"
        )
    notifications = result.get("notifications")
    if isinstance(notifications, dict):
        lines.extend(_delivery_lines(notifications, color))
    locks = result.get("locks") or {}
    if locks:
        lines.append("")
        rows = [["LOCK", "DEPLOYS", "SUCCEEDED", "FAILED", "MEDIAN TOOK", "MEDIAN WAIT"]]
        for lock, entry in locks.items():
            rows.append(
                [
                    lock,
                    str(entry["deploys"]),
                    str(entry["succeeded"]),
                    str(entry["failed"]),
                    _seconds(entry.get("median_duration")),
                    _seconds(entry.get("median_wait")),
                ]
            )
        lines.append(table(rows, color))
    return "\n".join(lines)


def _delivery_lines(notifications: dict[str, Any], color: bool) -> list[str]:
    """Return the Slack lines of ``stats``: the delivery rate with its counts, and a stop."""
    counts = ", ".join(
        f"{notifications[state]} {state}"
        for state in ("sent", "failed", "skipped", "parked", "queued")
        if notifications.get(state)
    )
    rate = notifications.get("delivery_rate")
    lines = []
    if rate is not None:
        lines.append(f"slack        {_percent(rate)} of messages delivered ({counts})")
    elif counts:
        lines.append(f"slack        {counts}")
    problem = notifications.get("problem")
    if isinstance(problem, dict):
        stopped = f"STOPPED: {problem.get('message')}"
        lines.append(f"             {paint(stopped, 'red', color)}")
        lines.append(f"             fix: {problem.get('fix')}")
    return lines


def _percent(share: object) -> str:
    return f"{share * 100:.0f}%" if isinstance(share, int | float) else "-"
