"""The lease store contract, run against every store kind.

Each test gets a fresh, open ``store`` and a ``clock`` that it moves by hand,
so expiry is tested exactly and without sleeping. To add a store kind, add it
to STORE_KINDS and teach ``_build_store`` to build it on the test's clock. A
kind whose expiry follows another clock (Firestore judges it by server time)
must map ``clock.advance`` onto that clock, and a kind without boot ids lists
itself outside MACHINE_CLOCK_KINDS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest_store import (
    TTL,
    FakeClock,
    expect_busy,
    expect_grant,
    make_request,
    owner_of,
    session_id,
)
from firestore_emulator import FirestoreNamespace, ManualServerClock

from deployd.errors import LeaseLost
from deployd.models import (
    ALL_LOCKS,
    Acquired,
    Busy,
    Deployment,
    Outcome,
    OutcomeStatus,
    Purpose,
    Takeover,
)
from deployd.stores.base import LeaseStore
from deployd.stores.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

STORE_KINDS = ["sqlite", "firestore"]
# Kinds that judge expiry by a machine clock tagged with a boot id.
MACHINE_CLOCK_KINDS = {"sqlite"}

ANA = session_id("ana")
BEN = session_id("ben")
CARA = session_id("cara")
DAVE = session_id("dave")
ERIN = session_id("erin")

OpenStore = Callable[[], Awaitable[LeaseStore]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def _build_store(
    kind: str, tmp_path: Path, clock: FakeClock, request: pytest.FixtureRequest
) -> LeaseStore:
    if kind == "sqlite":
        return SQLiteStore(str(tmp_path / "locks.sqlite3"), clock=clock, wall=clock.wall)
    if kind == "firestore":
        # The emulator starts only when a Firestore test runs.
        namespace: FirestoreNamespace = request.getfixturevalue("firestore_namespace")
        return namespace.build_store(server_clock=ManualServerClock.attached_to(clock))
    raise AssertionError(f"no test setup for store kind {kind!r}")


@pytest.fixture
async def open_store(
    store_kind: str,
    tmp_path: Path,
    clock: FakeClock,
    request: pytest.FixtureRequest,
    ignore_closed_loop_callbacks: None,
) -> AsyncIterator[OpenStore]:
    """Yield a function that opens one more store object on the same data.

    A second object acts as a restarted daemon or as another daemon on the machine.
    """
    opened: list[LeaseStore] = []

    async def open_new() -> LeaseStore:
        store = _build_store(store_kind, tmp_path, clock, request)
        await store.open()
        opened.append(store)
        return store

    yield open_new

    for store in opened:
        await store.aclose()


@pytest.fixture
async def store(open_store: OpenStore) -> LeaseStore:
    return await open_store()


# --- grants and busy locks ---


async def test_grant_new_lock_gets_token_one(store: LeaseStore) -> None:
    request = make_request(ANA)

    result = await store.try_acquire(request)

    assert isinstance(result, Acquired)
    assert result.lease.token == 1
    assert result.lease.holder == ANA
    assert result.lease.acquisition_id == request.acquisition_id
    assert result.lease.owner == request.owner
    assert result.lease.purpose == request.purpose
    assert result.lease.ttl == TTL
    assert 0 < result.lease.expires_in <= TTL
    assert result.takeover is Takeover.FREE
    assert result.previous is None


async def test_held_lock_is_busy_with_holder(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)

    busy = await expect_busy(store, BEN)

    assert busy.state.lock == "api"
    assert busy.state.held
    assert busy.state.token == 1
    assert busy.state.lease is not None
    assert busy.state.lease.holder == ANA
    assert busy.state.lease.owner == lease.owner
    assert busy.queued_ahead == 0


async def test_inspect_shows_lease(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(10)

    state = await store.inspect("api")

    assert state.held
    assert state.token == 1
    assert state.lease is not None
    assert state.lease.holder == ANA
    assert state.lease.purpose == lease.purpose
    assert state.lease.expires_in < lease.expires_in
    assert state.lease.expires_in > 0


async def test_inspect_unknown_lock_is_free(store: LeaseStore) -> None:
    state = await store.inspect("never-used")

    assert state.lock == "never-used"
    assert state.token == 0
    assert state.lease is None
    assert state.waiters == ()
    assert not state.held


async def test_retried_acquisition_returns_same_lease(store: LeaseStore) -> None:
    request = make_request(ANA)
    first = await store.try_acquire(request)

    second = await store.try_acquire(request)

    assert isinstance(first, Acquired)
    assert isinstance(second, Acquired)
    assert second.lease.token == first.lease.token
    assert second.lease.acquisition_id == request.acquisition_id
    assert second.lease.version == first.lease.version
    assert (await store.inspect("api")).token == 1
    assert len(await store.history("api")) == 1


# --- fencing tokens ---


async def test_token_grows_after_release(store: LeaseStore) -> None:
    first = await expect_grant(store, ANA)
    await store.release(first, Outcome.from_exit_code(0))

    second = await expect_grant(store, BEN)

    assert second.token == 2


async def test_token_grows_after_expiry_takeover(store: LeaseStore, clock: FakeClock) -> None:
    await expect_grant(store, ANA)
    clock.advance(TTL + 1)

    second = await expect_grant(store, BEN)

    assert second.token == 2


async def test_token_grows_after_force(store: LeaseStore) -> None:
    await expect_grant(store, ANA)

    second = await expect_grant(store, BEN, force=True, force_reason="ana's deploy hangs")

    assert second.token == 2


async def test_token_survives_reopen(store: LeaseStore, open_store: OpenStore) -> None:
    first = await expect_grant(store, ANA)
    await store.release(first, Outcome.from_exit_code(0))
    await store.aclose()

    reopened = await open_store()
    second = await expect_grant(reopened, BEN)

    assert (await reopened.inspect("api")).token == 2
    assert second.token == 2


async def test_tokens_increase_across_every_path(
    store: LeaseStore, open_store: OpenStore, clock: FakeClock
) -> None:
    tokens = []
    lease = await expect_grant(store, ANA)
    tokens.append(lease.token)
    await store.release(lease, Outcome.from_exit_code(0))

    lease = await expect_grant(store, BEN)
    tokens.append(lease.token)
    clock.advance(TTL + 1)

    lease = await expect_grant(store, CARA)
    tokens.append(lease.token)
    await store.aclose()

    store = await open_store()
    lease = await expect_grant(store, DAVE, force=True, force_reason="cara's deploy hangs")
    tokens.append(lease.token)
    await store.release(lease, Outcome.from_exit_code(1))

    lease = await expect_grant(store, ERIN)
    tokens.append(lease.token)

    assert tokens == [1, 2, 3, 4, 5]


# --- renewal ---


async def test_renew_extends_and_changes_version(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(10)
    before = await store.inspect("api")

    renewed = await store.renew(lease)
    after = await store.inspect("api")

    assert before.lease is not None
    assert after.lease is not None
    assert renewed.version != lease.version
    assert after.lease.version == renewed.version
    assert after.lease.expires_in > before.lease.expires_in
    assert renewed.expires_in > before.lease.expires_in
    assert renewed.token == lease.token
    assert renewed.acquired_at == lease.acquired_at
    assert renewed.holder == ANA


async def test_renew_twice_changes_version_each_time(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)

    first = await store.renew(lease)
    second = await store.renew(first)

    assert len({lease.version, first.version, second.version}) == 3


async def test_renew_after_takeover_raises_lease_lost(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(TTL + 1)
    ben_lease = await expect_grant(store, BEN)

    with pytest.raises(LeaseLost) as caught:
        await store.renew(lease)

    assert caught.value.lock == "api"
    assert caught.value.new_holder is not None
    assert caught.value.new_holder.holder == BEN
    assert BEN in str(caught.value)
    assert "api" in str(caught.value)
    state = await store.inspect("api")
    assert state.lease is not None
    assert state.lease.holder == BEN
    assert state.lease.version == ben_lease.version
    assert state.lease.expires_in == ben_lease.expires_in


async def test_renew_after_force_raises_lease_lost(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await expect_grant(store, BEN, force=True, force_reason="ana's deploy hangs")

    with pytest.raises(LeaseLost) as caught:
        await store.renew(lease)

    assert caught.value.new_holder is not None
    assert caught.value.new_holder.holder == BEN


async def test_renew_after_release_raises_lease_lost(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.release(lease, Outcome.from_exit_code(0))

    with pytest.raises(LeaseLost) as caught:
        await store.renew(lease)

    assert caught.value.current is not None
    assert caught.value.current.lease is None
    assert caught.value.new_holder is None
    assert (await store.inspect("api")).lease is None


async def test_renew_with_other_acquisition_id_raises(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    stranger = dataclasses.replace(lease, acquisition_id="not-this-grant")

    with pytest.raises(LeaseLost):
        await store.renew(stranger)


async def test_renew_untaken_expired_lease(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(TTL + 1)
    assert (await store.inspect("api")).held is False

    renewed = await store.renew(lease)

    assert renewed.expires_in > 0
    assert renewed.token == lease.token
    assert (await store.inspect("api")).held
    await expect_busy(store, BEN)


# --- release ---


async def test_release_frees_lock_and_keeps_token(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)

    released = await store.release(lease, Outcome.from_exit_code(0))

    state = await store.inspect("api")
    assert released is True
    assert state.lease is None
    assert not state.held
    assert state.token == 1


async def test_release_by_non_holder_returns_false(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    other = dataclasses.replace(lease, holder=BEN, acquisition_id="ben-grant")

    released = await store.release(other, Outcome.from_exit_code(0))

    state = await store.inspect("api")
    assert released is False
    assert state.lease is not None
    assert state.lease.holder == ANA
    assert state.lease.version == lease.version
    history = await store.history("api")
    assert history[0].finished_at is None


async def test_release_twice_returns_false(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.release(lease, Outcome.from_exit_code(0))

    released = await store.release(lease, Outcome.from_exit_code(1))

    history = await store.history("api")
    assert released is False
    assert history[0].outcome == "succeeded"
    assert history[0].exit_code == 0


async def test_release_after_takeover_returns_false(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(TTL + 1)
    await expect_grant(store, BEN)

    released = await store.release(lease, Outcome.from_exit_code(0))

    state = await store.inspect("api")
    assert released is False
    assert state.lease is not None
    assert state.lease.holder == BEN


async def test_release_untaken_expired_lease(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(TTL + 1)

    released = await store.release(lease, Outcome.from_exit_code(0))

    assert released is True
    assert (await store.inspect("api")).lease is None


# --- release together with the next grant ---


async def test_release_and_acquire_passes_lock_on(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)

    released, result = await store.release_and_acquire(
        lease, Outcome.from_exit_code(0), make_request(BEN)
    )

    assert released is True
    assert isinstance(result, Acquired)
    assert result.lease.holder == BEN
    assert result.lease.token == lease.token + 1
    assert result.takeover is Takeover.FREE
    assert result.previous is None
    history = await store.history("api")
    assert [record.session_id for record in history] == [BEN, ANA]
    assert history[0].finished_at is None
    assert history[1].outcome == "succeeded"


async def test_release_and_acquire_serves_store_queue_first(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)

    released, result = await store.release_and_acquire(
        lease, Outcome.from_exit_code(0), make_request(BEN)
    )

    assert released is True
    assert isinstance(result, Busy)
    assert result.queued_ahead == 1
    assert result.state.lease is None


async def test_release_and_acquire_leaves_new_holder(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(TTL + 1)
    await expect_grant(store, CARA)

    released, result = await store.release_and_acquire(
        lease, Outcome.from_exit_code(0), make_request(BEN)
    )

    assert released is False
    assert isinstance(result, Busy)
    assert result.state.lease is not None
    assert result.state.lease.holder == CARA


async def test_release_and_acquire_respects_freeze(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.freeze("api", "release freeze", owner_of(CARA), None)

    released, result = await store.release_and_acquire(
        lease, Outcome.from_exit_code(0), make_request(BEN)
    )

    assert released is True
    assert isinstance(result, Busy)
    assert result.state.frozen is not None
    assert (await store.inspect("api")).lease is None


# --- takeovers ---


async def test_expired_lease_is_taken_over(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(TTL + 1)

    result = await store.try_acquire(make_request(BEN))

    assert isinstance(result, Acquired)
    assert result.takeover is Takeover.EXPIRED
    assert result.previous is not None
    assert result.previous.holder == ANA
    assert result.previous.token == lease.token
    assert result.previous.expired
    assert result.lease.holder == BEN
    history = await store.history("api")
    assert [record.session_id for record in history] == [BEN, ANA]
    assert history[0].takeover == "expired"
    assert history[1].outcome == "expired"
    assert history[1].finished_at is not None
    assert history[1].detail is not None
    assert BEN in history[1].detail


async def test_lease_expires_exactly_at_ttl(store: LeaseStore, clock: FakeClock) -> None:
    await expect_grant(store, ANA)
    clock.advance(TTL - 1)
    await expect_busy(store, BEN)

    clock.advance(1)
    lease = await expect_grant(store, BEN)

    assert lease.token == 2


async def test_force_takes_live_lease(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    request = make_request(BEN, force=True, force_reason="ana's deploy hangs")

    result = await store.try_acquire(request)

    assert isinstance(result, Acquired)
    assert result.takeover is Takeover.FORCED
    assert result.previous is not None
    assert result.previous.holder == ANA
    assert result.previous.token == lease.token
    assert not result.previous.expired
    assert result.lease.holder == BEN
    history = await store.history("api")
    assert history[0].session_id == BEN
    assert history[0].takeover == "forced"
    assert history[1].session_id == ANA
    assert history[1].outcome == "forced"
    assert history[1].detail is not None
    assert BEN in history[1].detail
    assert "ana's deploy hangs" in history[1].detail


async def test_force_on_free_lock_is_plain_grant(store: LeaseStore) -> None:
    result = await store.try_acquire(make_request(ANA, force=True, force_reason="testing"))

    assert isinstance(result, Acquired)
    assert result.takeover is Takeover.FREE
    assert result.previous is None


async def test_force_on_expired_lease_reports_expired(store: LeaseStore, clock: FakeClock) -> None:
    await expect_grant(store, ANA)
    clock.advance(TTL + 1)

    result = await store.try_acquire(make_request(BEN, force=True, force_reason="stale"))

    assert isinstance(result, Acquired)
    assert result.takeover is Takeover.EXPIRED


async def test_boot_change_expires_lease(
    store: LeaseStore, clock: FakeClock, store_kind: str
) -> None:
    if store_kind not in MACHINE_CLOCK_KINDS:
        pytest.skip(f"the {store_kind} store does not judge expiry by a machine clock")
    await expect_grant(store, ANA)

    clock.reboot()
    state = await store.inspect("api")
    result = await store.try_acquire(make_request(BEN))

    assert state.lease is not None
    assert state.lease.expired
    assert not state.held
    assert isinstance(result, Acquired)
    assert result.takeover is Takeover.EXPIRED
    assert result.lease.token == 2


# --- waiters, first come first served ---


async def test_first_live_waiter_gets_free_lock(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
    await store.release(lease, Outcome.from_exit_code(0))

    cara = await expect_busy(store, CARA, waiter_id="cara-wait")
    dave = await expect_busy(store, DAVE)
    ben = await expect_grant(store, BEN, waiter_id="ben-wait")

    assert cara.queued_ahead == 1
    assert cara.state.lease is None
    assert dave.queued_ahead == 2
    assert ben.token == 2


async def test_busy_while_held_counts_waiters_ahead(store: LeaseStore) -> None:
    await expect_grant(store, ANA)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)

    ben = await expect_busy(store, BEN, waiter_id="ben-wait")
    cara = await expect_busy(store, CARA, waiter_id="cara-wait")

    assert ben.queued_ahead == 0
    assert cara.queued_ahead == 1
    assert [waiter.waiter_id for waiter in cara.state.waiters] == ["ben-wait", "cara-wait"]


async def test_grant_removes_waiter_entry(store: LeaseStore) -> None:
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)

    await expect_grant(store, BEN, waiter_id="ben-wait")

    state = await store.inspect("api")
    assert [waiter.waiter_id for waiter in state.waiters] == ["cara-wait"]


async def test_expired_waiter_entry_is_ignored(store: LeaseStore, clock: FakeClock) -> None:
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), 5.0)
    clock.advance(6)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)

    state = await store.inspect("api")
    cara = await expect_grant(store, CARA, waiter_id="cara-wait")

    assert [waiter.waiter_id for waiter in state.waiters] == ["cara-wait"]
    assert cara.token == 1


async def test_expired_waiter_rejoins_at_back(store: LeaseStore, clock: FakeClock) -> None:
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), 5.0)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
    clock.advance(6)

    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)

    state = await store.inspect("api")
    assert [waiter.waiter_id for waiter in state.waiters] == ["cara-wait", "ben-wait"]


async def test_enqueue_refresh_extends_entry(store: LeaseStore, clock: FakeClock) -> None:
    first = await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)
    clock.advance(TTL - 5)

    refreshed = await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    clock.advance(10)
    state = await store.inspect("api")

    assert refreshed.enqueued_at == first.enqueued_at
    assert refreshed.expires_in == TTL
    # cara did not refresh her entry, so it has expired; ben's refreshed one is live.
    assert [waiter.waiter_id for waiter in state.waiters] == ["ben-wait"]
    assert state.waiters[0].expires_in == TTL - 10


async def test_enqueue_refresh_keeps_order(store: LeaseStore) -> None:
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)

    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)
    await store.enqueue("api", "cara-wait", owner_of(CARA), Purpose(), TTL)

    state = await store.inspect("api")
    assert [waiter.waiter_id for waiter in state.waiters] == ["ben-wait", "cara-wait"]


async def test_enqueue_returns_waiter(store: LeaseStore) -> None:
    purpose = Purpose(commit="abc1234", reason="hotfix")

    waiter = await store.enqueue("api", "ben-wait", owner_of(BEN), purpose, TTL)

    assert waiter.lock == "api"
    assert waiter.waiter_id == "ben-wait"
    assert waiter.owner == owner_of(BEN)
    assert waiter.purpose == purpose
    assert waiter.expires_in == TTL


async def test_dequeue_is_idempotent(store: LeaseStore) -> None:
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)

    await store.dequeue("api", "ben-wait")
    await store.dequeue("api", "ben-wait")
    await store.dequeue("api", "never-queued")
    await store.dequeue("never-used", "ben-wait")

    assert (await store.inspect("api")).waiters == ()
    await expect_grant(store, CARA)


async def test_force_skips_queue(store: LeaseStore) -> None:
    await expect_grant(store, ANA)
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)

    result = await store.try_acquire(
        make_request(DAVE, force=True, force_reason="hotfix for an outage")
    )

    assert isinstance(result, Acquired)
    assert result.takeover is Takeover.FORCED
    state = await store.inspect("api")
    assert [waiter.waiter_id for waiter in state.waiters] == ["ben-wait"]


async def test_waiters_are_kept_per_lock(store: LeaseStore) -> None:
    await store.enqueue("api", "ben-wait", owner_of(BEN), Purpose(), TTL)

    lease = await expect_grant(store, CARA, lock="web")

    assert lease.token == 1
    assert (await store.inspect("web")).waiters == ()


# --- history ---


async def test_history_records_outcomes_newest_first(store: LeaseStore, clock: FakeClock) -> None:
    ana = await expect_grant(store, ANA)
    await store.release(ana, Outcome.from_exit_code(0, revision="api-00041-abc"))
    ben = await expect_grant(store, BEN)
    await store.release(ben, Outcome.from_exit_code(3))
    await expect_grant(store, CARA)
    clock.advance(TTL + 1)
    await expect_grant(store, DAVE)
    await expect_grant(store, ERIN, force=True, force_reason="dave's deploy hangs")

    history = await store.history()

    assert [record.session_id for record in history] == [ERIN, DAVE, CARA, BEN, ANA]
    assert [record.token for record in history] == [5, 4, 3, 2, 1]
    assert [record.outcome for record in history] == [
        None,
        "forced",
        "expired",
        "failed",
        "succeeded",
    ]
    assert [record.exit_code for record in history] == [None, None, None, 3, 0]
    assert history[4].revision == "api-00041-abc"
    assert history[0].finished_at is None
    assert all(record.finished_at is not None for record in history[1:])


async def test_history_records_grant_details(store: LeaseStore) -> None:
    request = make_request(ANA, waited=12.5, purpose=Purpose(commit="abc1234", reason="fix"))
    await store.try_acquire(request)

    [record] = await store.history()

    assert record.session_id == ANA
    assert record.lock == "api"
    assert record.token == 1
    assert record.owner == request.owner
    assert record.purpose == request.purpose
    assert record.waited == 12.5
    assert record.takeover == "free"
    assert record.degraded is False
    assert record.duration is None


async def test_history_records_release_outcome(store: LeaseStore, clock: FakeClock) -> None:
    lease = await expect_grant(store, ANA)
    clock.advance(42)
    outcome = Outcome(OutcomeStatus.RELEASED, revision="api-00042-xyz", detail="released by hand")

    await store.release(lease, outcome)

    [record] = await store.history("api")
    assert record.outcome == "released"
    assert record.exit_code is None
    assert record.revision == "api-00042-xyz"
    assert record.detail == "released by hand"
    assert record.duration is not None
    assert record.duration > 0


async def test_history_filters_by_lock(store: LeaseStore) -> None:
    await expect_grant(store, ANA, lock="api")
    await expect_grant(store, BEN, lock="web")
    await expect_grant(store, CARA, lock="db")

    history = await store.history("web")

    assert [record.session_id for record in history] == [BEN]


async def test_history_filters_by_since(store: LeaseStore, clock: FakeClock) -> None:
    await expect_grant(store, ANA, lock="api")
    clock.advance(100)
    await expect_grant(store, BEN, lock="web")
    newest = (await store.history())[0]

    history = await store.history(since=newest.started_at)

    assert [record.session_id for record in history] == [BEN]


async def test_history_limit_keeps_newest(store: LeaseStore) -> None:
    for lock in ("api", "web", "db"):
        await expect_grant(store, session_id(lock), lock=lock)

    history = await store.history(limit=2)

    assert [record.lock for record in history] == ["db", "web"]
    assert await store.history(limit=0) == []


# --- listing and lock names ---


async def test_list_locks_in_name_order(store: LeaseStore) -> None:
    await expect_grant(store, ANA, lock="web")
    await expect_grant(store, BEN, lock="api")
    db_lease = await expect_grant(store, CARA, lock="db:prod")
    await store.release(db_lease, Outcome.from_exit_code(0))
    await store.enqueue("queue-only", "dave-wait", owner_of(DAVE), Purpose(), TTL)

    states = await store.list_locks()

    assert [state.lock for state in states] == ["api", "db:prod", "queue-only", "web"]
    assert [state.held for state in states] == [True, False, False, True]
    assert states[1].token == 1
    assert states[1].lease is None
    assert states[2].token == 0
    assert [waiter.waiter_id for waiter in states[2].waiters] == ["dave-wait"]


async def test_list_locks_empty_store(store: LeaseStore) -> None:
    assert await store.list_locks() == []


@pytest.mark.parametrize(
    "lock",
    [
        "it's",
        'say "api"',
        "api'; DROP TABLE locks; --",
        "x' OR '1'='1",
        "%s %d ?1 :lock",
        "ünïcode/../../etc",
    ],
)
async def test_unusual_lock_names_are_bound_safely(store: LeaseStore, lock: str) -> None:
    other = await expect_grant(store, ANA, lock="api")

    lease = await expect_grant(store, BEN, lock=lock)
    busy = await expect_busy(store, CARA, lock=lock)
    await store.enqueue(lock, "dave-wait", owner_of(DAVE), Purpose(), TTL)
    renewed = await store.renew(lease)
    released = await store.release(renewed, Outcome.from_exit_code(0))

    assert busy.state.lock == lock
    assert released is True
    assert [record.lock for record in await store.history(lock)] == [lock]
    assert (await store.inspect(lock)).token == 1
    assert sorted(state.lock for state in await store.list_locks()) == sorted(["api", lock])
    state = await store.inspect("api")
    assert state.lease is not None
    assert state.lease.version == other.version
    assert state.waiters == ()


# --- force-unlock, force records, unlocked deploys ---


async def test_force_unlock_frees_live_lock(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    forcer = owner_of(BEN)

    before = await store.force_unlock("api", forcer, "ana's deploy hangs")

    assert before.lease is not None
    assert before.lease.holder == ANA
    after = await store.inspect("api")
    assert after.lease is None
    assert after.token == lease.token + 1
    assert after.forced is not None
    assert after.forced.by == f"{forcer.user}@{forcer.host}"
    assert after.forced.reason == "ana's deploy hangs"
    assert after.forced.token == lease.token + 1


async def test_force_unlock_records_forced_outcome(store: LeaseStore) -> None:
    await expect_grant(store, ANA)

    await store.force_unlock("api", owner_of(BEN), "stuck")

    [record] = await store.history("api")
    assert record.outcome == "forced"
    assert record.finished_at is not None
    assert record.detail is not None
    assert "stuck" in record.detail


async def test_force_unlock_makes_renewal_name_forcer(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.force_unlock("api", owner_of(BEN), "stuck deploy")

    with pytest.raises(LeaseLost) as raised:
        await store.renew(lease)

    message = str(raised.value)
    assert "forced away by ben@build-7" in message
    assert "stuck deploy" in message


async def test_force_unlock_then_release_returns_false(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.force_unlock("api", owner_of(BEN), "stuck")

    assert await store.release(lease, Outcome.from_exit_code(0)) is False


async def test_force_unlock_free_lock_changes_nothing(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.release(lease, Outcome.from_exit_code(0))

    before = await store.force_unlock("api", owner_of(BEN), "just in case")

    assert before.lease is None
    after = await store.inspect("api")
    assert after.token == lease.token
    assert after.forced is None


async def test_force_unlock_then_grant_gets_next_token(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.force_unlock("api", owner_of(BEN), "stuck")

    next_lease = await expect_grant(store, CARA)

    assert next_lease.token == lease.token + 2


async def test_forced_grant_records_forcer(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.try_acquire(make_request(BEN, force=True, force_reason="hotfix"))

    state = await store.inspect("api")

    assert state.forced is not None
    assert state.forced.by.startswith("ben@")
    assert state.forced.reason == "hotfix"
    with pytest.raises(LeaseLost, match="forced away by ben@"):
        await store.renew(lease)


async def test_record_deployment_of_unlocked_deploy(store: LeaseStore) -> None:
    record = Deployment(
        session_id=ANA,
        lock="api",
        token=0,
        owner=owner_of(ANA),
        purpose=Purpose(commit="abc1234", reason="store down"),
        started_at=1_770_000_000.0,
        waited=0.0,
        finished_at=1_770_000_060.0,
        outcome="succeeded",
        exit_code=0,
        degraded=True,
        takeover="unlocked",
        detail="ran without a lock: store unreachable",
    )

    await store.record_deployment(record)
    await store.record_deployment(record)

    [stored] = await store.history("api")
    assert stored.session_id == ANA
    assert stored.token == 0
    assert stored.degraded is True
    assert stored.outcome == "succeeded"
    assert stored.exit_code == 0
    assert stored.started_at == 1_770_000_000.0
    assert stored.finished_at == 1_770_000_060.0
    assert stored.takeover == "unlocked"


async def test_two_unlocked_records_on_one_lock(store: LeaseStore) -> None:
    for holder in (ANA, BEN):
        await store.record_deployment(
            Deployment(
                session_id=holder,
                lock="api",
                token=0,
                owner=owner_of(holder),
                purpose=Purpose(),
                started_at=1_770_000_000.0,
                waited=0.0,
                finished_at=1_770_000_010.0,
                outcome="succeeded",
                degraded=True,
            )
        )

    history = await store.history("api")

    assert sorted(record.session_id for record in history) == sorted([ANA, BEN])


async def test_grant_after_unlocked_run_marks_record(store: LeaseStore) -> None:
    request = make_request(ANA, unlocked_since=1_770_000_000.0)

    await store.try_acquire(request)

    [record] = await store.history("api")
    assert record.degraded is True
    assert record.started_at == 1_770_000_000.0
    assert record.token == 1


# --- freezes ---


async def test_freeze_blocks_grant(store: LeaseStore) -> None:
    await store.freeze("api", "release window closed", owner_of(BEN), None)

    result = await store.try_acquire(make_request(ANA))

    assert isinstance(result, Busy)
    assert result.state.frozen is not None
    assert result.state.frozen.scope == "api"
    assert result.state.frozen.reason == "release window closed"
    assert result.state.frozen.by == "ben@build-7"


async def test_freeze_of_all_locks_blocks_every_lock(store: LeaseStore) -> None:
    await store.freeze(ALL_LOCKS, "company-wide freeze", owner_of(BEN), None)

    for lock in ("api", "web"):
        result = await store.try_acquire(make_request(ANA, lock=lock))
        assert isinstance(result, Busy), lock
        assert result.state.frozen is not None
        assert result.state.frozen.scope == ALL_LOCKS


async def test_freeze_of_other_lock_does_not_block(store: LeaseStore) -> None:
    await store.freeze("web", "web only", owner_of(BEN), None)

    lease = await expect_grant(store, ANA, "api")

    assert lease.lock == "api"


async def test_force_passes_freeze_and_says_so(store: LeaseStore) -> None:
    await store.freeze("api", "freeze", owner_of(BEN), None)

    result = await store.try_acquire(make_request(ANA, force=True, force_reason="hotfix"))

    assert isinstance(result, Acquired)
    [record] = await store.history("api")
    assert record.detail is not None
    assert "freeze" in record.detail
    assert "hotfix" in record.detail


async def test_unfreeze_lifts_freeze(store: LeaseStore) -> None:
    await store.freeze("api", "freeze", owner_of(BEN), None)

    lifted = await store.unfreeze("api")

    assert lifted is not None
    assert lifted.reason == "freeze"
    await expect_grant(store, ANA)
    assert await store.unfreeze("api") is None


async def test_freeze_ends_at_until(store: LeaseStore, clock: FakeClock) -> None:
    await store.freeze("api", "until noon", owner_of(BEN), clock.wall_seconds + 60)
    assert isinstance(await store.try_acquire(make_request(ANA)), Busy)

    clock.advance(61)

    await expect_grant(store, CARA)
    assert await store.freezes() == []


async def test_freezes_lists_global_first(store: LeaseStore) -> None:
    await store.freeze("web", "web", owner_of(BEN), None)
    await store.freeze(ALL_LOCKS, "all", owner_of(BEN), None)
    await store.freeze("api", "api", owner_of(BEN), None)

    freezes = await store.freezes()

    assert [freeze.scope for freeze in freezes] == [ALL_LOCKS, "api", "web"]


async def test_freeze_replaces_earlier_freeze(store: LeaseStore) -> None:
    await store.freeze("api", "first", owner_of(BEN), None)
    await store.freeze("api", "second", owner_of(CARA), None)

    [freeze] = await store.freezes()

    assert freeze.reason == "second"
    assert freeze.by.startswith("cara@")


async def test_freeze_keeps_held_lease_renewable(store: LeaseStore) -> None:
    lease = await expect_grant(store, ANA)
    await store.freeze("api", "freeze", owner_of(BEN), None)

    renewed = await store.renew(lease)

    assert renewed.holder == ANA
    state = await store.inspect("api")
    assert state.frozen is not None
    assert state.lease is not None


async def test_list_locks_shows_freeze(store: LeaseStore) -> None:
    await expect_grant(store, ANA, "api")
    await expect_grant(store, ANA, "web")
    await store.freeze("web", "freeze", owner_of(BEN), None)

    states = {state.lock: state for state in await store.list_locks()}

    assert states["api"].frozen is None
    assert states["web"].frozen is not None
