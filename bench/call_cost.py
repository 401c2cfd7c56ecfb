"""Benchmark 1: the wall-clock cost of one ``deployd run L -- true`` and of its peers.

All commands run against servers that are already up:
- ``deployd run`` (the installed command and ``python -m``) against a daemon on SQLite;
- the bare interpreter of the same venv (``python -c pass``), the floor for any Python client;
- ``python -c 'import ...'`` of every top-level module that ``deployd run``
  imports beyond the bare interpreter (found with ``-X importtime`` at the
  start of each round), so the difference to ``python_bare`` is the cost of the
  client's imports in a fresh process;
- both of those again, ending with ``os._exit(0)``, which skips the
  interpreter's teardown, so the differences show what the teardown costs;
- ``flock FILE true``, the cheapest local lock;
- ``etcdctl lock L true`` against a single-member etcd on loopback.

Each command is started with ``posix_spawn`` (no shell) and reaped with
``wait4``, which also returns its CPU time. A round starts a daemon and an
etcd, runs warm-up runs, then iterations that each run every command once,
in a shuffled order, so a busy phase of a shared machine hits all commands
alike. Several rounds run one after another. The statistics pool all
rounds, and each round's ratios are kept to show the spread. Besides
the ratio of medians, the median of the per-iteration ratios is reported,
because it compares runs made moments apart.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    DEPLOYD,
    VENV_PYTHON,
    BenchError,
    background_load,
    check_installed_client,
    cpu_seconds,
    parse_importtime,
    private_tempdir,
    running_daemon,
    running_etcd,
    summarize,
    write_result,
)

LOCK = "bench-call"
# Ends the interpreter without its teardown, so that rows with and without it
# show what the teardown of the imported modules costs.
EXIT_EARLY = "import os; os._exit(0)"
# Targets: deployd run costs at most this many times its peer.
TARGETS = {"python_bare": 1.6, "etcdctl_lock": 1.5}


@dataclass(frozen=True)
class Command:
    """One timed command: a short name and its argument vector."""

    name: str
    argv: list[str]
    # Whether the command talks to the deployd daemon.
    uses_daemon: bool = False


def client_import_statement(env: dict[str, str]) -> str:
    """Return an ``import`` statement of the top-level modules that ``deployd run`` imports.

    These are the modules that ``-X importtime`` lists at the top level for the
    installed ``deployd`` command but not for ``python -c pass``, in import order.
    """
    loaded = {}
    for argv in (["-c", "pass"], [str(DEPLOYD), "run", LOCK, "--", "true"]):
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
        loaded[argv[0]] = parse_importtime(result.stderr)
    bare, client = loaded["-c"], loaded[str(DEPLOYD)]
    modules = [name for name, value in client.items() if value["depth"] == 0 and name not in bare]
    return "import " + ", ".join(modules)


def commands(etcd_url: str, flock_file: Path, imports: str) -> list[Command]:
    """Return the timed commands, with absolute program paths for posix_spawn."""
    flock = shutil.which("flock")
    etcdctl = shutil.which("etcdctl")
    if flock is None or etcdctl is None:
        raise BenchError("flock or etcdctl is missing; install util-linux and etcd-client")
    return [
        Command("python_bare", [str(VENV_PYTHON), "-c", "pass"]),
        Command("python_bare_os_exit", [str(VENV_PYTHON), "-c", EXIT_EARLY]),
        Command("client_imports", [str(VENV_PYTHON), "-c", imports]),
        Command("client_imports_os_exit", [str(VENV_PYTHON), "-c", f"{imports}; {EXIT_EARLY}"]),
        Command("deployd_run", [str(DEPLOYD), "run", LOCK, "--", "true"], uses_daemon=True),
        Command(
            "deployd_run_module",
            [str(VENV_PYTHON), "-m", "deployd_client", "run", LOCK, "--", "true"],
            uses_daemon=True,
        ),
        Command("flock", [flock, str(flock_file), "true"]),
        Command("etcdctl_lock", [etcdctl, f"--endpoints={etcd_url}", "lock", LOCK, "true"]),
    ]


def benchmark_env(daemon_env: dict[str, str]) -> dict[str, str]:
    """Return the daemon's client environment with proxy variables removed.

    etcdctl's gRPC client honours *_proxy variables. Without them, every request
    goes straight to the loopback etcd.
    """
    env = {name: value for name, value in daemon_env.items() if not name.lower().endswith("_proxy")}
    env["ETCDCTL_API"] = "3"
    return env


def time_once(command: Command, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``command`` once and return its wall-clock and CPU (user + system) time in seconds.

    Its output goes to /dev/null and its error output to ``log``, which is
    shown when the command fails.
    """
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
    ]
    started = time.perf_counter()
    pid = os.posix_spawn(command.argv[0], command.argv, env, file_actions=file_actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        error = log.read_text(encoding="utf-8", errors="replace").strip()
        raise BenchError(f"{command.name} exited with {code}: {error}")
    return wall, usage.ru_utime + usage.ru_stime


def measure_once(
    iterations: int, warmup: int, shuffler: random.Random
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[str]], float]:
    """Time every command against a fresh daemon and etcd.

    Returns the wall-clock and CPU times in ms by command, the commands, and
    the daemon's CPU ms per call that reached it.
    """
    with running_daemon() as daemon, running_etcd() as etcd, private_tempdir("callcost") as scratch:
        env = benchmark_env(daemon.env)
        imports = client_import_statement(env)
        timed = commands(etcd.client_url, scratch / "flock.lock", imports)
        log = scratch / "stderr.txt"
        for _ in range(warmup):
            for command in timed:
                time_once(command, env, log)

        wall: dict[str, list[float]] = {command.name: [] for command in timed}
        cpu: dict[str, list[float]] = {command.name: [] for command in timed}
        daemon_cpu_start = cpu_seconds(daemon.pid)
        for _ in range(iterations):
            order = list(timed)
            shuffler.shuffle(order)
            for command in order:
                elapsed, used = time_once(command, env, log)
                wall[command.name].append(elapsed * 1000)
                cpu[command.name].append(used * 1000)
        daemon_cpu = cpu_seconds(daemon.pid) - daemon_cpu_start
        daemon_calls = iterations * sum(command.uses_daemon for command in timed)
        argvs = {command.name: command.argv for command in timed}
    return wall, cpu, argvs, 1000 * daemon_cpu / daemon_calls


