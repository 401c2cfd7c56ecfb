"""Benchmark 1b: where the time of one ``deployd run L -- true`` goes.

Measurements against one daemon on SQLite:
- the daemon's CPU use while no client talks to it;
- imports: ``python -X importtime`` of the bare interpreter, of ``python -m
  deployd_client run`` and of the installed ``deployd`` command, repeated,
  median per module;
- protocol round trips from a Python client, in the order ``deployd run`` sends
  them: connect, hello (the protocol floor), hold, bind, release, with the
  spawn of the command (``posix_spawnp('true')`` plus ``waitpid``, as the
  runner does it) between hold and bind;
- the daemon's CPU time per hold/release cycle, from /proc/PID/stat;
- how many holds without ``wait`` the daemon rejects right after a release.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from typing import Any

from benchlib import (
    DEPLOYD,
    VENV_PYTHON,
    BenchError,
    background_load,
    check_installed_client,
    cpu_seconds,
    parse_importtime,
    running_daemon,
    summarize,
    write_result,
)

LOCK = "bench-breakdown"


# --- imports ---


def importtime_runs(argv: list[str], env: dict[str, str], runs: int) -> list[dict[str, Any]]:
    """Run ``argv`` under ``-X importtime`` ``runs`` times and return the parsed imports."""
    parsed = []
    for _ in range(runs):
        result = subprocess.run(
            [str(VENV_PYTHON), "-X", "importtime", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(f"{argv} exited with {result.returncode}: {result.stderr[-2000:]}")
        parsed.append(parse_importtime(result.stderr))
    return parsed


def median_imports(runs: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, float]]:
    """Return the median self and cumulative time of each module seen in every run."""
    common = set.intersection(*(set(run) for run in runs))
    return {
        name: {
            "self_ms": statistics.median(run[name]["self_us"] for run in runs) / 1000,
            "cumulative_ms": statistics.median(run[name]["cumulative_us"] for run in runs) / 1000,
            "depth": runs[0][name]["depth"],
        }
        for name in common
    }


def summarize_imports(
    modules: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Split a run's imports into those a bare interpreter does too and the extra ones."""
    extra = {name: value for name, value in modules.items() if name not in baseline}
    top_level = {name: value for name, value in extra.items() if value["depth"] == 0}
    client = {name: value for name, value in modules.items() if name.startswith("deployd_client")}
    by_self = sorted(extra.items(), key=lambda item: item[1]["self_ms"], reverse=True)
    by_cumulative = sorted(
        top_level.items(), key=lambda item: item[1]["cumulative_ms"], reverse=True
    )
    return {
        "all_modules_ms": sum(value["self_ms"] for value in modules.values()),
        "extra_modules_ms": sum(value["self_ms"] for value in extra.values()),
        "extra_module_count": len(extra),
        "deployd_client_modules_self_ms": sum(value["self_ms"] for value in client.values()),
        "top_extra_by_self": [{"module": name, **value} for name, value in by_self[:15]],
        "top_level_extra_by_cumulative": [
            {"module": name, **value} for name, value in by_cumulative[:15]
        ],
    }


def measure_imports(env: dict[str, str], runs: int) -> dict[str, Any]:
    """Measure the imports of the bare interpreter and of both ways to start the client."""
    run_arguments = ["run", LOCK, "--", "true"]
    baseline = median_imports(importtime_runs(["-c", "pass"], env, runs))
    module = median_imports(importtime_runs(["-m", "deployd_client", *run_arguments], env, runs))
    script = median_imports(importtime_runs([str(DEPLOYD), *run_arguments], env, runs))
    return {
        "runs": runs,
        "bare_interpreter_ms": sum(value["self_ms"] for value in baseline.values()),
        "python_m_deployd_client": summarize_imports(module, baseline),
        "deployd_command": summarize_imports(script, baseline),
    }


# --- in-process steps ---


def spawn_true() -> None:
    """Start ``true`` in its own process group and reap it, as the runner does."""
    pid = os.posix_spawnp("true", ["true"], dict(os.environ), setpgroup=0)
    os.waitpid(pid, 0)


