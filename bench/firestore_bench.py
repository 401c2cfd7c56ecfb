"""Benchmark 5: the Firestore lease store against a read-modify-write transaction.

Both run against the same Firestore emulator in the same run:

- the daemon: deployd serve with ``store.kind = "firestore"``, asked over its
  socket for a connection-bound lease (``hold``), as ``deployd run`` asks;
- the transaction: the obvious lock written with google-cloud-firestore's
  async client. A transaction reads the lock document, checks its holder and
  expiry (on this machine's clock), and writes holder, expiry and token + 1.
  In (a) a second variant also creates the deployment record that deployd
  writes with every grant, so that both do the same work.

(a) also calls the daemon's store directly in this process, without the
daemon, to split the daemon's time into the store's and its own.

Measurements:

(a) uncontended acquire: median latency of each, from sending the request
    to the response, and RPCs per acquire, counted by a proxy in front of the
    emulator (rpc_counter.py);
(b) contention: CONTENDERS contenders for one lock per round, each through
    its own daemon or its own client, all started at once: winners per
    round, round time and RPCs per round;
(c) end to end: ``deployd acquire`` as a command, from spawn to exit;
(d) a held lock: one lease held through a daemon with the default TTL for
    ``--hold-seconds``, then a waiter in a second daemon for
    ``--wait-seconds``, each daemon behind a counting proxy of its own. It
    counts commits, batch gets and the documents they write and read per
    minute, and turns them into store operations and list-price costs per
    deploy, day and month.

Usage: firestore_bench.py --emulator-host 127.0.0.1:PORT [options]

run_all.sh starts the emulator on a free loopback port and stops it by its
pid. Every daemon gets its own temporary directory and is stopped by its
pid; every document lives in a namespace of its own for this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from benchlib import (
    BENCH_DIR,
    DEPLOYD,
    VENV_PYTHON,
    BenchError,
    Daemon,
    background_load,
    check_installed_client,
    cpu_seconds,
    running_daemon,
    stop_process,
    summarize,
    write_result,
)

PROJECT = "deployd-bench"
LOCK = "bench-lock"
TTL = 30.0
# Acquires of each approach in (a) before timing starts.
UNCONTENDED_WARMUP = 20
# Acquires of each approach before timing starts, when (a) adds a round trip.
ROUND_TRIP_WARMUP = 5
# Maximum seconds that a daemon may take to respond to a request, far above any
# expected latency.
REQUEST_TIMEOUT = 30.0


# --- the RPC counter ---


class RpcCounter:
    """rpc_counter.py in a process of its own, in front of the emulator."""

    def __init__(self, upstream: str) -> None:
        self.process = subprocess.Popen(
            [str(VENV_PYTHON), str(BENCH_DIR / "rpc_counter.py"), upstream],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.address = self.process.stdout.readline().strip()
        if not self.address:
            stop_process(self.process)
            raise BenchError("rpc_counter.py exited before printing its address")

    def count(self) -> int:
        """Return how many RPCs have passed through the proxy."""
        return int(self._ask("count"))

    def methods(self) -> dict[str, int]:
        """Return the RPCs so far by kind, with the documents read and the writes.

        The keys are ``commit``, ``batch_get``, ``query``, ``other``,
        ``documents_read`` and ``writes`` (see rpc_counter.py).
        """
        counts: dict[str, int] = json.loads(self._ask("methods"))
        return counts

    def set_latency(self, seconds: float) -> None:
        """Hold the first frame of each reply for ``seconds`` from now on; 0 ends that."""
        answer = self._ask(f"latency {seconds}").strip()
        if answer != "ok":
            raise BenchError(f"rpc_counter.py did not take the latency: {answer}")

    def _ask(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        stop_process(self.process)


@contextlib.contextmanager
def rpc_counter(upstream: str) -> Iterator[RpcCounter]:
    """Yield a running RpcCounter, and stop its process by its pid at the end."""
    counter = RpcCounter(upstream)
    try:
        yield counter
    finally:
        counter.close()


# --- the two locks ---


def firestore_config(namespace: str, ttl: float | None = TTL) -> str:
    """Return the config of a daemon on the Firestore store in ``namespace``.

    With ``ttl`` None the config sets no lease section, so the daemon uses its
    default TTL and renewal interval.
    """
    config = f'[store]\nkind = "firestore"\nproject = "{PROJECT}"\nnamespace = "{namespace}"\n'
    if ttl is not None:
        config += f'[lease]\nttl = "{ttl:g}s"\n'
    return config


@contextlib.contextmanager
def firestore_daemon(
    emulator_host: str, namespace: str, ttl: float | None = TTL
) -> Iterator[Daemon]:
    """Yield a running daemon on the Firestore store, reaching the emulator at ``emulator_host``."""
    environment = {"FIRESTORE_EMULATOR_HOST": emulator_host}
    with running_daemon(firestore_config(namespace, ttl), environment) as daemon:
        yield daemon


class DaemonLock:
    """The lock as deployd's callers take it: ``hold`` and ``release`` over the socket."""

    def __init__(self, daemon: Daemon) -> None:
        from deployd_client.protocol import Connection

        self.connection = Connection.connect(daemon.socket)

    def acquire(self) -> str | None:
        """Return the lease id, or None when the lock is busy."""
        from deployd_client.protocol import DaemonError

        try:
            lease = self.connection.request("hold", timeout=REQUEST_TIMEOUT, lock=LOCK)
        except DaemonError as exc:
            if exc.code == "lock_busy":
                return None
            raise
        lease_id: str = lease["lease_id"]
        return lease_id

    def release(self, lease_id: str) -> None:
        self.connection.request("release", timeout=REQUEST_TIMEOUT, lease_id=lease_id)

    def close(self) -> None:
        self.connection.close()


