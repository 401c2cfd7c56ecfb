"""Tests of what only the Firestore store does, against the emulator.

The shared contract lives in test_store_contract.py. These tests cover the
document layout, the RPC cost of each operation, expiry by real server time
with short TTLs, clock skew between workstations, writes whose replies are
lost (through tcp_proxy.TcpProxy), deadlines, and an emulator restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from conftest_store import TTL, expect_busy, expect_grant, make_request, owner_of, session_id
from firestore_emulator import FirestoreEmulator, FirestoreNamespace
from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.cloud.firestore import AsyncClient
from proto.datetime_helpers import DatetimeWithNanoseconds as ProtoDatetime  # type: ignore[import-untyped]
from tcp_proxy import TcpProxy

from deployd.config import Config, StoreConfig
from deployd.errors import ConfigError, LeaseLost, StoreUnavailable
from deployd.models import (
    ALL_LOCKS,
    Acquired,
    Busy,
    Deployment,
    Lease,
    Outcome,
    Purpose,
    Takeover,
)
from deployd.stores import create_store
from deployd.stores import firestore as firestore_module
from deployd.stores.firestore import EMULATOR_PROJECT, FirestoreStore, resolve_project
from deployd.stores.firestore_documents import deployment_id, document_id, version_of

pytestmark = pytest.mark.anyio

ANA = session_id("ana")
BEN = session_id("ben")
CARA = session_id("cara")
DAVE = session_id("dave")

# Store timeout in the fault tests, in seconds.
TIMEOUT = 1.0
# TTL of the leases that the real-time tests let expire, in seconds.
SHORT_TTL = 1.0
# Margin added to SHORT_TTL before a lease counts as expired, for RPC latency.
EXPIRY_MARGIN = 0.4

OpenStore = Callable[..., Awaitable[FirestoreStore]]


@pytest.fixture
async def open_store(
    firestore_namespace: FirestoreNamespace,
    monkeypatch: pytest.MonkeyPatch,
    ignore_closed_loop_callbacks: None,
) -> AsyncIterator[OpenStore]:
    """Yield a function that opens a store in the test's namespace.

    ``emulator_host`` points that store at another address, such as a proxy;
    other keyword arguments go to FirestoreStore.
    """
    opened: list[FirestoreStore] = []

    async def open_new(emulator_host: str | None = None, **changes: Any) -> FirestoreStore:
        store = firestore_namespace.build_store(**changes)
        with monkeypatch.context() as patch:
            if emulator_host is not None:
                # The library reads the variable only while open() creates the client.
                patch.setenv("FIRESTORE_EMULATOR_HOST", emulator_host)
            await store.open()
        opened.append(store)
        return store

    yield open_new

    for store in opened:
        await store.aclose()


@pytest.fixture
def proxy(firestore_namespace: FirestoreNamespace) -> Iterator[TcpProxy]:
    with TcpProxy(firestore_namespace.host) as started:
        yield started


@pytest.fixture
async def raw_client(firestore_namespace: FirestoreNamespace) -> AsyncIterator[AsyncClient]:
    """Yield a plain client for reading the store's documents directly."""
    client = AsyncClient(project=firestore_namespace.project)
    yield client
    # AsyncClient has no public close(); this closes the channel it opened.
    await client._firestore_api.transport.close()


async def _measure(
    store: FirestoreStore, proxy: TcpProxy, call: Awaitable[Any]
) -> tuple[Any, tuple[int, int]]:
    """Await ``call`` and return its result with its cost.

    The cost is a pair: the RPCs that the store counted, and the requests that the proxy saw.
    """
    counted, seen = store.rpc_count, proxy.requests
    result = await call
    return result, (store.rpc_count - counted, proxy.requests - seen)


def _parse_version(version: str) -> datetime:
    parsed: datetime = DatetimeWithNanoseconds.from_rfc3339(version)  # type: ignore[no-untyped-call]
    return parsed


def _unlocked_record(holder: str) -> Deployment:
    """Return the record of a deploy by ``holder`` that ran without the lock ``api``."""
    return Deployment(
        session_id=holder,
        lock="api",
        token=0,
        owner=owner_of(holder),
        purpose=Purpose(),
        started_at=1_770_000_000.5,
        waited=0.0,
        finished_at=1_770_000_060.25,
        outcome="succeeded",
        exit_code=0,
        degraded=True,
        takeover="unlocked",
    )


async def test_document_names_equal_library_references(open_store: OpenStore) -> None:
    """The names that writes use equal those of the library's references."""
    store = await open_store()
    for lock in ("api", "web-1.staging", ALL_LOCKS):
        named = {
            "locks": store._lock_reference(lock),
            "queues": store._queue_reference(lock),
            "freezes": store._freeze_reference(lock),
        }
        for collection, reference in named.items():
            name = store._document_name(collection, document_id(lock))
            assert name == firestore_module._document_path(reference)
        record = store._document_name("deployments", deployment_id(lock, 12))
        assert record == firestore_module._document_path(store._deployment_reference(lock, 12))


