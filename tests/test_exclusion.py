"""Mutual exclusion under load: many ``deployd run`` clients racing on two locks.

Two daemons, as two workstations would run, share one SQLite lease store. Each
client process waits for its lock with ``--wait``, and its command appends an
enter record and a leave record to one ledger file. The records carry the
lock, the fencing token the command got in ``DEPLOYD_FENCING_TOKEN``, its pid
and a CLOCK_MONOTONIC stamp, which every process on the machine reads alike.
The ledger then shows whether two commands ever held one lock at once.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProcess, Workstation, iter_ledger, query_sqlite

LOCKS = ("api", "web")
CLIENTS = 20
RUNS_PER_CLIENT = 10
# How long each command stays between its enter and leave records. A longer
# stay makes an overlap, if the locks ever allowed one, likelier to show.
HOLD_SECONDS = 0.01

# The command each client runs under its lock. It writes each record with one
# write() on an O_APPEND descriptor, so records of concurrent writers never
# interleave. -I -S keeps its start-up short.
RECORDER = """
import json, os, sys, time
ledger = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def record(event):
    line = json.dumps({
        "event": event,
        "lock": os.environ["DEPLOYD_LOCK"],
        "token": int(os.environ["DEPLOYD_FENCING_TOKEN"]),
        "pid": os.getpid(),
        "t": time.monotonic_ns(),
    })
    os.write(ledger, (line + "\\n").encode())
record("enter")
time.sleep(float(sys.argv[2]))
record("leave")
"""


@dataclass(frozen=True, slots=True)
class Interval:
    """One command's time under a lock, from its ledger records."""

    lock: str
    token: int
    pid: int
    entered: int
    left: int


@dataclass(frozen=True, slots=True)
class RunResult:
    """The end of one ``deployd run`` client process."""

    workstation: int
    lock: str
    exit_code: int
    stderr: str


def ledger_intervals(records: Iterable[dict[str, Any]]) -> tuple[list[Interval], list[str]]:
    """Pair each command's enter and leave records; return the intervals and the problems found."""
    enters: dict[tuple[str, int], dict[str, Any]] = {}
    entered: set[tuple[str, int]] = set()
    intervals: list[Interval] = []
    problems: list[str] = []
    for record in records:
        key = (record["lock"], record["token"])
        if record["event"] == "enter":
            if key in entered:
                problems.append(f"fencing token {key[1]} of {key[0]} was handed out twice")
            entered.add(key)
            enters[key] = record
            continue
        enter = enters.pop(key, None)
        if enter is None or enter["pid"] != record["pid"]:
            problems.append(f"leave record without a matching enter record: {record}")
            continue
        intervals.append(Interval(key[0], key[1], record["pid"], enter["t"], record["t"]))
    for lock, token in enters:
        problems.append(f"command with token {token} of {lock} entered but never left")
    return intervals, problems


def exclusion_violations(intervals: Iterable[Interval]) -> list[str]:
    """Return every overlap of two intervals on one lock and every token that did not grow."""
    by_lock: dict[str, list[Interval]] = defaultdict(list)
    for interval in intervals:
        by_lock[interval.lock].append(interval)

    violations: list[str] = []
    for lock, lock_intervals in sorted(by_lock.items()):
        ordered = sorted(lock_intervals, key=lambda interval: interval.entered)
        for earlier, later in itertools.pairwise(ordered):
            if later.entered <= earlier.left:
                violations.append(
                    f"{lock}: pid {later.pid} (token {later.token}) entered "
                    f"{(earlier.left - later.entered) / 1e6:.3f} ms before pid {earlier.pid} "
                    f"(token {earlier.token}) left"
                )
            if later.token <= earlier.token:
                violations.append(
                    f"{lock}: token {later.token} was granted after token {earlier.token}"
                )
    return violations