class AlternatingDaemonLock:
    """A lock that two daemons take in turn, as deploys from two workstations do.

    ``acquire`` requests the lock from the first daemon. ``release`` releases
    it there, then lets the second daemon hold and release the lock, so that
    every acquire finds the lock last released by another daemon.
    """

    def __init__(self, first: Daemon, second: Daemon) -> None:
        self.first = DaemonLock(first)
        self.second = DaemonLock(second)

    def acquire(self) -> str | None:
        return self.first.acquire()

    def release(self, lease_id: str) -> None:
        self.first.release(lease_id)
        other = self.second.acquire()
        if other is None:
            raise BenchError("the second daemon found the benchmark's free lock busy")
        self.second.release(other)

    def close(self) -> None:
        self.first.close()
        self.second.close()


def emulator_client(host: str) -> Any:
    """Return an AsyncClient of the emulator at ``host``.

    The library reads FIRESTORE_EMULATOR_HOST only while it creates the client.
    """
    from google.cloud.firestore import AsyncClient

    with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": host}):
        return AsyncClient(project=PROJECT)


def deployment_record(holder: str, token: int) -> dict[str, Any]:
    """Return the fields of the deployment record that deployd's store creates for a grant."""
    from deployd.models import LeaseRequest, Owner, Purpose, Takeover
    from deployd.stores.firestore_documents import new_record_fields

    request = LeaseRequest(
        lock=LOCK,
        holder=holder,
        acquisition_id=secrets.token_hex(8),
        owner=Owner("bench", "localhost", os.getpid(), "bench"),
        purpose=Purpose(),
        ttl=TTL,
    )
    return new_record_fields(request, token, Takeover.FREE)


async def close_client(client: Any) -> None:
    # AsyncClient has no public close() in google-cloud-firestore 2.34.
    api = getattr(client, "_firestore_api_internal", None)
    if api is not None:
        await api.transport.close()


class TransactionLock:
    """The lock as one read-modify-write transaction, with expiry judged on this machine's clock.

    With ``with_record``, the transaction also creates a deployment record
    with the fields that deployd's Firestore store writes for a grant.
    """

    def __init__(self, client: Any, namespace: str, with_record: bool = False) -> None:
        self.client = client
        self.namespace = namespace
        self.reference = client.document(f"bench/{namespace}/locks/{LOCK}")
        self.with_record = with_record

    async def acquire(self, holder: str) -> int | None:
        """Return the new fencing token, or None when the lock is held."""
        from google.cloud.firestore import async_transactional

        @async_transactional
        async def take(transaction: Any) -> int | None:
            snapshot = await self.reference.get(transaction=transaction)
            data = snapshot.to_dict() if snapshot.exists else {}
            if data.get("holder") and data.get("expires_at", 0.0) > time.time():
                return None
            token = int(data.get("token", 0)) + 1
            transaction.set(
                self.reference,
                {"holder": holder, "token": token, "expires_at": time.time() + TTL},
            )
            if self.with_record:
                record = self.client.document(f"bench/{self.namespace}/deployments/{token}")
                transaction.create(record, deployment_record(holder, token))
            return token

        token: int | None = await take(self.client.transaction())
        return token

    async def release(self, holder: str) -> None:
        """Free the lock with a plain update, which the benchmark does not time."""
        await self.reference.update({"holder": None, "expires_at": 0.0})


class StoreLock:
    """The daemon's Firestore store, called in the benchmark's own process without a daemon.

    Its time against the daemon's shows what the daemon adds around the
    store: the socket, the request handler and the lease service.
    """

    def __init__(self, emulator_host: str, namespace: str) -> None:
        from deployd.stores.firestore import FirestoreStore

        self.emulator_host = emulator_host
        self.store = FirestoreStore(PROJECT, namespace=namespace)

    async def open(self) -> None:
        # The store reads FIRESTORE_EMULATOR_HOST when it opens.
        with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": self.emulator_host}):
            await self.store.open()

    async def acquire(self) -> Any:
        """Return the granted lease, or None when the lock is busy."""
        from deployd.models import Acquired, LeaseRequest, Owner, Purpose

        request = LeaseRequest(
            lock=LOCK,
            holder=secrets.token_hex(8),
            acquisition_id=secrets.token_hex(8),
            owner=Owner("bench", "localhost", os.getpid(), "bench"),
            purpose=Purpose(),
            ttl=TTL,
        )
        result = await self.store.try_acquire(request)
        return result.lease if isinstance(result, Acquired) else None

    async def release(self, lease: Any) -> None:
        from deployd.models import Outcome, OutcomeStatus

        await self.store.release(lease, Outcome(OutcomeStatus.RELEASED))

    async def aclose(self) -> None:
        await self.store.aclose()


