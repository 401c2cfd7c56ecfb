"""Benchmark 2: acquire/release throughput and fairness with 50 concurrent clients.

Each client is a process of its own (throughput_worker.py) with one
connection, sending ``hold`` (with a wait) then ``release`` by lease id in a
closed loop. Processes, not threads: real clients are separate processes.
Fifty threads in one interpreter would share one GIL, so the wait times would
include the load generator's own lock hand-offs. The fairness figure would then
measure the GIL's scheduling as much as the daemon's queue.

Three spreads of the clients over locks, each against a fresh daemon:
all 50 on one lock (every pair queues behind the others), 10 on each of 5
locks, and one lock per client (no contention: the daemon's raw rate).
A pair counts when the response to its release arrives inside the measured
window, which follows a warm-up. Wait times are those of holds sent inside
the window.
"""

from __future__ import annotations

import argparse
import json
import selectors
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchlib import (
    VENV_PYTHON,
    BenchError,
    background_load,
    check_installed_client,
    cpu_seconds,
    running_daemon,
    stop_process,
    summarize,
    write_result,
)

WORKER = Path(__file__).resolve().parent / "throughput_worker.py"
TARGET_PAIRS_PER_SECOND = 500
READY_TIMEOUT = 60.0
SCENARIOS = (("one_lock", 1), ("five_locks", 5), ("lock_per_client", 50))


def start_workers(socket_path: str, env: dict[str, str], clients: int, locks: int) -> list[Any]:
    """Start ``clients`` workers spread round-robin over ``locks`` locks."""
    workers = []
    for index in range(clients):
        lock = f"bench-tp-{index % locks}"
        workers.append(
            subprocess.Popen(
                [str(VENV_PYTHON), str(WORKER), socket_path, lock],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    return workers


def wait_ready(workers: list[Any]) -> None:
    """Wait until every worker prints ``ready``. Raise BenchError on failure or timeout."""
    deadline = time.monotonic() + READY_TIMEOUT
    with selectors.DefaultSelector() as selector:
        for worker in workers:
            selector.register(worker.stdout, selectors.EVENT_READ, worker)
        waiting = len(workers)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"{waiting} of {len(workers)} workers not ready in {READY_TIMEOUT:g}s"
                )
            for key, _ in selector.select(remaining):
                line = key.data.stdout.readline()
                if line.strip() != "ready":
                    raise BenchError(f"worker {key.data.pid} printed {line!r} instead of 'ready'")
                selector.unregister(key.fileobj)
                waiting -= 1


def run_scenario(clients: int, locks: int, warmup: float, duration: float) -> dict[str, Any]:
    """Run one spread of clients over locks against a fresh daemon and return its measurements."""
    with running_daemon() as daemon:
        workers = start_workers(daemon.socket, daemon.env, clients, locks)
        try:
            wait_ready(workers)
            start = time.monotonic() + 0.2
            window_start = start + warmup
            end = window_start + duration
            for worker in workers:
                # communicate() closes stdin later; the worker reads only this line.
                worker.stdin.write(f"{start!r} {end!r}\n")
                worker.stdin.flush()
            time.sleep(max(0.0, window_start - time.monotonic()))
            cpu_start = cpu_seconds(daemon.pid)
            time.sleep(max(0.0, end - time.monotonic()))
            daemon_cpu = cpu_seconds(daemon.pid) - cpu_start
            outputs = [_collect(worker, end) for worker in workers]
        finally:
            for worker in workers:
                stop_process(worker)
    return _analyse(outputs, clients, locks, window_start, end, daemon_cpu)


def _collect(worker: Any, end: float) -> dict[str, Any]:
    remaining = max(1.0, end - time.monotonic()) + 30.0
    output, _ = worker.communicate(timeout=remaining)
    if worker.returncode != 0:
        raise BenchError(f"worker {worker.pid} exited with code {worker.returncode}")
    data: dict[str, Any] = json.loads(output)
    return data


def _analyse(
    outputs: list[dict[str, Any]],
    clients: int,
    locks: int,
    window_start: float,
    end: float,
    daemon_cpu: float,
) -> dict[str, Any]:
    duration = end - window_start
    per_client: list[int] = []
    waits: list[float] = []
    errors: dict[str, int] = {}
    events: dict[str, int] = {}
    for output in outputs:
        completed = [pair for pair in output["pairs"] if window_start <= pair[2] <= end]
        per_client.append(len(completed))
        waits.extend(
            (granted - sent) * 1000 for sent, granted, _ in output["pairs"] if sent >= window_start
        )
        for code, count in output["errors"].items():
            errors[code] = errors.get(code, 0) + count
        for name, count in output["events"].items():
            events[name] = events.get(name, 0) + count
    total = sum(per_client)
    if total == 0:
        raise BenchError("no pair completed inside the measured window")
    return {
        "clients": clients,
        "locks": locks,
        "window_seconds": duration,
        "pairs": total,
        "pairs_per_second": total / duration,
        "target_met": total / duration >= TARGET_PAIRS_PER_SECOND,
        "wait_ms": summarize(waits),
        "pairs_per_client": {
            "min": min(per_client),
            "median": statistics.median(per_client),
            "max": max(per_client),
            "max_to_min": max(per_client) / min(per_client) if min(per_client) else None,
            # Jain's index: 1.0 when every client completes the same number of pairs.
            "jain_index": total**2 / (len(per_client) * sum(n * n for n in per_client)),
        },
        "daemon_cpu_share_of_one_core": daemon_cpu / duration,
        "daemon_cpu_ms_per_pair": 1000 * daemon_cpu / total,
        "errors": errors,
        # Over the whole run, warm-up included, per pair completed in the window.
        "events_per_pair": {name: count / total for name, count in events.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    args = parser.parse_args()
    check_installed_client()
    results: dict[str, Any] = {
        "target_pairs_per_second": TARGET_PAIRS_PER_SECOND,
        "settings": {"clients": args.clients, "warmup": args.warmup, "duration": args.duration},
        "background": background_load(),
        "scenarios": {},
    }
    for name, locks in SCENARIOS:
        scenario = run_scenario(args.clients, min(locks, args.clients), args.warmup, args.duration)
        results["scenarios"][name] = scenario
        wait = scenario["wait_ms"]
        fairness = scenario["pairs_per_client"]
        print(
            f"{name:16} {scenario['pairs_per_second']:7.1f} pairs/s  wait median "
            f"{wait['median']:7.1f} ms p95 {wait['p95']:7.1f} ms max {wait['max']:7.1f} ms  "
            f"per client {fairness['min']}..{fairness['max']}  Jain {fairness['jain_index']:.3f}  "
            f"errors {scenario['errors']}",
            flush=True,
        )
    write_result("throughput", results)


if __name__ == "__main__":
    main()