def measure(repeats: int, iterations: int, warmup: int, seed: int) -> dict[str, Any]:
    """Run ``repeats`` rounds of ``measure_once``; return pooled and per-round ratios.

    Each round starts its own daemon and etcd, so the spread between
    rounds also shows how much a fresh start of the servers changes.
    """
    shuffler = random.Random(seed)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    rounds = []
    argvs: dict[str, list[str]] = {}
    for _ in range(repeats):
        round_wall, round_cpu, argvs, daemon_cpu_per_call = measure_once(
            iterations, warmup, shuffler
        )
        for name in round_wall:
            wall.setdefault(name, []).extend(round_wall[name])
            cpu.setdefault(name, []).extend(round_cpu[name])
        round_ratios = _ratios(round_wall, round_cpu)
        rounds.append(
            {
                "median_ms": {
                    name: value["median"] for name, value in round_ratios["summaries"].items()
                },
                "ratio_of_deployd_run_to": round_ratios["ratio_of_deployd_run_to"],
                "daemon_cpu_ms_per_daemon_call": daemon_cpu_per_call,
            }
        )
        print(f"round {len(rounds)}/{repeats} done", flush=True)
    return {
        "unit": "ms",
        "settings": {
            "repeats": repeats,
            "iterations": iterations,
            "warmup": warmup,
            "seed": seed,
        },
        "commands": argvs,
        **_ratios(wall, cpu),
        "rounds": rounds,
        "wall_ms": wall,
    }


def _ratios(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, Any]:
    summaries = {name: summarize(values) for name, values in wall.items()}
    run_times = wall["deployd_run"]
    ratio_of_medians = {
        name: summaries["deployd_run"]["median"] / summary["median"]
        for name, summary in summaries.items()
    }
    median_paired_ratio = {
        name: statistics.median(a / b for a, b in zip(run_times, values, strict=True))
        for name, values in wall.items()
    }
    targets = {
        peer: {
            "max_ratio": limit,
            "ratio": ratio_of_medians[peer],
            "median_paired_ratio": median_paired_ratio[peer],
            "met": ratio_of_medians[peer] <= limit,
        }
        for peer, limit in TARGETS.items()
    }
    return {
        "summaries": summaries,
        "cpu_ms_median": {name: statistics.median(values) for name, values in cpu.items()},
        "ratio_of_deployd_run_to": ratio_of_medians,
        "median_paired_ratio_of_deployd_run_to": median_paired_ratio,
        "targets": targets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds, each with a fresh daemon and etcd"
    )
    parser.add_argument(
        "--iterations", type=int, default=80, help="timed runs per command and round"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed runs per command at each round's start"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the run order shuffle")
    args = parser.parse_args()

    check_installed_client()
    background = background_load()
    results = measure(args.repeats, args.iterations, args.warmup, args.seed)
    results["background"] = background
    write_result("call_cost", results)

    for name, summary in results["summaries"].items():
        print(
            f"{name:26} median {summary['median']:7.2f} ms  p95 {summary['p95']:7.2f} ms  "
            f"CPU {results['cpu_ms_median'][name]:6.2f} ms  "
            f"deployd run / this {results['ratio_of_deployd_run_to'][name]:5.2f} "
            f"(paired {results['median_paired_ratio_of_deployd_run_to'][name]:5.2f})"
        )
    for number, round_result in enumerate(results["rounds"], start=1):
        ratios = round_result["ratio_of_deployd_run_to"]
        print(
            f"round {number}: deployd run / python_bare {ratios['python_bare']:.2f}, "
            f"/ etcdctl_lock {ratios['etcdctl_lock']:.2f}"
        )
    for peer, target in results["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        print(
            f"target deployd run <= {target['max_ratio']}x {peer}: {target['ratio']:.2f}x {verdict}"
        )


if __name__ == "__main__":
    main()