AnyLock = DaemonLock | AlternatingDaemonLock | TransactionLock | StoreLock


# --- (a) uncontended acquire ---


async def uncontended(
    emulator: str, counter: RpcCounter, iterations: int, round_trip_ms: float
) -> dict[str, Any]:
    """Time acquires of a free lock by the daemon, the store alone and the transactions.

    With ``round_trip_ms``, the approaches are timed again through the
    counting proxy with that latency added to each RPC's reply.
    """
    namespace = f"uncontended-{secrets.token_hex(4)}"
    with (
        firestore_daemon(emulator, namespace) as direct,
        firestore_daemon(counter.address, f"{namespace}-counted") as counted,
        firestore_daemon(emulator, f"{namespace}-turns") as turns,
        firestore_daemon(emulator, f"{namespace}-turns") as other_turns,
        firestore_daemon(counter.address, f"{namespace}-turns-counted") as counted_turns,
        firestore_daemon(emulator, f"{namespace}-turns-counted") as other_counted_turns,
    ):
        clients = {"direct": emulator_client(emulator), "counted": emulator_client(counter.address)}
        locks: dict[str, dict[str, AnyLock]] = {"direct": {}, "counted": {}}
        try:
            for kind, daemon, host, alternating in (
                ("direct", direct, emulator, (turns, other_turns)),
                ("counted", counted, counter.address, (counted_turns, other_counted_turns)),
            ):
                suffix = "" if kind == "direct" else "-counted"
                locks[kind]["daemon"] = DaemonLock(daemon)
                locks[kind]["daemon_in_turns"] = AlternatingDaemonLock(*alternating)
                store_lock = StoreLock(host, f"{namespace}-store{suffix}")
                await store_lock.open()
                locks[kind]["store_in_process"] = store_lock
                locks[kind]["transaction"] = TransactionLock(clients[kind], f"{namespace}{suffix}")
                locks[kind]["transaction_with_record"] = TransactionLock(
                    clients[kind], f"{namespace}-record{suffix}", True
                )

            cpu_before = cpu_seconds(direct.pid)
            latencies = await _time_uncontended(locks["direct"], iterations)
            daemon_cpu = cpu_seconds(direct.pid) - cpu_before
            rpcs = await _count_uncontended(locks["counted"], counter, iterations // 5)
            parts = await _time_emulator_parts(clients["direct"], namespace, iterations)
            with_round_trip: dict[str, list[float]] = {}
            if round_trip_ms > 0:
                counter.set_latency(round_trip_ms / 1000)
                try:
                    with_round_trip = await _time_uncontended(
                        locks["counted"], iterations // 4, warmup=ROUND_TRIP_WARMUP
                    )
                finally:
                    counter.set_latency(0.0)
        finally:
            for by_name in locks.values():
                for lock in by_name.values():
                    if isinstance(lock, DaemonLock | AlternatingDaemonLock):
                        lock.close()
                    elif isinstance(lock, StoreLock):
                        await lock.aclose()
            for client in clients.values():
                await close_client(client)

    medians = {name: summarize(values)["median"] for name, values in latencies.items()}
    round_trip: dict[str, Any] = {"added_ms": round_trip_ms}
    if with_round_trip:
        slow = {name: summarize(values) for name, values in with_round_trip.items()}
        round_trip["latency_ms"] = slow
        round_trip["daemon_over_transaction_median"] = (
            slow["daemon"]["median"] / slow["transaction"]["median"]
        )
        round_trip["daemon_in_turns_over_transaction_median"] = (
            slow["daemon_in_turns"]["median"] / slow["transaction"]["median"]
        )
    return {
        "iterations": iterations,
        "latency_ms": {name: summarize(values) for name, values in latencies.items()},
        "rpcs_per_acquire": rpcs,
        "daemon_over_transaction_median": medians["daemon"] / medians["transaction"],
        "daemon_in_turns_over_transaction_median": (
            medians["daemon_in_turns"] / medians["transaction"]
        ),
        "store_over_transaction_median": medians["store_in_process"] / medians["transaction"],
        # Warm-up and timed acquires, each released again.
        "daemon_cpu_ms_per_acquire_and_release": daemon_cpu
        * 1000
        / (UNCONTENDED_WARMUP + iterations),
        "emulator_parts_ms": parts,
        "with_round_trip": round_trip,
    }


async def _time_emulator_parts(client: Any, namespace: str, iterations: int) -> dict[str, Any]:
    """Time single RPCs of the shapes that the two locks send, with the plain client.

    The shapes are a batch get of one document (the transaction's read) and
    of four (the store's read of the lock, its queue and two freeze documents),
    then a commit of the lock document alone (the transaction's write) and
    one with a deployment record (the store's grant).
    """
    from google.cloud.firestore import SERVER_TIMESTAMP, Increment

    root = f"bench/{namespace}-parts"
    lock = client.document(f"{root}/locks/{LOCK}")
    documents = [lock, *(client.document(f"{root}/{name}/{LOCK}") for name in ("q", "f1", "f2"))]
    await lock.set({"token": 0})
    times: dict[str, list[float]] = {"get_1": [], "get_4": [], "commit_1": [], "commit_2": []}
    for iteration in range(20 + iterations):
        started = time.perf_counter()
        [snapshot async for snapshot in client.get_all(documents[:1])]
        read_one = time.perf_counter()
        [snapshot async for snapshot in client.get_all(documents)]
        read_four = time.perf_counter()

        fields = {"holder": "bench", "renewed": SERVER_TIMESTAMP, "token": Increment(1)}
        alone = client.batch()
        alone.update(lock, fields)
        before_alone = time.perf_counter()
        await alone.commit()
        after_alone = time.perf_counter()
        with_record = client.batch()
        with_record.update(lock, fields)
        record = client.document(f"{root}/deployments/{iteration}")
        with_record.create(record, deployment_record("bench", iteration))
        before_both = time.perf_counter()
        await with_record.commit()
        after_both = time.perf_counter()

        if iteration >= 20:
            times["get_1"].append((read_one - started) * 1000)
            times["get_4"].append((read_four - read_one) * 1000)
            times["commit_1"].append((after_alone - before_alone) * 1000)
            times["commit_2"].append((after_both - before_both) * 1000)
    return {name: summarize(values) for name, values in times.items()}


async def _time_uncontended(
    locks: dict[str, AnyLock], iterations: int, warmup: int = UNCONTENDED_WARMUP
) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in locks}
    for iteration in range(warmup + iterations):
        # A shuffled order per iteration spreads the machine's busy moments over all of them.
        order = list(locks)
        random.shuffle(order)
        for name in order:
            elapsed, _ = await _acquire_and_release(locks[name])
            if iteration >= warmup:
                latencies[name].append(elapsed * 1000)
    return latencies


