"""CPU profiles of the daemon, idle and under load, from py-spy samples.

Three profiles, each of a fresh daemon on SQLite, sampled by py-spy without
stopping the process (``--nonblocking``):
- idle: no client at all;
- load_lock_per_client: the throughput benchmark's 50 clients, one lock each;
- load_one_lock: the same 50 clients queueing for one lock.
Each sample is charged to the innermost frame that belongs to a known
component (the SQLite store, the process watcher, the socket server, ...),
walking from the running function out to ``main``. The shares, multiplied by
the daemon's CPU time per pair, give milliseconds per hold/release pair.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import throughput
from benchlib import (
    VENV_BIN,
    BenchError,
    background_load,
    check_installed_client,
    cpu_seconds,
    private_tempdir,
    running_daemon,
    stop_process,
    write_result,
)

# Two ways to charge a sample, each a table of (component, fragment of a py-spy
# frame "function (path:line)"). A sample goes to the innermost frame that
# contains a fragment of the table, tried in table order on each frame.
# CAUSES names the deployd module whose code led to the work. Every sample of
# the main thread has deployd/daemon.py at its root, so a sample charged to it
# is event-loop work outside any deployd callback.
CAUSES = (
    ("SQLite store", "deployd/stores/sqlite.py"),
    ("process identity and exit watch", "deployd/processes.py"),
    ("op handlers", "deployd/handlers.py"),
    ("socket server", "deployd/server.py"),
    ("coordinator (grant and queue logic)", "deployd/coordinator.py"),
    ("lease service (timer loop, actions)", "deployd/service.py"),
    ("event loop between callbacks", "deployd/daemon.py"),
)
# LIBRARIES names the library whose code ran, whichever module called it.
LIBRARIES = (
    ("logging", "logging/__init__.py"),
    ("json", "json/"),
    ("selectors (waiting for I/O)", "selectors.py"),
    ("anyio", "anyio/"),
    ("asyncio", "asyncio/"),
    ("threading", "threading.py"),
    ("deployd code itself", "deployd/"),
)
LOAD_CLIENTS = 50


def py_spy() -> str:
    """Return the path of py-spy in the benchmark venv, else on PATH.

    Raise BenchError when neither has it.
    """
    path = VENV_BIN / "py-spy"
    if not path.exists():
        found = shutil.which("py-spy")
        if found is None:
            raise BenchError("py-spy is not installed; run bench/run_all.sh, which installs it")
        return found
    return str(path)


def record(pid: int, seconds: float, output: Path) -> list[tuple[list[str], int]]:
    """Sample process ``pid`` for ``seconds``, and return each stack with its sample count.

    A stack is a list of py-spy frames, outermost first.
    """
    command = [
        py_spy(),
        "record",
        f"--pid={pid}",
        f"--duration={seconds:g}",
        "--rate=250",
        "--nonblocking",
        "--format=raw",
        f"--output={output}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if result.returncode != 0:
        raise BenchError(
            f"py-spy failed with exit code {result.returncode}: {result.stderr[-2000:]}"
        )
    stacks = []
    for line in output.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        stacks.append((stack.split(";"), int(count)))
    return stacks


def component_of(frames: list[str], table: tuple[tuple[str, str], ...]) -> str:
    """Return the component of the innermost frame that matches ``table``, or ``other``."""
    for frame in reversed(frames):
        for name, fragment in table:
            if fragment in frame:
                return name
    return "other"


def shares(stacks: list[tuple[list[str], int]]) -> dict[str, Any]:
    """Return the share of samples per cause, per library, and the busiest functions."""
    by_cause: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    for frames, count in stacks:
        by_cause[component_of(frames, CAUSES)] += count
        by_library[component_of(frames, LIBRARIES)] += count
        by_function[frames[-1]] += count
    # py-spy records only samples of running threads, so an idle daemon gives none.
    total = sum(by_cause.values()) or 1
    return {
        "samples": sum(by_cause.values()),
        "causes": {name: count / total for name, count in by_cause.most_common()},
        "libraries": {name: count / total for name, count in by_library.most_common()},
        "top_functions": [
            {"function": name, "share": count / total}
            for name, count in by_function.most_common(15)
        ],
    }


def profile_idle(seconds: float, scratch: Path) -> dict[str, Any]:
    """Profile a daemon that no client talks to."""
    with running_daemon() as daemon:
        time.sleep(1.0)
        before = cpu_seconds(daemon.pid)
        started = time.monotonic()
        stacks = record(daemon.pid, seconds, scratch / "idle.txt")
        cpu_share = (cpu_seconds(daemon.pid) - before) / (time.monotonic() - started)
    return {"cpu_share_of_one_core": cpu_share, **shares(stacks)}


def profile_load(seconds: float, locks: int, output: Path) -> dict[str, Any]:
    """Profile a daemon serving LOAD_CLIENTS clients spread over ``locks`` locks."""
    with running_daemon() as daemon:
        workers = throughput.start_workers(daemon.socket, daemon.env, LOAD_CLIENTS, locks)
        try:
            throughput.wait_ready(workers)
            start = time.monotonic() + 0.2
            end = start + 1.0 + seconds + 1.0
            for worker in workers:
                worker.stdin.write(f"{start!r} {end!r}\n")
                worker.stdin.flush()
            time.sleep(max(0.0, start + 1.0 - time.monotonic()))
            before = cpu_seconds(daemon.pid)
            started = time.monotonic()
            stacks = record(daemon.pid, seconds, output)
            elapsed = time.monotonic() - started
            daemon_cpu = cpu_seconds(daemon.pid) - before
            outputs = [
                worker.communicate(timeout=end - time.monotonic() + 30)[0] for worker in workers
            ]
        finally:
            for worker in workers:
                stop_process(worker)
    pairs = _pairs_between(outputs, started, started + elapsed)
    profile = shares(stacks)
    cpu_ms_per_pair = 1000 * daemon_cpu / pairs if pairs else None
    return {
        "clients": LOAD_CLIENTS,
        "locks": locks,
        "pairs_per_second": pairs / elapsed,
        "cpu_share_of_one_core": daemon_cpu / elapsed,
        "cpu_ms_per_pair": cpu_ms_per_pair,
        "ms_per_pair_by_cause": {
            name: share * cpu_ms_per_pair for name, share in profile["causes"].items()
        }
        if cpu_ms_per_pair
        else {},
        **profile,
    }


def _pairs_between(outputs: list[str], start: float, end: float) -> int:
    import json

    total = 0
    for output in outputs:
        pairs = json.loads(output)["pairs"]
        total += sum(1 for pair in pairs if start <= pair[2] <= end)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="seconds of sampling per profile"
    )
    args = parser.parse_args()
    check_installed_client()
    with private_tempdir("ddprof") as scratch:
        results = {
            "background": background_load(),
            "idle": profile_idle(args.seconds, scratch),
            "load_lock_per_client": profile_load(
                args.seconds, LOAD_CLIENTS, scratch / "lock_per_client.txt"
            ),
            "load_one_lock": profile_load(args.seconds, 1, scratch / "one_lock.txt"),
        }
    write_result("daemon_profile", results)
    for phase in ("idle", "load_lock_per_client", "load_one_lock"):
        profile = results[phase]
        print(f"{phase}: daemon uses {profile['cpu_share_of_one_core']:.0%} of one core")
        print("  by cause:")
        for name, share in profile["causes"].items():
            per_pair = profile.get("ms_per_pair_by_cause", {}).get(name)
            suffix = f"  {per_pair:5.2f} ms per pair" if per_pair is not None else ""
            print(f"    {share:6.1%} {name}{suffix}")
        print("  by library:")
        for name, share in profile["libraries"].items():
            print(f"    {share:6.1%} {name}")


if __name__ == "__main__":
    main()
