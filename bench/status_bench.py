"""Benchmark 6: ``deployd status --json`` on a busy store: 500 locks, 10,000 deployment records.

The store is filled through the store API before the daemon starts: every
lock is granted and released until the records add up, a tenth of the locks
stay held with a long TTL, and some held locks get waiters. Then a daemon
on that store serves ``status``:

- ``command``: ``deployd status --json`` as a command, from spawn to exit,
  its output going to /dev/null; the figure that the target is about;
- ``op``: the ``status`` request alone, sent over the daemon's socket from
  this process, from sending to the parsed response;
- ``store_latency``: what the daemon reports as ``store.latency``: its
  ``list_locks`` call;
- ``client_floor``: ``deployd --version``, which starts the client's
  interpreter and imports its command module without talking to a daemon.

Next to the wall times it records the CPU time of the command and of the
daemon during each op, which a busy machine inflates far less.

With ``--emulator-host`` the same runs on the Firestore store against a
running emulator, in a namespace of its own; without it only SQLite runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
from benchlib import (
    DEPLOYD,
    BenchError,
    Daemon,
    background_load,
    check_installed_client,
    cpu_seconds,
    private_tempdir,
    running_daemon,
    summarize,
    write_result,
)

LOCKS = 500
RECORDS = 10_000
# Every HELD_EVERY-th lock stays held, and every WAITERS_EVERY-th of those gets waiters.
HELD_EVERY = 10
WAITERS_EVERY = 2
WAITERS_PER_LOCK = 2
# Long enough that no lease or waiter entry expires while the benchmark runs.
LONG_TTL = 3600.0
PROJECT = "deployd-bench"
# The maximum seconds one ``status`` may take before the benchmark gives up.
REQUEST_TIMEOUT = 60.0
# Targets for the median of the whole command, in seconds.
TARGETS = {"sqlite": 0.150, "firestore": 0.500}
# How many locks are filled at once on Firestore, where each grant is a few RPCs.
FIRESTORE_FILLERS = 32


def lock_name(index: int) -> str:
    return f"service-{index:03d}"


async def fill_store(store: Any) -> dict[str, int]:
    """Grant and release every lock until RECORDS records exist; leave some held, with waiters.

    ``store`` is an open LeaseStore. Returns what was written.
    """
    from deployd.models import Acquired, LeaseRequest, Outcome, Owner, Purpose

    owner = Owner("bench", "bench-host", os.getpid(), "bench-filler")
    grants_per_lock = RECORDS // LOCKS
    counts = {"records": 0, "held": 0, "waiters": 0}

    async def grant(lock: str, session: str, ttl: float) -> Any:
        request = LeaseRequest(
            lock=lock,
            holder=session,
            acquisition_id=secrets.token_hex(8),
            owner=owner,
            purpose=Purpose(commit=secrets.token_hex(4), reason="benchmark"),
            ttl=ttl,
        )
        result = await store.try_acquire(request)
        if not isinstance(result, Acquired):
            raise BenchError(f"filling the store: {lock} was not granted: {result}")
        counts["records"] += 1
        return result.lease

    async def fill_lock(index: int) -> None:
        lock = lock_name(index)
        held = index % HELD_EVERY == 0
        for number in range(grants_per_lock):
            session = f"bench@bench-host_{index:03d}_{number:03d}"
            if held and number == grants_per_lock - 1:
                await grant(lock, session, LONG_TTL)
                counts["held"] += 1
                break
            lease = await grant(lock, session, 30.0)
            # One deploy in seven fails, as a mix of outcomes for history.
            exit_code = 1 if number % 7 == 0 else 0
            await store.release(lease, Outcome.from_exit_code(exit_code))
        if held and index % (HELD_EVERY * WAITERS_EVERY) == 0:
            for waiter in range(WAITERS_PER_LOCK):
                waiter_id = f"bench@bench-host_{index:03d}_waiter{waiter}"
                await store.enqueue(lock, waiter_id, owner, Purpose(reason="waiting"), LONG_TTL)
                counts["waiters"] += 1

    limiter = anyio.CapacityLimiter(FIRESTORE_FILLERS if store.kind == "firestore" else 1)

    async def fill_limited(index: int) -> None:
        async with limiter:
            await fill_lock(index)

    async with anyio.create_task_group() as group:
        for index in range(LOCKS):
            group.start_soon(fill_limited, index)
    return counts


def run_async(function: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(function)


def fill_sqlite(path: Path) -> dict[str, Any]:
    from deployd.stores.sqlite import SQLiteStore

    async def fill() -> dict[str, int]:
        store = SQLiteStore(str(path))
        await store.open()
        try:
            return await fill_store(store)
        finally:
            await store.aclose()

    started = time.monotonic()
    counts: dict[str, Any] = run_async(fill)
    counts["seconds"] = round(time.monotonic() - started, 1)
    return counts


def fill_firestore(emulator_host: str, namespace: str) -> dict[str, Any]:
    async def fill() -> dict[str, int]:
        from deployd.stores.firestore import FirestoreStore

        store = FirestoreStore(project=PROJECT, namespace=namespace, timeout=30.0)
        await store.open()
        try:
            return await fill_store(store)
        finally:
            await store.aclose()

    started = time.monotonic()
    # The library reads FIRESTORE_EMULATOR_HOST when the client is created.
    with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": emulator_host}):
        counts: dict[str, Any] = run_async(fill)
    counts["seconds"] = round(time.monotonic() - started, 1)
    return counts


# --- timing ---


def time_command(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``argv`` to its end with stdout to /dev/null; return its wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=REQUEST_TIMEOUT,
        check=False,
    )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def time_op(daemon: Daemon) -> tuple[float, float, dict[str, Any]]:
    """Send one ``status`` request over the socket; return its wall seconds, the CPU seconds
    the daemon used meanwhile, and the result."""
    from deployd_client.protocol import Connection

    with Connection.connect(daemon.socket, timeout=5.0) as connection:
        cpu_before = cpu_seconds(daemon.pid)
        started = time.perf_counter()
        result: dict[str, Any] = connection.request("status", timeout=REQUEST_TIMEOUT)
        elapsed = time.perf_counter() - started
        return elapsed, cpu_seconds(daemon.pid) - cpu_before, result


def measure(daemon: Daemon, runs: int, warmup: int) -> dict[str, Any]:
    """Time the command, the op and the client's floor, interleaved, ``runs`` times each."""
    status_argv = [str(DEPLOYD), "status", "--json"]
    version_argv = [str(DEPLOYD), "--version"]
    for _ in range(warmup):
        time_command(status_argv, daemon.env)
        time_op(daemon)

    command: list[float] = []
    command_cpu: list[float] = []
    op: list[float] = []
    daemon_cpu: list[float] = []
    store_latency: list[float] = []
    floor: list[float] = []
    last: dict[str, Any] = {}

    for _ in range(runs):
        wall, cpu = time_command(status_argv, daemon.env)
        command.append(wall)
        command_cpu.append(cpu)
        wall, cpu, last = time_op(daemon)
        op.append(wall)
        daemon_cpu.append(cpu)
        store_latency.append(float(last["store"]["latency"]))
        floor.append(time_command(version_argv, daemon.env)[0])

    output = subprocess.run(
        status_argv, env=daemon.env, capture_output=True, timeout=REQUEST_TIMEOUT, check=True
    ).stdout
    locks = last["locks"]
    return {
        "command": summarize(command),
        "command_cpu": summarize(command_cpu),
        "op": summarize(op),
        "daemon_cpu": summarize(daemon_cpu),
        "store_latency": summarize(store_latency),
        "client_floor": summarize(floor),
        "output_bytes": len(output),
        "locks_reported": len(locks),
        "held_reported": sum(1 for entry in locks if entry["held"]),
        "waiters_reported": sum(len(entry["waiters"]) for entry in locks),
        "latest_reported": len(last["latest"]),
    }