async def _acquire_and_release(
    lock: AnyLock, counter: RpcCounter | None = None
) -> tuple[float, int]:
    """Acquire the free lock and release it. Return the seconds and the RPCs the acquire took.

    The RPCs are counted only with ``counter``, which adds its own round trips
    around the acquire, so the time is meaningful only without it.
    """
    before = counter.count() if counter is not None else 0
    started = time.perf_counter()
    if isinstance(lock, DaemonLock | AlternatingDaemonLock):
        lease_id = lock.acquire()
        elapsed = time.perf_counter() - started
        after = counter.count() if counter is not None else 0
        if lease_id is None:
            raise BenchError("the daemon found the benchmark's free lock busy")
        lock.release(lease_id)
        return elapsed, after - before
    if isinstance(lock, StoreLock):
        lease = await lock.acquire()
        elapsed = time.perf_counter() - started
        after = counter.count() if counter is not None else 0
        if lease is None:
            raise BenchError("the store found the benchmark's free lock busy")
        await lock.release(lease)
        return elapsed, after - before
    holder = secrets.token_hex(4)
    token = await lock.acquire(holder)
    elapsed = time.perf_counter() - started
    after = counter.count() if counter is not None else 0
    if token is None:
        raise BenchError("the transaction found the benchmark's free lock held")
    await lock.release(holder)
    return elapsed, after - before


async def _count_uncontended(
    locks: dict[str, AnyLock], counter: RpcCounter, runs: int
) -> dict[str, Any]:
    """Return the RPCs of each acquire, counted by the proxy around the acquire alone."""
    counts: dict[str, list[int]] = {name: [] for name in locks}
    for _ in range(runs):
        for name, lock in locks.items():
            _, rpcs = await _acquire_and_release(lock, counter)
            counts[name].append(rpcs)
    return {
        name: {"runs": runs, "distinct": sorted(set(values)), "mean": sum(values) / runs}
        for name, values in counts.items()
    }


# --- (b) contention ---


@dataclass
class Round:
    """The outcome of one contention round, with its time and RPCs.

    ``winners`` and ``busy`` count the contenders that got the lock and those
    that found it held. ``errors`` contains the type and message of each
    contender that failed.
    """

    winners: int
    busy: int
    errors: list[str]
    seconds: float
    rpcs: int