async def _until_available(call: Callable[[], Awaitable[Any]], within: float = 60.0) -> Any:
    """Repeat ``call`` while it raises StoreUnavailable, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.5)


# --- configuration, without the emulator ---


def test_project_comes_from_config_first() -> None:
    environ = {"GOOGLE_CLOUD_PROJECT": "from-env", "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1"}

    assert resolve_project("from-config", environ) == "from-config"


def test_project_falls_back_to_environment() -> None:
    environ = {"GOOGLE_CLOUD_PROJECT": "from-env", "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1"}

    assert resolve_project(None, environ) == "from-env"


def test_project_defaults_only_with_emulator() -> None:
    assert resolve_project(None, {"FIRESTORE_EMULATOR_HOST": "127.0.0.1:1"}) == EMULATOR_PROJECT
    with pytest.raises(ConfigError) as caught:
        resolve_project(None, {})
    assert "store.project" in str(caught.value)


def test_registry_builds_firestore_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    config = Config(
        store=StoreConfig(
            kind="firestore", project="team-deploys", namespace="staging", timeout=3.0
        )
    )

    store = create_store(config)

    assert isinstance(store, FirestoreStore)
    assert store.project == "team-deploys"
    assert store.database == "(default)"
    assert store.namespace == "staging"
    assert store.timeout == 3.0


def test_version_is_same_for_every_timestamp_class() -> None:
    # Regression: rfc3339() of the two DatetimeWithNanoseconds classes formats
    # 48.136270 as "48.13627" or "48.136270", so a lease read back after its
    # grant could carry another version string than the grant returned.
    from_snapshot = ProtoDatetime.from_rfc3339("2026-12-04T20:55:48.13627Z")
    from_field = DatetimeWithNanoseconds(2026, 12, 4, 20, 55, 48, 136270, tzinfo=UTC)  # type: ignore[no-untyped-call]
    plain = datetime(2026, 12, 4, 20, 55, 48, 136270, tzinfo=UTC)

    versions = {version_of(value) for value in (from_snapshot, from_field, plain)}

    assert versions == {"2026-12-04T20:55:48.136270000Z"}


async def test_call_before_open_is_unavailable() -> None:
    store = FirestoreStore("team-deploys")

    with pytest.raises(StoreUnavailable) as caught:
        await store.inspect("api")

    assert "not open" in str(caught.value)
    assert "team-deploys" in str(caught.value)


# --- document layout ---


async def test_documents_use_documented_paths(
    open_store: OpenStore, firestore_namespace: FirestoreNamespace, raw_client: AsyncClient
) -> None:
    store = await open_store()
    lease = await expect_grant(store, ANA, lock="prod:api")
    await store.enqueue("prod:api", "ben@build-7.example:1", owner_of(BEN), Purpose(), TTL)
    root = f"deployd/{firestore_namespace.namespace}"

    lock = await raw_client.document(f"{root}/locks/prod:api").get()
    queue = await raw_client.document(f"{root}/queues/prod:api").get()
    record = await raw_client.document(f"{root}/deployments/prod:api@1").get()

    assert lock.exists
    assert lock.get("name") == "prod:api"
    assert lock.get("holder") == ANA
    assert lock.get("acquisition_id") == lease.acquisition_id
    assert lock.get("token") == 1
    assert lock.get("ttl") == TTL
    assert lock.update_time == _parse_version(lease.version)
    assert queue.exists
    waiters = queue.get("waiters")
    assert list(waiters) == ["ben@build-7.example:1"]
    assert waiters["ben@build-7.example:1"]["waiter_id"] == "ben@build-7.example:1"
    assert record.exists
    assert record.get("session_id") == ANA
    assert record.get("lock") == "prod:api"
    assert record.get("token") == 1


async def test_invalid_lock_name_is_stored_encoded(
    open_store: OpenStore, firestore_namespace: FirestoreNamespace, raw_client: AsyncClient
) -> None:
    store = await open_store()
    await expect_grant(store, ANA, lock="a/b c")
    root = f"deployd/{firestore_namespace.namespace}"

    encoded = await raw_client.document(f"{root}/locks/~YS9iIGM").get()
    listed = [state.lock for state in await store.list_locks()]

    assert encoded.exists
    assert encoded.get("name") == "a/b c"
    assert listed == ["a/b c"]


async def test_renewal_moves_update_time(
    open_store: OpenStore, firestore_namespace: FirestoreNamespace, raw_client: AsyncClient
) -> None:
    store = await open_store()
    lease = await expect_grant(store, ANA)
    reference = raw_client.document(f"deployd/{firestore_namespace.namespace}/locks/api")
    before = await reference.get()

    renewed = await store.renew(lease)
    after = await reference.get()

    assert after.update_time > before.update_time
    assert after.update_time == _parse_version(renewed.version)
    assert after.get("renewal_id") != before.get("renewal_id")


# --- RPC cost ---


async def test_uncontended_acquire_costs_two_rpcs(open_store: OpenStore, proxy: TcpProxy) -> None:
    store = await open_store(emulator_host=proxy.address)

    result, cost = await _measure(store, proxy, store.try_acquire(make_request(ANA)))

    assert isinstance(result, Acquired)
    assert cost == (2, 2)


async def test_rpc_cost_of_each_operation(open_store: OpenStore, proxy: TcpProxy) -> None:
    store = await open_store(emulator_host=proxy.address)
    costs: dict[str, tuple[int, int]] = {}
    lease = await expect_grant(store, ANA)

    _, costs["try_acquire when busy"] = await _measure(
        store, proxy, store.try_acquire(make_request(BEN))
    )
    renewed, costs["renew"] = await _measure(store, proxy, store.renew(lease))
    # The lease from before the renewal no longer matches the version this store wrote.
    renewed, costs["renew of an older lease"] = await _measure(store, proxy, store.renew(lease))
    _, costs["inspect"] = await _measure(store, proxy, store.inspect("api"))
    _, costs["list_locks"] = await _measure(store, proxy, store.list_locks())
    _, costs["history"] = await _measure(store, proxy, store.history("api"))
    _, costs["enqueue"] = await _measure(
        store, proxy, store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    )
    _, costs["dequeue"] = await _measure(store, proxy, store.dequeue("api", "ben-wait"))
    _, costs["release"] = await _measure(
        store, proxy, store.release(renewed, Outcome.from_exit_code(0))
    )
    await expect_grant(store, CARA)
    _, costs["force_unlock"] = await _measure(
        store, proxy, store.force_unlock("api", owner_of(BEN), "stuck")
    )
    _, costs["record_deployment"] = await _measure(
        store, proxy, store.record_deployment(_unlocked_record(DAVE))
    )

    # Each value: (RPCs counted by the store, requests seen by the proxy).
    assert costs == {
        "try_acquire when busy": (1, 1),
        "renew": (1, 1),
        "renew of an older lease": (2, 2),
        "inspect": (1, 1),
        "list_locks": (3, 3),  # locks, queues and freezes
        "history": (1, 1),
        "enqueue": (2, 2),
        "dequeue": (1, 1),
        "release": (1, 1),
        "force_unlock": (2, 2),
        "record_deployment": (2, 2),
    }


# --- a grant from what the store remembers ---


async def _grant_and_release(store: FirestoreStore, holder: str, lock: str = "api") -> None:
    lease = await expect_grant(store, holder, lock)
    assert await store.release(lease, Outcome.from_exit_code(0))


async def test_acquire_after_own_release_costs_one_rpc(
    open_store: OpenStore, proxy: TcpProxy, raw_client: AsyncClient
) -> None:
    store = await open_store(emulator_host=proxy.address)
    await _grant_and_release(store, ANA)

    result, cost = await _measure(store, proxy, store.try_acquire(make_request(BEN)))

    assert cost == (1, 1)
    assert isinstance(result, Acquired)
    assert result.lease.token == 2
    assert [(record.token, record.session_id) for record in await store.history("api")] == [
        (2, BEN),
        (1, ANA),
    ]
    # The commit's checks created no queue or freeze document.
    for collection in ("queues", "freezes"):
        documents = raw_client.collection("deployd", store.namespace, collection)
        assert [snapshot async for snapshot in documents.stream()] == []


async def test_acquire_after_queue_emptied_costs_one_rpc(
    open_store: OpenStore, proxy: TcpProxy, raw_client: AsyncClient
) -> None:
    store = await open_store(emulator_host=proxy.address)
    holder = await expect_grant(store, ANA)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.release(holder, Outcome.from_exit_code(0))
    waiter = await expect_grant(store, BEN, waiter_id="ben-wait")
    await store.release(waiter, Outcome.from_exit_code(0))
    queue = raw_client.document("deployd", store.namespace, "queues", "api")
    before = (await queue.get()).update_time

    result, cost = await _measure(store, proxy, store.try_acquire(make_request(CARA)))

    assert isinstance(result, Acquired)
    assert cost == (1, 1)
    assert result.lease.token == 3
    # The check of the empty queue document left it as it was.
    assert (await queue.get()).update_time == before


async def test_lock_changed_by_other_daemon_is_read_first(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    await _grant_and_release(store, ANA)
    await _grant_and_release(other, BEN)

    first, first_cost = await _measure(store, proxy, store.try_acquire(make_request(CARA)))
    await store.release(first.lease, Outcome.from_exit_code(0))
    second, second_cost = await _measure(store, proxy, store.try_acquire(make_request(DAVE)))

    # The commit on the version this store remembered failed, a read found
    # the lock free at BEN's release, and a commit on that version granted it.
    # The next grant of the shared lock read first.
    assert first_cost == (3, 3)
    assert isinstance(first, Acquired)
    assert first.lease.token == 3
    assert second_cost == (2, 2)
    assert isinstance(second, Acquired)
    assert second.lease.token == 4


async def test_shared_lock_is_remembered_again_after_pause(
    open_store: OpenStore, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(firestore_module, "SHARED_LOCK_PAUSE", 0.0)
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    await _grant_and_release(store, ANA)
    await _grant_and_release(other, BEN)
    await _grant_and_release(store, CARA)

    result, cost = await _measure(store, proxy, store.try_acquire(make_request(DAVE)))

    assert cost == (1, 1)
    assert isinstance(result, Acquired)
    assert result.lease.token == 4


async def test_acquire_after_own_release_finds_holder(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    await _grant_and_release(store, ANA)
    ben = await expect_grant(other, BEN)

    busy, cost = await _measure(store, proxy, store.try_acquire(make_request(CARA)))

    assert cost == (2, 2)
    assert isinstance(busy, Busy)
    assert busy.state.lease is not None
    assert busy.state.lease.holder == BEN
    assert busy.state.lease.token == ben.token
    assert ben.token == 2


async def test_grant_after_read_is_not_remembered_free(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    await _grant_and_release(other, ANA)
    ben = await expect_grant(store, BEN)  # this grant reads, and finds the lock free

    busy, busy_cost = await _measure(store, proxy, store.try_acquire(make_request(CARA)))
    await store.release(ben, Outcome.from_exit_code(0))
    granted, granted_cost = await _measure(store, proxy, store.try_acquire(make_request(DAVE)))

    # A read found BEN's lease: no commit on the version from before BEN's grant.
    assert busy_cost == (1, 1)
    assert isinstance(busy, Busy)
    assert granted_cost == (1, 1)
    assert isinstance(granted, Acquired)
    assert granted.lease.token == 3


async def test_grant_removes_expired_waiter_entries(
    open_store: OpenStore, proxy: TcpProxy, raw_client: AsyncClient
) -> None:
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    await other.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), SHORT_TTL)
    await anyio.sleep(SHORT_TTL + EXPIRY_MARGIN)

    await _grant_and_release(store, CARA)
    granted, cost = await _measure(store, proxy, store.try_acquire(make_request(DAVE)))

    queue = await raw_client.document("deployd", store.namespace, "queues", "api").get()
    assert queue.get("waiters") == {}
    # With the expired entry gone, the lock was quiet again after CARA's release.
    assert cost == (1, 1)
    assert isinstance(granted, Acquired)
    assert granted.lease.token == 2


async def test_grant_keeps_live_waiter_entries(open_store: OpenStore) -> None:
    store = await open_store()
    other = await open_store()
    await other.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), SHORT_TTL)
    await other.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
    await other.enqueue("api", "dave-wait", owner_of(DAVE), Purpose(), TTL)
    await anyio.sleep(SHORT_TTL + EXPIRY_MARGIN)

    granted = await store.try_acquire(make_request(CARA, waiter_id="cara-wait"))
    state = await store.inspect("api")

    assert isinstance(granted, Acquired)
    assert [waiter.waiter_id for waiter in state.waiters] == ["dave-wait"]


async def test_waiter_queued_during_grant_keeps_place(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store()
    other = await open_store()
    holder = await expect_grant(store, ANA)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.release(holder, Outcome.from_exit_code(0))
    grant = store._grant
    queued: list[str] = []

    async def queue_before_commit(*args: Any, **kwargs: Any) -> Acquired:
        # CARA queues on another daemon between BEN's read and BEN's commit.
        if not queued:
            queued.append("cara-wait")
            await other.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
        return await grant(*args, **kwargs)

    monkeypatch.setattr(store, "_grant", queue_before_commit)
    ben = await store.try_acquire(make_request(BEN, waiter_id="ben-wait"))
    assert isinstance(ben, Acquired)
    await store.release(ben.lease, Outcome.from_exit_code(0))

    dave = await store.try_acquire(make_request(DAVE))
    cara = await other.try_acquire(make_request(CARA, waiter_id="cara-wait"))

    assert isinstance(dave, Busy)
    assert dave.queued_ahead == 1
    assert isinstance(cara, Acquired)
    assert cara.lease.token == 3


async def _conflict_at_deadline(
    store: FirestoreStore,
    other: FirestoreStore,
    monkeypatch: pytest.MonkeyPatch,
    on_conflict: Callable[[], None] = lambda: None,
) -> None:
    """Make ``store``'s next grant without a read fail on a conflict at the end of its time.

    ``other`` takes the lock in between, so that ``store``'s memory of it is
    old. ``on_conflict`` runs when the commit has failed.
    """
    await _grant_and_release(store, ANA)
    await _grant_and_release(other, BEN)
    grant = store._grant

    async def conflict_at_deadline(
        request: Any, read: Any, takeover: Any, deadline: float, free: Any = None
    ) -> Acquired:
        try:
            return await grant(request, read, takeover, deadline, free)
        except Exception:
            if free is not None:
                on_conflict()
                await anyio.sleep(max(0.0, deadline - anyio.current_time() - 0.01))
            raise

    monkeypatch.setattr(store, "_grant", conflict_at_deadline)


async def test_lost_race_at_deadline_still_commits(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(timeout=5.0)
    await _conflict_at_deadline(store, await open_store(), monkeypatch)

    result = await store.try_acquire(make_request(CARA))

    assert isinstance(result, Acquired)
    assert result.lease.token == 3


async def test_waiter_grant_ignores_other_heartbeats(
    open_store: OpenStore, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    holder = await expect_grant(store, ANA)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await other.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
    await store.release(holder, Outcome.from_exit_code(0))
    grant = store._grant

    async def heartbeat_before_commit(*args: Any, **kwargs: Any) -> Acquired:
        # CARA's daemon refreshes its entry between BEN's read and BEN's commit.
        await other.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
        return await grant(*args, **kwargs)

    monkeypatch.setattr(store, "_grant", heartbeat_before_commit)
    ben, cost = await _measure(
        store, proxy, store.try_acquire(make_request(BEN, waiter_id="ben-wait"))
    )
    state = await other.inspect("api")

    # One read and one commit: the heartbeat did not fail the commit.
    assert cost == (2, 2)
    assert isinstance(ben, Acquired)
    assert [waiter.waiter_id for waiter in state.waiters] == ["cara-wait"]


def _hold_reads(
    store: FirestoreStore, operation: str, until: anyio.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make ``store``'s reads for ``operation`` return their result only once ``until`` is set."""
    get_documents = store._get_documents

    async def held(references: Any, deadline: float, name: str, lock: str) -> Any:
        snapshots = await get_documents(references, deadline, name, lock)
        if name == operation:
            await until.wait()
        return snapshots

    monkeypatch.setattr(store, "_get_documents", held)