def bench_sqlite(runs: int, warmup: int) -> dict[str, Any]:
    with private_tempdir("sqb") as directory:
        path = directory / "locks.sqlite3"
        filled = fill_sqlite(path)
        config = f'[store]\nkind = "sqlite"\npath = "{path}"\n'
        with running_daemon(config) as daemon:
            result = measure(daemon, runs, warmup)
    return {"filled": filled, **result}


def bench_firestore(emulator_host: str, runs: int, warmup: int) -> dict[str, Any]:
    namespace = f"status-bench-{secrets.token_hex(4)}"
    filled = fill_firestore(emulator_host, namespace)
    config = (
        f'[store]\nkind = "firestore"\nproject = "{PROJECT}"\nnamespace = "{namespace}"\n'
        'timeout = "30s"\n'
    )
    with running_daemon(config, {"FIRESTORE_EMULATOR_HOST": emulator_host}) as daemon:
        result = measure(daemon, runs, warmup)
    return {"filled": filled, "namespace": namespace, **result}


def report(name: str, result: dict[str, Any]) -> None:
    median = result["command"]["median"]
    target = TARGETS[name]
    verdict = "meets" if median < target else "MISSES"
    print(
        f"{name}: command median {median * 1000:.1f} ms ({verdict} the target of "
        f"{target * 1000:.0f} ms), command CPU {result['command_cpu']['median'] * 1000:.1f} ms; "
        f"op {result['op']['median'] * 1000:.1f} ms, daemon CPU "
        f"{result['daemon_cpu']['median'] * 1000:.1f} ms, list_locks "
        f"{result['store_latency']['median'] * 1000:.1f} ms; client floor "
        f"{result['client_floor']['median'] * 1000:.1f} ms; {result['output_bytes']} bytes"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--emulator-host",
        default=None,
        help="HOST:PORT of a running Firestore emulator on loopback; without it only SQLite runs",
    )
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    args = parser.parse_args()
    check_installed_client()
    if args.emulator_host and not args.emulator_host.startswith(("127.0.0.1:", "localhost:")):
        raise BenchError(f"--emulator-host must be on loopback, got {args.emulator_host!r}")

    results: dict[str, Any] = {
        "locks": LOCKS,
        "records": RECORDS,
        "runs": args.runs,
        "targets": TARGETS,
        "background_load": background_load(),
    }
    results["sqlite"] = bench_sqlite(args.runs, args.warmup)
    report("sqlite", results["sqlite"])
    if args.emulator_host:
        results["firestore"] = bench_firestore(args.emulator_host, args.runs, args.warmup)
        report("firestore", results["firestore"])
    path = write_result("status", results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