async def contention(counter: RpcCounter, contenders: int, rounds: int) -> dict[str, Any]:
    """Run rounds of ``contenders`` simultaneous acquires of one lock, both ways, alternating."""
    namespace = f"contention-{secrets.token_hex(4)}"
    results: dict[str, list[Round]] = {"daemon": [], "transaction": []}
    with contextlib.ExitStack() as stack:
        daemons = [
            stack.enter_context(firestore_daemon(counter.address, namespace))
            for _ in range(contenders)
        ]
        daemon_locks = [DaemonLock(daemon) for daemon in daemons]
        for lock in daemon_locks:
            stack.callback(lock.close)
        clients = [emulator_client(counter.address) for _ in range(contenders)]
        transaction_locks = [TransactionLock(client, namespace) for client in clients]
        try:
            # One warm-up round each, so that every channel is connected.
            _daemon_round(daemon_locks, counter)
            await _transaction_round(transaction_locks, counter)
            with ThreadPoolExecutor(max_workers=contenders) as pool:
                for _ in range(rounds):
                    results["daemon"].append(_daemon_round(daemon_locks, counter, pool))
                    results["transaction"].append(
                        await _transaction_round(transaction_locks, counter)
                    )
        finally:
            for client in clients:
                await close_client(client)
    return {
        "contenders": contenders,
        "rounds": rounds,
        "through_proxy": True,
        **{name: _summarize_rounds(values) for name, values in results.items()},
    }


def _daemon_round(
    locks: list[DaemonLock], counter: RpcCounter, pool: ThreadPoolExecutor | None = None
) -> Round:
    start = threading.Barrier(len(locks))

    def contend(lock: DaemonLock) -> tuple[str | None, str | None, float, float]:
        start.wait()
        sent = time.perf_counter()
        try:
            lease_id = lock.acquire()
        except Exception as exc:  # any failure counts as an error of the round
            return None, f"{type(exc).__name__}: {exc}", sent, time.perf_counter()
        return lease_id, None, sent, time.perf_counter()

    before = counter.count()
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=len(locks)))
        outcomes = list(pool.map(contend, locks))
    after = counter.count()
    for lock, (lease_id, _, _, _) in zip(locks, outcomes, strict=True):
        if lease_id is not None:
            lock.release(lease_id)
    return Round(
        winners=sum(1 for lease_id, _, _, _ in outcomes if lease_id is not None),
        busy=sum(1 for lease_id, error, _, _ in outcomes if lease_id is None and error is None),
        errors=[error for _, error, _, _ in outcomes if error is not None],
        seconds=max(done for *_, done in outcomes) - min(sent for *_, sent, _ in outcomes),
        rpcs=after - before,
    )


async def _transaction_round(locks: list[TransactionLock], counter: RpcCounter) -> Round:
    holders = [secrets.token_hex(4) for _ in locks]
    before = counter.count()
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(lock.acquire(holder) for lock, holder in zip(locks, holders, strict=True)),
        return_exceptions=True,
    )
    seconds = time.perf_counter() - started
    after = counter.count()
    winners = [
        (lock, holder)
        for lock, holder, outcome in zip(locks, holders, outcomes, strict=True)
        if isinstance(outcome, int)
    ]
    for lock, holder in winners:
        await lock.release(holder)
    return Round(
        winners=len(winners),
        busy=sum(1 for outcome in outcomes if outcome is None),
        errors=[
            f"{type(outcome).__name__}: {outcome}"
            for outcome in outcomes
            if isinstance(outcome, BaseException)
        ],
        seconds=seconds,
        rpcs=after - before,
    )


def _summarize_rounds(rounds: list[Round]) -> dict[str, Any]:
    winners = [round_.winners for round_ in rounds]
    return {
        "winners_per_round": {str(count): winners.count(count) for count in sorted(set(winners))},
        "rounds_with_one_winner": winners.count(1),
        "errors": sum(len(round_.errors) for round_ in rounds),
        "error_kinds": _count_kinds(error for round_ in rounds for error in round_.errors),
        "round_ms": summarize([round_.seconds * 1000 for round_ in rounds]),
        "rpcs_per_round": summarize([float(round_.rpcs) for round_ in rounds]),
    }


def _count_kinds(errors: Iterable[str]) -> dict[str, int]:
    """Count errors by their type and the first 80 characters of their message."""
    kinds: dict[str, int] = {}
    for error in errors:
        kind = error[:80]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


# --- (c) end to end ---


def end_to_end(emulator: str, iterations: int) -> dict[str, Any]:
    """Time ``deployd acquire`` from spawn to exit against a daemon on the emulator."""
    namespace = f"end-to-end-{secrets.token_hex(4)}"
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        with firestore_daemon(emulator, namespace) as daemon:
            env = {**daemon.env, "FIRESTORE_EMULATOR_HOST": emulator}
            command = [str(DEPLOYD), "acquire", LOCK, "--pid", str(sleeper.pid), "--format", "json"]
            times: list[float] = []
            for iteration in range(10 + iterations):
                started = time.perf_counter()
                result = subprocess.run(
                    command, env=env, capture_output=True, text=True, check=False
                )
                elapsed = time.perf_counter() - started
                if result.returncode != 0:
                    raise BenchError(f"deployd acquire exited {result.returncode}: {result.stderr}")
                lease_id = json.loads(result.stdout)["lease_id"]
                released = subprocess.run(
                    [str(DEPLOYD), "release", lease_id], env=env, capture_output=True, check=False
                )
                if released.returncode != 0:
                    raise BenchError(f"deployd release exited {released.returncode}")
                if iteration >= 10:
                    times.append(elapsed * 1000)
    finally:
        stop_process(sleeper)
    return {"iterations": iterations, "acquire_ms": summarize(times)}