async def _enqueue_during_read(
    store: FirestoreStore,
    operation: str,
    call: Callable[[], Coroutine[Any, Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run ``call``, whose read for ``operation`` returns only after ``store`` queued BEN."""
    enqueued = anyio.Event()
    _hold_reads(store, operation, enqueued, monkeypatch)
    async with anyio.create_task_group() as group:
        group.start_soon(call)
        await anyio.sleep(0.2)
        await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
        enqueued.set()


async def test_overtaken_read_is_not_remembered(
    open_store: OpenStore, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(emulator_host=proxy.address)
    await _grant_and_release(store, ANA)
    # The status read returns only after this daemon queued a waiter.
    await _enqueue_during_read(store, "inspect", lambda: store.inspect("api"), monkeypatch)

    busy, cost = await _measure(store, proxy, store.try_acquire(make_request(CARA)))

    # A read, not a commit on what the overtaken read showed.
    assert cost == (1, 1)
    assert isinstance(busy, Busy)
    assert busy.queued_ahead == 1


async def test_grant_gives_up_within_twice_timeout(
    open_store: OpenStore, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT)
    # The store turns slow just as the commit on the remembered version fails.
    await _conflict_at_deadline(
        store, await open_store(), monkeypatch, lambda: proxy.reply_latency(0.9 * TIMEOUT)
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.try_acquire(make_request(CARA))
    elapsed = time.monotonic() - started
    proxy.reply_latency(0.0)

    # A loose bound: the grant's limit is twice the timeout.
    assert elapsed < 2.5 * TIMEOUT


async def test_grant_overtaken_by_own_enqueue_forgets(
    open_store: OpenStore, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(emulator_host=proxy.address)
    granted: list[Lease] = []

    async def grant_cara() -> None:
        granted.append(await expect_grant(store, CARA))

    # CARA's grant read returns only after this daemon queued BEN.
    await _enqueue_during_read(store, "try_acquire", grant_cara, monkeypatch)
    await store.release(granted[0], Outcome.from_exit_code(0))

    busy, cost = await _measure(store, proxy, store.try_acquire(make_request(DAVE)))

    # A read that finds BEN queued, not a commit on a queue remembered empty.
    assert cost == (1, 1)
    assert isinstance(busy, Busy)
    assert busy.queued_ahead == 1


async def test_race_lost_past_deadline_is_busy(
    open_store: OpenStore, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT)
    other = await open_store()
    grant = store._grant

    async def other_takes_it_first(*args: Any, **kwargs: Any) -> Acquired:
        # BEN's daemon takes the lock between CARA's read and CARA's commit.
        if not (await other.inspect("api")).lease:
            await expect_grant(other, BEN)
        return await grant(*args, **kwargs)

    monkeypatch.setattr(store, "_grant", other_takes_it_first)
    # Slow replies make the read that decides the lost race end after the deadline.
    proxy.reply_latency(0.4 * TIMEOUT)
    try:
        result = await store.try_acquire(make_request(CARA))
    finally:
        proxy.reply_latency(0.0)

    assert isinstance(result, Busy)
    assert result.state.lease is not None
    assert result.state.lease.holder == BEN


async def test_grant_respects_head_waiter_revived_late(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store()
    late = await open_store()
    other = await open_store()
    holder = await expect_grant(store, ANA)
    started = anyio.current_time()
    await late.enqueue("api", "dave-wait", owner_of(DAVE), Purpose(), SHORT_TTL)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await other.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
    await store.release(holder, Outcome.from_exit_code(0))
    write_waiter = late._write_waiter
    grant = store._grant
    revived = anyio.Event()

    async def heartbeat_after_expiry(*args: Any, **kwargs: Any) -> Any:
        # DAVE's daemon read its entry while it was live; the write lands after its expiry.
        await anyio.sleep_until(started + SHORT_TTL + EXPIRY_MARGIN + 0.3)
        try:
            return await write_waiter(*args, **kwargs)
        finally:
            revived.set()

    async def commit_after_revival(*args: Any, **kwargs: Any) -> Acquired:
        await revived.wait()
        return await grant(*args, **kwargs)

    monkeypatch.setattr(late, "_write_waiter", heartbeat_after_expiry)
    monkeypatch.setattr(store, "_grant", commit_after_revival)
    async with anyio.create_task_group() as group:
        await anyio.sleep_until(started + 0.6 * SHORT_TTL)
        group.start_soon(late.enqueue, "api", "dave-wait", owner_of(DAVE), Purpose(), SHORT_TTL)
        # BEN's read finds DAVE's entry expired, so BEN heads the live waiters.
        await anyio.sleep_until(started + SHORT_TTL + EXPIRY_MARGIN)
        result = await store.try_acquire(make_request(BEN, waiter_id="ben-wait"))

    assert isinstance(result, Busy)
    assert [waiter.waiter_id for waiter in result.state.waiters] == [
        "dave-wait",
        "ben-wait",
        "cara-wait",
    ]


async def test_acquire_after_release_respects_new_waiter(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    await _grant_and_release(store, ANA)
    await other.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)

    busy, cost = await _measure(store, proxy, store.try_acquire(make_request(CARA)))
    granted = await other.try_acquire(make_request(BEN, waiter_id="ben-wait"))

    assert cost == (2, 2)
    assert isinstance(busy, Busy)
    assert busy.queued_ahead == 1
    assert isinstance(granted, Acquired)
    assert granted.lease.token == 2


@pytest.mark.parametrize("scope", ["api", "*"], ids=["the lock", "all locks"])
async def test_acquire_after_release_respects_new_freeze(
    open_store: OpenStore, proxy: TcpProxy, scope: str
) -> None:
    store = await open_store(emulator_host=proxy.address)
    other = await open_store()
    await _grant_and_release(store, ANA)
    await other.freeze(scope, "release freeze", owner_of(CARA), None)

    busy, cost = await _measure(store, proxy, store.try_acquire(make_request(BEN)))
    await other.unfreeze(scope)
    granted = await store.try_acquire(make_request(BEN))

    assert cost == (2, 2)
    assert isinstance(busy, Busy)
    assert busy.state.frozen is not None
    assert busy.state.frozen.scope == scope
    assert isinstance(granted, Acquired)
    assert granted.lease.token == 2


async def test_unread_grant_with_lost_reply(
    open_store: OpenStore, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deployd.store.firestore")
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 5)
    observer = await open_store()
    await _grant_and_release(store, ANA)
    request = make_request(BEN)
    proxy.lose_reply(1)  # the commit: no read comes before it

    result = await store.try_acquire(request)

    state = await observer.inspect("api")
    assert proxy.lost_replies == 1
    assert isinstance(result, Acquired)
    assert result.lease.acquisition_id == request.acquisition_id
    assert result.lease.token == 2
    assert state.lease is not None
    assert state.lease.acquisition_id == request.acquisition_id
    assert [record.token for record in await observer.history("api")] == [2, 1]


async def test_renewal_after_unread_grant_costs_one_rpc(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address)
    await _grant_and_release(store, ANA)
    lease = await expect_grant(store, BEN)

    renewed, cost = await _measure(store, proxy, store.renew(lease))
    released, release_cost = await _measure(
        store, proxy, store.release(renewed, Outcome.from_exit_code(0))
    )

    assert cost == (1, 1)
    assert released
    assert release_cost == (1, 1)


# --- expiry by real server time ---


async def test_short_lease_expires_by_server_time(open_store: OpenStore) -> None:
    store = await open_store()
    other = await open_store()
    await expect_grant(store, ANA, ttl=SHORT_TTL)
    await expect_busy(other, BEN)

    await anyio.sleep(SHORT_TTL + EXPIRY_MARGIN)
    state = await other.inspect("api")
    result = await other.try_acquire(make_request(BEN))

    assert state.lease is not None
    assert state.lease.expired
    assert isinstance(result, Acquired)
    assert result.takeover is Takeover.EXPIRED
    assert result.lease.token == 2


async def test_renewals_keep_short_lease(open_store: OpenStore) -> None:
    store = await open_store()
    other = await open_store()
    lease = await expect_grant(store, ANA, ttl=SHORT_TTL)

    for _ in range(8):
        await anyio.sleep(SHORT_TTL / 4)
        lease = await store.renew(lease)
        busy = await expect_busy(other, BEN)
        assert busy.state.held

    await anyio.sleep(SHORT_TTL + EXPIRY_MARGIN)
    ben_lease = await expect_grant(other, BEN)
    assert ben_lease.token == 2


async def test_lease_expiry_uses_holders_ttl(open_store: OpenStore) -> None:
    store = await open_store()
    await expect_grant(store, ANA, lock="long", ttl=SHORT_TTL * 4)
    await expect_grant(store, ANA, lock="short", ttl=SHORT_TTL)

    await anyio.sleep(SHORT_TTL + EXPIRY_MARGIN)
    long_result = await store.try_acquire(make_request(BEN, lock="long", ttl=SHORT_TTL / 2))
    short_result = await store.try_acquire(make_request(BEN, lock="short", ttl=SHORT_TTL * 30))

    assert not isinstance(long_result, Acquired)
    assert isinstance(short_result, Acquired)
    assert short_result.takeover is Takeover.EXPIRED


async def test_short_waiter_entry_expires(open_store: OpenStore) -> None:
    store = await open_store()
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), SHORT_TTL)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)

    before = await store.inspect("api")
    await anyio.sleep(SHORT_TTL + EXPIRY_MARGIN)
    after = await store.inspect("api")

    assert [waiter.waiter_id for waiter in before.waiters] == ["ben-wait", "cara-wait"]
    assert [waiter.waiter_id for waiter in after.waiters] == ["cara-wait"]


# --- clock skew ---


async def test_skewed_workstations_agree_on_holder(open_store: OpenStore) -> None:
    ahead = await open_store(wall=lambda: time.time() + 600)
    behind = await open_store(wall=lambda: time.time() - 600)

    lease = await expect_grant(ahead, ANA)
    seen_behind = await behind.inspect("api")
    busy = await expect_busy(behind, BEN)
    renewed = await ahead.renew(lease)
    await ahead.release(renewed, Outcome.from_exit_code(0))
    ben = await expect_grant(behind, BEN)
    seen_ahead = await ahead.inspect("api")

    assert seen_behind.lease is not None
    assert seen_behind.lease.holder == ANA
    assert 0 < seen_behind.lease.expires_in <= TTL
    assert abs(seen_behind.lease.acquired_at - lease.acquired_at) < 0.001
    assert busy.state.held
    assert ben.token == 2
    assert seen_ahead.lease is not None
    assert seen_ahead.lease.holder == BEN
    assert 0 < seen_ahead.lease.expires_in <= TTL


async def test_server_time_shows_clock_offset(open_store: OpenStore) -> None:
    ahead = await open_store(wall=lambda: time.time() + 600)
    assert ahead.server_time() is None

    await ahead.inspect("api")
    sample = ahead.server_time()

    assert sample is not None
    assert abs(sample.offset + 600) < 5


# --- writes whose replies are lost ---


async def test_grant_with_lost_reply_is_granted(
    open_store: OpenStore, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deployd.store.firestore")
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 5)
    observer = await open_store()
    request = make_request(ANA)
    proxy.lose_reply(2)  # the read of the lock, then the commit

    result = await store.try_acquire(request)

    state = await observer.inspect("api")
    assert proxy.lost_replies == 1
    assert isinstance(result, Acquired)
    assert result.lease.token == 1
    assert result.lease.acquisition_id == request.acquisition_id
    assert state.lease is not None
    assert state.lease.acquisition_id == request.acquisition_id
    assert state.token == 1
    assert len(await observer.history("api")) == 1
    assert "had applied before the error" in caplog.text


async def test_takeover_with_lost_reply_is_granted(
    open_store: OpenStore, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deployd.store.firestore")
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 5)
    observer = await open_store()
    first = await expect_grant(observer, ANA)
    await observer.release(first, Outcome.from_exit_code(0))
    proxy.lose_reply(2)

    result = await store.try_acquire(make_request(BEN))

    state = await observer.inspect("api")
    assert proxy.lost_replies == 1
    assert isinstance(result, Acquired)
    assert result.lease.token == 2
    assert state.token == 2
    assert state.lease is not None
    assert state.lease.holder == BEN
    assert [record.token for record in await observer.history("api")] == [2, 1]
    assert "had applied before the error" in caplog.text


async def test_grant_retried_after_outage(open_store: OpenStore, proxy: TcpProxy) -> None:
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT)
    observer = await open_store()
    request = make_request(ANA)
    proxy.lose_reply(2, then_blackhole=True)

    with pytest.raises(StoreUnavailable):
        await store.try_acquire(request)
    proxy.blackhole(False)
    retried = await _until_available(lambda: store.try_acquire(request))

    assert isinstance(retried, Acquired)
    assert retried.lease.token == 1
    assert retried.lease.acquisition_id == request.acquisition_id
    assert (await observer.inspect("api")).token == 1
    assert len(await observer.history("api")) == 1


async def test_renewal_with_lost_reply_is_renewed(
    open_store: OpenStore, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deployd.store.firestore")
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 5)
    observer = await open_store()
    lease = await expect_grant(store, ANA)
    proxy.lose_reply(1)

    renewed = await store.renew(lease)

    state = await observer.inspect("api")
    assert proxy.lost_replies == 1
    assert renewed.version != lease.version
    assert renewed.token == lease.token
    assert state.lease is not None
    assert state.lease.version == renewed.version
    assert "renewal of lock api" in caplog.text
    assert "had applied before the error" in caplog.text


async def test_release_with_lost_reply_returns_true(
    open_store: OpenStore, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deployd.store.firestore")
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 5)
    observer = await open_store()
    lease = await expect_grant(store, ANA)
    proxy.lose_reply(1)

    released = await store.release(lease, Outcome.from_exit_code(0))

    state = await observer.inspect("api")
    [record] = await observer.history("api")
    assert proxy.lost_replies == 1
    assert released is True
    assert state.lease is None
    assert state.token == 1
    assert record.outcome == "succeeded"
    assert "release of lock api" in caplog.text
    assert "had applied before the error" in caplog.text


async def test_force_unlock_with_lost_reply_forces_once(
    open_store: OpenStore, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deployd.store.firestore")
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 5)
    observer = await open_store()
    lease = await expect_grant(observer, ANA)
    proxy.lose_reply(2)  # the read of the lock, then the commit

    before = await store.force_unlock("api", owner_of(BEN), "stuck")

    after = await observer.inspect("api")
    [record] = await observer.history("api")
    assert proxy.lost_replies == 1
    assert before.lease is not None
    assert before.lease.holder == ANA
    assert after.lease is None
    assert after.token == lease.token + 1
    assert after.forced is not None
    assert after.forced.token == lease.token + 1
    assert record.outcome == "forced"
    assert "force-unlock of lock api" in caplog.text
    assert "had applied before the error" in caplog.text


async def test_record_with_lost_reply_is_written_once(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 5)
    observer = await open_store()
    record = _unlocked_record(ANA)
    proxy.lose_reply(2)  # the query for an earlier record, then the create

    await store.record_deployment(record)
    await store.record_deployment(record)

    [stored] = await observer.history("api")
    assert proxy.lost_replies == 1
    assert stored.session_id == ANA
    assert stored.started_at == record.started_at
    assert stored.finished_at == record.finished_at


# --- deadlines ---


async def test_blackholed_store_fails_each_call_within_deadline(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT)
    lease = await expect_grant(store, ANA)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await _grant_and_release(store, DAVE, lock="ops")
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "try_acquire": lambda: store.try_acquire(make_request(BEN, lock="web")),
        "try_acquire without a read": lambda: store.try_acquire(make_request(BEN, lock="ops")),
        "renew": lambda: store.renew(lease),
        "release": lambda: store.release(lease, Outcome.from_exit_code(0)),
        "inspect": lambda: store.inspect("api"),
        "list_locks": lambda: store.list_locks(),
        "history": lambda: store.history("api"),
        "enqueue": lambda: store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL),
        "dequeue": lambda: store.dequeue("api", "ben-wait"),
        "force_unlock": lambda: store.force_unlock("api", owner_of(BEN), "stuck"),
        "record_deployment": lambda: store.record_deployment(_unlocked_record(CARA)),
    }
    proxy.blackhole()

    outcomes: dict[str, str] = {}
    for name, call in calls.items():
        started = time.monotonic()
        try:
            await call()
        except StoreUnavailable as exc:
            outcome = "unavailable" if "no reply within" in str(exc) else f"other message: {exc}"
        else:
            outcome = "returned"
        elapsed = time.monotonic() - started
        outcomes[name] = outcome if elapsed < 3 * TIMEOUT else f"took {elapsed:.1f}s"

    assert outcomes == dict.fromkeys(calls, "unavailable")
    proxy.blackhole(False)
    state = await _until_available(lambda: store.inspect("api"), within=10)
    assert state.lease is not None
    assert state.lease.holder == ANA


async def test_slow_replies_within_deadline_succeed(open_store: OpenStore, proxy: TcpProxy) -> None:
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT * 3)
    proxy.delay_replies(0.2)

    lease = await expect_grant(store, ANA)
    renewed = await store.renew(lease)
    released = await store.release(renewed, Outcome.from_exit_code(0))

    assert released is True


async def test_reply_later_than_deadline_is_unavailable(
    open_store: OpenStore, proxy: TcpProxy
) -> None:
    store = await open_store(emulator_host=proxy.address, timeout=TIMEOUT)
    proxy.delay_replies(TIMEOUT * 1.5)

    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.inspect("api")

    assert time.monotonic() - started < 3 * TIMEOUT


# --- emulator stopped and restarted ---


async def test_store_works_again_after_emulator_restart(open_store: OpenStore) -> None:
    emulator = FirestoreEmulator()
    await anyio.to_thread.run_sync(emulator.start)
    try:
        store = await open_store(emulator_host=emulator.host, timeout=TIMEOUT)
        lease = await expect_grant(store, ANA)
        await anyio.to_thread.run_sync(emulator.stop)

        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.renew(lease)
        failed_after = time.monotonic() - started
        await anyio.to_thread.run_sync(emulator.start)
        state = await _until_available(lambda: store.inspect("api"))

        # The restarted emulator starts with no documents.
        assert failed_after < 3 * TIMEOUT
        assert emulator.host in str(caught.value)
        assert state.lease is None
        with pytest.raises(LeaseLost):
            await store.renew(lease)
        again = await expect_grant(store, BEN)
        assert again.token == 1
    finally:
        await anyio.to_thread.run_sync(emulator.stop)
        emulator.remove_logs()