def measure_round_trips(
    socket_path: str, daemon_pid: int, runs: int, warmup: int
) -> dict[str, Any]:
    """Time each protocol step of one ``deployd run`` cycle, and the daemon's CPU per cycle."""
    from deployd_client.protocol import Connection

    steps: dict[str, list[float]] = {
        name: [] for name in ("connect", "hello", "hold", "spawn", "bind", "release", "cycle")
    }
    cpu_before = 0.0
    for iteration in range(warmup + runs):
        if iteration == warmup:
            cpu_before = cpu_seconds(daemon_pid)
        marks = [time.perf_counter()]
        connection = Connection.connect(socket_path)
        marks.append(time.perf_counter())
        try:
            connection.request("hello", timeout=10)
            marks.append(time.perf_counter())
            # A hold sent right after a release can find the lock not yet free, so it waits.
            lease = connection.request("hold", timeout=10, lock=LOCK, pid=os.getpid(), wait=10)
            marks.append(time.perf_counter())
            spawn_true()
            marks.append(time.perf_counter())
            # The runner binds the command's pid. That pid has exited by now, and the
            # daemon rejects a dead pid, so this binds a live process: this one.
            connection.request("bind", timeout=10, lease_id=lease["lease_id"], pid=os.getpid())
            marks.append(time.perf_counter())
            connection.request("release", timeout=10, lease_id=lease["lease_id"], exit_code=0)
            marks.append(time.perf_counter())
        finally:
            connection.close()
        if iteration >= warmup:
            for name, start, end in zip(steps, marks, marks[1:], strict=False):
                steps[name].append((end - start) * 1000)
            steps["cycle"].append((marks[-1] - marks[0]) * 1000)
    daemon_cpu = cpu_seconds(daemon_pid) - cpu_before
    return {
        "runs": runs,
        "steps_ms": {name: summarize(values) for name, values in steps.items()},
        "daemon_cpu_ms_per_cycle": 1000 * daemon_cpu / runs,
    }


def count_busy_after_release(socket_path: str, cycles: int) -> dict[str, Any]:
    """Count holds without ``wait`` that the daemon rejects right after the same lock's release.

    Each cycle opens a connection, holds the lock, releases it and closes. The
    next cycle's hold follows at once, so a rejection means that the daemon
    confirmed the release before the lock was free again.
    """
    from deployd_client.protocol import Connection, DaemonError

    rejected: dict[str, int] = {}
    for _ in range(cycles):
        with Connection.connect(socket_path) as connection:
            try:
                lease = connection.request("hold", timeout=10, lock=LOCK, pid=os.getpid())
            except DaemonError as exc:
                rejected[exc.code] = rejected.get(exc.code, 0) + 1
                continue
            connection.request("release", timeout=10, lease_id=lease["lease_id"], exit_code=0)
    return {"cycles": cycles, "rejected": sum(rejected.values()), "rejected_by_code": rejected}


def measure_idle_cpu(daemon_pid: int, seconds: float) -> float:
    """Return the share of one core that the daemon uses while no client talks to it."""
    before = cpu_seconds(daemon_pid)
    time.sleep(seconds)
    return (cpu_seconds(daemon_pid) - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--import-runs", type=int, default=10, help="importtime runs per command")
    parser.add_argument("--runs", type=int, default=200, help="timed protocol cycles")
    args = parser.parse_args()
    check_installed_client()
    background = background_load()
    with running_daemon() as daemon:
        time.sleep(1.0)  # let the daemon finish starting before it is measured idle
        idle_cpu = measure_idle_cpu(daemon.pid, 3.0)
        imports = measure_imports(daemon.env, args.import_runs)
        round_trips = measure_round_trips(daemon.socket, daemon.pid, args.runs, warmup=20)
        busy_after_release = count_busy_after_release(daemon.socket, args.runs)
    results = {
        "unit": "ms",
        "background": background,
        "daemon_idle_cpu_share_of_one_core": idle_cpu,
        "imports": imports,
        "round_trips": round_trips,
        "busy_after_release": busy_after_release,
    }
    write_result("call_breakdown", results)
    _print(results)


def _print(results: dict[str, Any]) -> None:
    print(f"daemon idle CPU: {results['daemon_idle_cpu_share_of_one_core']:.0%} of one core")
    imports = results["imports"]
    print(f"imports of the bare interpreter: {imports['bare_interpreter_ms']:.1f} ms")
    for way in ("deployd_command", "python_m_deployd_client"):
        summary = imports[way]
        print(
            f"{way}: {summary['extra_modules_ms']:.1f} ms in {summary['extra_module_count']} "
            "modules beyond the bare interpreter; largest by cumulative time:"
        )
        for entry in summary["top_level_extra_by_cumulative"][:8]:
            print(f"    {entry['module']:32} {entry['cumulative_ms']:6.2f} ms")
    for name, summary in results["round_trips"]["steps_ms"].items():
        print(f"{name:8} median {summary['median']:6.2f} ms  p95 {summary['p95']:6.2f} ms")
    print(f"daemon CPU per cycle: {results['round_trips']['daemon_cpu_ms_per_cycle']:.2f} ms")
    busy = results["busy_after_release"]
    print(f"holds rejected right after a release: {busy['rejected']} of {busy['cycles']}")


if __name__ == "__main__":
    main()