# --- (d) a held lock and what it costs ---

# Firestore Standard edition list prices in USD per 100,000 documents, as found
# on 2026-12-04. NOTE: the per-location table of
# https://cloud.google.com/firestore/pricing was missing from the copy of that
# page that could be read, so the multi-region prices come from a copy of an
# earlier version of Google's page (https://www.twblogs.net/a/5e4f845fbd9eee101e8581aa)
# and the regional ones from a third-party guide
# (https://airbyte.com/data-engineering-resources/google-firestore-pricing),
# which gives no regional price for deletes. Check them against Google's table.
PRICES_USD_PER_100K: dict[str, dict[str, float | None]] = {
    "multi-region": {"reads": 0.06, "writes": 0.18, "deletes": 0.02},
    "US regional": {"reads": 0.03, "writes": 0.09, "deletes": None},
}
# The free quota of the (default) database per day, from https://cloud.google.com/firestore/pricing.
FREE_QUOTA_PER_DAY = {"reads": 50_000, "writes": 20_000, "deletes": 20_000}
DAYS_PER_MONTH = 30
# Seconds between two samples of the counting proxy while a lock is held.
SAMPLE_INTERVAL = 0.5
# Seconds cut from each end of the waiter's window, so that the per-minute
# rates of a waiter leave out its enqueue and its last dequeue.
WAITER_EDGE = 1.0


def _difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after}


def _per_minute(counts: dict[str, int], seconds: float) -> dict[str, float]:
    return {name: value * 60.0 / seconds for name, value in counts.items()}


def held_lock(emulator: str, hold_seconds: float, wait_seconds: float) -> dict[str, Any]:
    """Hold one lock with the daemon's default TTL, then add a waiter; count the store traffic.

    The holder and the waiter are two daemons in one namespace, each reaching
    the emulator through a counting proxy of its own.
    """
    from deployd.config import DEFAULT_TTL, default_renew_every

    namespace = f"held-{secrets.token_hex(4)}"
    result: dict[str, Any] = {
        "ttl_seconds": DEFAULT_TTL,
        "renew_every_seconds": default_renew_every(DEFAULT_TTL),
    }
    with (
        rpc_counter(emulator) as holder_counter,
        firestore_daemon(holder_counter.address, namespace, ttl=None) as holder,
    ):
        lock = DaemonLock(holder)
        try:
            before = holder_counter.methods()
            lease_id = lock.acquire()
            if lease_id is None:
                raise BenchError("the holder found the benchmark's free lock busy")
            granted = holder_counter.methods()
            result["grant"] = _difference(granted, before)

            result["holding"] = _hold(holder_counter, granted, hold_seconds)
            if wait_seconds > 0:
                result["waiter"] = _wait_behind(emulator, namespace, holder_counter, wait_seconds)

            before_release = holder_counter.methods()
            lock.release(lease_id)
            result["release"] = _difference(holder_counter.methods(), before_release)
        finally:
            lock.close()
    return result


def _hold(counter: RpcCounter, granted: dict[str, int], seconds: float) -> dict[str, Any]:
    """Keep the lease for ``seconds`` and return the RPCs meanwhile, with the renewal times."""
    started = time.monotonic()
    commits = _sample_commits(counter, granted, started + seconds)
    held_seconds = time.monotonic() - started
    counts = _difference(counter.methods(), granted)
    per_minute = _rates(counts, held_seconds, commits)
    return {
        "seconds": held_seconds,
        "rpcs": counts,
        "commit_seconds_after_grant": [round(when - started, 1) for when, _ in commits],
        "per_minute": per_minute,
        "per_hour": {name: value * 60 for name, value in per_minute.items()},
    }


def _sample_commits(
    counter: RpcCounter, start: dict[str, int], until: float
) -> list[tuple[float, dict[str, int]]]:
    """Sample ``counter`` until the monotonic time ``until``; return each sample with new commits.

    Each entry is the time of the sample and the counts at that time.
    """
    commits = start["commit"]
    samples: list[tuple[float, dict[str, int]]] = []
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(SAMPLE_INTERVAL, left))
        current = counter.methods()
        if current["commit"] > commits:
            samples.append((time.monotonic(), current))
            commits = current["commit"]
    return samples


def _rates(
    counts: dict[str, int], seconds: float, commits: list[tuple[float, dict[str, int]]]
) -> dict[str, float]:
    """Return ``counts`` per minute of a window of ``seconds``.

    Commits and writes come every renewal or heartbeat period, so a window
    that ends between two of them would undercount them. With two or more
    commits sampled, their rates span whole periods, from the first commit
    seen to the last.
    """
    per_minute = _per_minute(counts, seconds)
    if len(commits) >= 2:
        (first_time, first), (last_time, last) = commits[0], commits[-1]
        periods = _per_minute(_difference(last, first), last_time - first_time)
        per_minute["commit"] = periods["commit"]
        per_minute["writes"] = periods["writes"]
    return per_minute