def test_ledger_check_finds_overlap() -> None:
    """The checks below can fail: an overlap and a token that went backwards are both found."""
    records = [
        {"event": "enter", "lock": "api", "token": 1, "pid": 10, "t": 100},
        {"event": "enter", "lock": "api", "token": 2, "pid": 11, "t": 150},
        {"event": "leave", "lock": "api", "token": 1, "pid": 10, "t": 200},
        {"event": "leave", "lock": "api", "token": 2, "pid": 11, "t": 250},
        {"event": "enter", "lock": "web", "token": 5, "pid": 12, "t": 300},
        {"event": "leave", "lock": "web", "token": 5, "pid": 12, "t": 310},
        {"event": "enter", "lock": "web", "token": 4, "pid": 13, "t": 320},
        {"event": "leave", "lock": "web", "token": 4, "pid": 13, "t": 330},
    ]

    intervals, problems = ledger_intervals(records)
    violations = exclusion_violations(intervals)

    assert problems == []
    assert len(violations) == 2
    assert violations[0].startswith("api: pid 11 (token 2) entered")
    assert violations[1] == "web: token 4 was granted after token 5"


def test_ledger_check_finds_unpaired_records() -> None:
    records = [
        {"event": "enter", "lock": "api", "token": 1, "pid": 10, "t": 100},
        {"event": "leave", "lock": "api", "token": 2, "pid": 11, "t": 250},
    ]

    _, problems = ledger_intervals(records)

    assert len(problems) == 2


def _run_clients(workstations: list[Workstation], ledger: Path) -> tuple[list[RunResult], float]:
    """Run CLIENTS loops of RUNS_PER_CLIENT runs at once; return the results and seconds taken."""

    def client_loop(client: int) -> list[RunResult]:
        # Clients alternate between the workstations, and each one alternates
        # between the locks, so both daemons queue callers for both locks.
        station = client % len(workstations)
        results = []
        for run in range(RUNS_PER_CLIENT):
            lock = LOCKS[(client // len(workstations) + run) % len(LOCKS)]
            command = [sys.executable, "-I", "-S", "-c", RECORDER, str(ledger), str(HOLD_SECONDS)]
            finished = workstations[station].deployd(
                "run", lock, "--wait", "5m", "--quiet", "--", *command, timeout=100
            )
            results.append(RunResult(station, lock, finished.returncode, finished.stderr))
        return results

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        loops = list(pool.map(client_loop, range(CLIENTS)))
    return [result for loop in loops for result in loop], time.monotonic() - started


@pytest.mark.slow
def test_runs_never_overlap(
    make_workstation: Callable[..., Workstation],
    start: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """200 grants to 20 concurrent clients on two daemons: one holder per lock at any time."""
    shared_store = tmp_path / "locks.sqlite3"
    workstations = [make_workstation(store={"path": str(shared_store)}) for _ in range(2)]
    for workstation in workstations:
        start(workstation)
    ledger = tmp_path / "ledger.jsonl"

    results, elapsed = _run_clients(workstations, ledger)
    print(f"{len(results)} runs by {CLIENTS} concurrent clients took {elapsed:.1f}s")

    failed = [result for result in results if result.exit_code != 0]
    assert failed == [], f"{len(failed)} runs failed, the first: {failed[0]}"
    assert len(results) == CLIENTS * RUNS_PER_CLIENT

    intervals, problems = ledger_intervals(iter_ledger(ledger))
    assert problems == []
    assert len(intervals) == len(results)
    for lock in LOCKS:
        expected = sum(1 for result in results if result.lock == lock)
        assert sum(1 for interval in intervals if interval.lock == lock) == expected, lock
    assert exclusion_violations(intervals) == []

    deployments = query_sqlite(shared_store, "SELECT lock, token, outcome FROM deployments")
    recorded = sorted((row["lock"], row["token"]) for row in deployments)
    assert recorded == sorted((interval.lock, interval.token) for interval in intervals)
    outcomes = {row["outcome"] for row in deployments}
    assert outcomes == {"succeeded"}


def test_recorder_writes_whole_lines(tmp_path: Path) -> None:
    """The recorder's records are whole JSON lines, stamped on CLOCK_MONOTONIC in order."""
    ledger = tmp_path / "ledger.jsonl"
    env = {**os.environ, "DEPLOYD_LOCK": "api", "DEPLOYD_FENCING_TOKEN": "7"}
    command = [sys.executable, "-I", "-S", "-c", RECORDER, str(ledger), "0"]

    subprocess.run(command, env=env, check=True, timeout=30)

    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [record["event"] for record in records] == ["enter", "leave"]
    assert {record["token"] for record in records} == {7}
    assert records[0]["t"] <= records[1]["t"]
