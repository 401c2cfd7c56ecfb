"""Benchmark 4: what Slack notifications add to ``deployd run L -- true``.

Four daemons on SQLite are up before timing starts: one with Slack off, and
three that post to a fake Slack on loopback (``tests/slack_server.py``,
each in a process of its own) that answers at once, after 2 s, or never. Every
deploy writes three messages to the outbox (the started post, its update
and a thread reply), so the sender of the slow and the silent Slack always
has work queued while the deploys run.

Each iteration runs ``deployd run`` once against every daemon, in a shuffled
order, so a busy phase of the machine hits all of them alike. The target is
that the median with Slack is at most 1.05 times the median with Slack off,
in every case; the median of per-iteration ratios is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    DEPLOYD,
    STOP_TIMEOUT,
    BenchError,
    Daemon,
    background_load,
    check_installed_client,
    cpu_seconds,
    private_tempdir,
    running_daemon,
    stop_process,
    summarize,
    write_result,
)
from call_cost import Command, benchmark_env, time_once

SLACK_SERVER = BENCH_DIR.parent / "tests" / "slack_server.py"

LOCK = "bench-slack"
MAX_RATIO = 1.05
# How each fake Slack answers: seconds of delay, or None for never.
CASES: dict[str, float | None] = {"slack_0ms": 0.0, "slack_2s": 2.0, "slack_never": None}
BASELINE = "slack_off"
COMMAND = Command("deployd_run", [str(DEPLOYD), "run", LOCK, "--", "true"], uses_daemon=True)


@dataclass
class FakeSlack:
    """A fake Slack in a process of its own; ``requests`` is set once it has stopped."""

    process: subprocess.Popen[str]
    api_url: str
    token: str
    requests: int | None = None


@contextmanager
def fake_slack(answer_after: float | None) -> Iterator[FakeSlack]:
    """Run ``tests/slack_server.py`` at the lowest CPU priority; stop it by its pid on exit.

    The real Slack runs on other machines and takes no CPU from this one, so
    the stand-in runs in its own process (not in this one, where its threads
    would hold the GIL while a run is timed) and yields the CPU to the daemon.
    """
    arguments = ["--hang"] if answer_after is None else ["--delay", str(answer_after)]
    process = subprocess.Popen(
        [sys.executable, str(SLACK_SERVER), *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        os.setpriority(os.PRIO_PROCESS, process.pid, 19)
        assert process.stdout is not None and process.stdin is not None
        line = process.stdout.readline()
        try:
            started = json.loads(line)
        except ValueError:
            raise BenchError(f"the fake Slack did not start: {line!r}") from None
        server = FakeSlack(process, started["api_url"], started["token"])
        yield server
        process.stdin.close()
        server.requests = json.loads(process.stdout.readline())["requests"]
        process.wait(STOP_TIMEOUT)
    finally:
        stop_process(process)


@contextmanager
def slack_daemon(answer_after: float | None, scratch: Path) -> Iterator[tuple[Daemon, FakeSlack]]:
    """Start a fake Slack that answers after ``answer_after`` s (never when None) and its daemon."""
    with fake_slack(answer_after) as slack:
        port = slack.api_url.split(":")[2].split("/")[0]
        token_file = scratch / f"token-{port}"
        token_file.write_text(slack.token)
        token_file.chmod(0o600)
        config = f'[slack]\ntoken_file = "{token_file}"\napi_url = "{slack.api_url}"\n'
        with running_daemon(config) as daemon:
            yield daemon, slack


def measure_once(
    iterations: int, warmup: int, shuffler: random.Random
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, int | None]]:
    """Time ``deployd run`` against a fresh set of daemons and fake Slacks.

    Returns the wall-clock times in ms by case, each daemon's CPU ms per run,
    and how many requests each fake Slack received.
    """
    with ExitStack() as stack:
        scratch = stack.enter_context(private_tempdir("slackbench"))
        daemons = {BASELINE: stack.enter_context(running_daemon())}
        servers = {}
        for name, answer_after in CASES.items():
            daemons[name], servers[name] = stack.enter_context(slack_daemon(answer_after, scratch))
        log = scratch / "stderr.txt"
        envs = {name: benchmark_env(daemon.env) for name, daemon in daemons.items()}
        for _ in range(warmup):
            for name in daemons:
                time_once(COMMAND, envs[name], log)

        wall: dict[str, list[float]] = {name: [] for name in daemons}
        cpu_before = {name: cpu_seconds(daemon.pid) for name, daemon in daemons.items()}
        for _ in range(iterations):
            order = list(daemons)
            shuffler.shuffle(order)
            for name in order:
                elapsed, _ = time_once(COMMAND, envs[name], log)
                wall[name].append(elapsed * 1000)
        daemon_cpu_ms = {
            name: 1000 * (cpu_seconds(daemon.pid) - cpu_before[name]) / iterations
            for name, daemon in daemons.items()
        }
    return wall, daemon_cpu_ms, {name: server.requests for name, server in servers.items()}


def measure(repeats: int, iterations: int, warmup: int, seed: int) -> dict[str, Any]:
    """Run ``repeats`` rounds of ``measure_once``; return pooled and per-round ratios."""
    shuffler = random.Random(seed)
    wall: dict[str, list[float]] = {}
    rounds = []
    for _ in range(repeats):
        round_wall, daemon_cpu_ms, requests = measure_once(iterations, warmup, shuffler)
        for name, values in round_wall.items():
            wall.setdefault(name, []).extend(values)
        round_ratios = _ratios(round_wall)
        rounds.append(
            {
                "median_ms": {
                    name: summary["median"] for name, summary in round_ratios["summaries"].items()
                },
                "ratio": {
                    name: target["ratio"] for name, target in round_ratios["targets"].items()
                },
                "daemon_cpu_ms_per_run": daemon_cpu_ms,
                "slack_requests": requests,
            }
        )
        print(f"round {len(rounds)}/{repeats} done", flush=True)
    return {
        "unit": "ms",
        "settings": {"repeats": repeats, "iterations": iterations, "warmup": warmup, "seed": seed},
        "command": COMMAND.argv,
        **_ratios(wall),
        "rounds": rounds,
        "wall_ms": wall,
    }


def _ratios(wall: dict[str, list[float]]) -> dict[str, Any]:
    summaries = {name: summarize(values) for name, values in wall.items()}
    baseline = wall[BASELINE]
    targets = {}
    for name in CASES:
        ratio = summaries[name]["median"] / summaries[BASELINE]["median"]
        paired = statistics.median(a / b for a, b in zip(wall[name], baseline, strict=True))
        targets[name] = {
            "max_ratio": MAX_RATIO,
            "ratio": ratio,
            "median_paired_ratio": paired,
            "met": ratio <= MAX_RATIO,
        }
    return {"summaries": summaries, "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds, each with fresh daemons and fake Slacks"
    )
    parser.add_argument(
        "--iterations", type=int, default=80, help="timed runs per daemon and round"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed runs per daemon at each round's start"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the run order shuffle")
    args = parser.parse_args()
    if args.repeats < 1 or args.iterations < 1:
        raise BenchError("--repeats and --iterations must be at least 1")

    check_installed_client()
    background = background_load()
    results = measure(args.repeats, args.iterations, args.warmup, args.seed)
    results["background"] = background
    write_result("slack_overhead", results)

    for name, summary in results["summaries"].items():
        print(f"{name:12} median {summary['median']:7.2f} ms  p95 {summary['p95']:7.2f} ms")
    for number, round_result in enumerate(results["rounds"], start=1):
        ratios = ", ".join(f"{name} {ratio:.3f}x" for name, ratio in round_result["ratio"].items())
        cpu = ", ".join(
            f"{name} {value:.2f}" for name, value in round_result["daemon_cpu_ms_per_run"].items()
        )
        print(f"round {number}: {ratios}; daemon CPU ms per run: {cpu}")
    for name, target in results["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        print(
            f"target {name} <= {MAX_RATIO}x {BASELINE}: {target['ratio']:.3f}x "
            f"(paired {target['median_paired_ratio']:.3f}) {verdict}"
        )


if __name__ == "__main__":
    main()