def _wait_behind(
    emulator: str, namespace: str, holder_counter: RpcCounter, seconds: float
) -> dict[str, Any]:
    """Queue a second daemon for the held lock for ``seconds``; return both daemons' RPCs."""
    from deployd_client.protocol import DaemonError

    outcome: list[BaseException | dict[str, Any]] = []
    with (
        rpc_counter(emulator) as counter,
        firestore_daemon(counter.address, namespace, ttl=None) as daemon,
    ):
        waiter = DaemonLock(daemon)

        def wait() -> None:
            try:
                result = waiter.connection.request(
                    "hold", timeout=seconds + REQUEST_TIMEOUT, lock=LOCK, wait=seconds
                )
                outcome.append(result)
            except Exception as exc:  # reported below as the outcome of the wait
                outcome.append(exc)

        holder_before = holder_counter.methods()
        before = counter.methods()
        thread = threading.Thread(target=wait)
        started = time.monotonic()
        thread.start()
        try:
            time.sleep(WAITER_EDGE)
            steady_start = counter.methods()
            commits = _sample_commits(counter, steady_start, started + seconds - WAITER_EDGE)
            steady_end = counter.methods()
            steady_seconds = time.monotonic() - started - WAITER_EDGE
        finally:
            thread.join(seconds + REQUEST_TIMEOUT)
            waiter.close()
        # The daemon removes the waiter's entry from the queue after its response.
        time.sleep(WAITER_EDGE)
        totals = _difference(counter.methods(), before)
        holder_rpcs = _difference(holder_counter.methods(), holder_before)

    if not outcome or isinstance(outcome[0], dict):
        raise BenchError(f"the waiter's hold should have timed out, but returned {outcome}")
    error = outcome[0]
    if not isinstance(error, DaemonError) or error.code not in ("wait_timeout", "lock_busy"):
        raise BenchError(f"the waiter's hold failed: {type(error).__name__}: {error}")
    steady = _difference(steady_end, steady_start)
    return {
        "seconds": seconds,
        "answer": error.code,
        "rpcs": totals,
        "holder_rpcs_meanwhile": holder_rpcs,
        "steady_seconds": steady_seconds,
        "steady_rpcs": steady,
        "commit_seconds_after_request": [round(when - started, 1) for when, _ in commits],
        "per_minute": _rates(steady, steady_seconds, commits),
    }


def cost_estimate(
    measured: dict[str, Any], deploys_per_day: int, minutes_held: float, minutes_waiting: float
) -> dict[str, Any]:
    """Turn the measured traffic of a held lock into operations and list-price costs.

    A deploy takes the lock once, holds it ``minutes_held`` and releases it.
    Its writes are the grant's, the renewals of ``minutes_held`` at the
    measured rate, and the release's. Its reads are the documents that the
    grant and the release requested. Every requested document counts as a
    billed read, also one that does not exist. A second scenario adds
    ``minutes_waiting`` in the queue behind another daemon to every deploy,
    at the measured rates of the waiter. Nothing here deletes documents.
    """
    holding = measured["holding"]["per_minute"]
    per_deploy = {
        "writes": measured["grant"]["writes"]
        + holding["writes"] * minutes_held
        + measured["release"]["writes"],
        "reads": measured["grant"]["documents_read"]
        + holding["documents_read"] * minutes_held
        + measured["release"]["documents_read"],
        "deletes": 0.0,
    }
    scenarios = {"holding only": per_deploy}
    if "waiter" in measured:
        waiting = measured["waiter"]["per_minute"]
        scenarios[f"holding, after {minutes_waiting:g} min in the queue"] = {
            "writes": per_deploy["writes"] + waiting["writes"] * minutes_waiting,
            "reads": per_deploy["reads"] + waiting["documents_read"] * minutes_waiting,
            "deletes": 0.0,
        }
    return {
        "deploys_per_day": deploys_per_day,
        "minutes_held_per_deploy": minutes_held,
        "minutes_waiting_per_deploy": minutes_waiting,
        "days_per_month": DAYS_PER_MONTH,
        "free_quota_per_day": FREE_QUOTA_PER_DAY,
        "prices_usd_per_100k": PRICES_USD_PER_100K,
        "scenarios": {
            name: _scenario_cost(operations, deploys_per_day)
            for name, operations in scenarios.items()
        },
    }


def _scenario_cost(per_deploy: dict[str, float], deploys_per_day: int) -> dict[str, Any]:
    per_day = {name: value * deploys_per_day for name, value in per_deploy.items()}
    billed_per_day = {
        name: max(0.0, value - FREE_QUOTA_PER_DAY[name]) for name, value in per_day.items()
    }
    costs: dict[str, dict[str, float | None]] = {}
    for location, prices in PRICES_USD_PER_100K.items():
        for label, counts in (
            ("without free quota", per_day),
            ("after free quota", billed_per_day),
        ):
            total: float | None = 0.0
            for name, count in counts.items():
                price = prices[name]
                if count and price is None:
                    total = None
                elif total is not None and price is not None:
                    total += count / 100_000 * price * DAYS_PER_MONTH
            costs.setdefault(location, {})[label] = total
    return {
        "per_deploy": per_deploy,
        "per_day": per_day,
        "per_month": {name: value * DAYS_PER_MONTH for name, value in per_day.items()},
        "share_of_free_quota_per_day": {
            name: value / FREE_QUOTA_PER_DAY[name] for name, value in per_day.items()
        },
        "usd_per_month": costs,
    }


# --- main ---


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--emulator-host",
        default=os.environ.get("FIRESTORE_EMULATOR_HOST"),
        help="HOST:PORT of a running Firestore emulator on loopback "
        "(default: $FIRESTORE_EMULATOR_HOST)",
    )
    parser.add_argument(
        "--iterations", type=int, default=200, help="timed acquires per approach in (a) and (c)"
    )
    parser.add_argument(
        "--round-trip-ms",
        type=float,
        default=10.0,
        help="milliseconds added to each RPC's reply when (a) times the approaches again "
        "through the counting proxy, as a stand-in for a network round trip; 0 skips that",
    )
    parser.add_argument("--contenders", type=int, default=20, help="contenders per round in (b)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per approach in (b)")
    parser.add_argument(
        "--hold-seconds",
        type=float,
        default=65.0,
        help="seconds that (d) holds one lock with the default TTL of 30 s, which renews "
        "every 10 s; 0 skips (d)",
    )
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=30.0,
        help="seconds that a second daemon waits for the held lock in (d); 0 skips the waiter",
    )
    parser.add_argument(
        "--deploys-per-day", type=int, default=100, help="deploys per day in the cost estimate"
    )
    parser.add_argument(
        "--minutes-held",
        type=float,
        default=10.0,
        help="minutes that a deploy keeps the lock, in the cost estimate",
    )
    parser.add_argument(
        "--minutes-waiting",
        type=float,
        default=5.0,
        help="minutes that each deploy waits in the queue in the second scenario of the cost "
        "estimate",
    )
    args = parser.parse_args()
    if args.hold_seconds < 0 or args.wait_seconds < 0 or args.round_trip_ms < 0:
        raise BenchError("--hold-seconds, --wait-seconds and --round-trip-ms must not be negative")
    if 0 < args.wait_seconds <= 2 * WAITER_EDGE:
        raise BenchError(f"--wait-seconds must be 0 or more than {2 * WAITER_EDGE:g}")
    check_installed_client()
    if not args.emulator_host:
        raise BenchError(
            "no emulator: pass --emulator-host or set FIRESTORE_EMULATOR_HOST "
            "(bench/run_all.sh starts one)"
        )
    host, _, _ = args.emulator_host.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        raise BenchError(f"the emulator must listen on loopback, not on {args.emulator_host}")

    load = background_load()
    with rpc_counter(args.emulator_host) as counter:
        print("== (a) uncontended acquire", flush=True)
        uncontended_result = asyncio.run(
            uncontended(args.emulator_host, counter, args.iterations, args.round_trip_ms)
        )
        print("== (b) contention", flush=True)
        contention_result = asyncio.run(contention(counter, args.contenders, args.rounds))
    print("== (c) deployd acquire, end to end", flush=True)
    end_to_end_result = end_to_end(args.emulator_host, args.iterations)
    held_sections: dict[str, Any] = {}
    if args.hold_seconds > 0:
        print(f"== (d) a lock held for {args.hold_seconds:g} s, then a waiter", flush=True)
        held_result = held_lock(args.emulator_host, args.hold_seconds, args.wait_seconds)
        held_sections = {
            "held_lock": held_result,
            "cost": cost_estimate(
                held_result, args.deploys_per_day, args.minutes_held, args.minutes_waiting
            ),
        }

    path = write_result(
        "firestore",
        {
            "background": load,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "targets": targets(uncontended_result, contention_result, end_to_end_result),
            "uncontended": uncontended_result,
            "contention": contention_result,
            "end_to_end": end_to_end_result,
            **held_sections,
        },
    )
    print(json.dumps(read_back(path), indent=2))
    return 0


def targets(
    uncontended: dict[str, Any], contention: dict[str, Any], end_to_end: dict[str, Any]
) -> dict[str, bool]:
    """Return whether each target of this benchmark was met."""
    daemon_rpcs = uncontended["rpcs_per_acquire"]["daemon"]["distinct"]
    rounds = contention["rounds"]
    return {
        "at most 2 RPCs per uncontended acquire": max(daemon_rpcs) <= 2,
        "uncontended acquire no slower than the transaction (medians)": (
            uncontended["daemon_over_transaction_median"] <= 1.0
        ),
        "exactly one winner in every contention round": (
            contention["daemon"]["rounds_with_one_winner"] == rounds
        ),
        "deployd acquire p95 under 50 ms": end_to_end["acquire_ms"]["p95"] < 50.0,
        "deployd acquire p95 within the 500 ms budget": end_to_end["acquire_ms"]["p95"] < 500.0,
    }


def read_back(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"firestore_bench.py: {exc}", file=sys.stderr)
        sys.exit(1)
