"""Deploys that ran without the store's lock, and what is owed for them.

With ``on_store_error = "open"`` a deploy goes ahead when the store cannot
be reached; the daemon still serializes its own callers. Two things are
owed once the store answers again: the deployment record (marked degraded),
and a report of every deploy of the same lock by another holder that
overlapped the unlocked run. This module keeps the records that could not
be written yet, retries them, and finds the overlaps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio

from deployd.coordinator import HeldLease
from deployd.errors import StoreError
from deployd.models import Deployment, Outcome
from deployd.reports import EVENT_SCHEMA
from deployd.stores.base import LeaseStore
from deployd_client.display import clock_time
from deployd_client.durations import format_duration

logger = logging.getLogger("deployd.unlocked")

# Pauses between attempts to write an owed record: doubling up to the maximum.
RETRY_FIRST_DELAY = 2.0
RETRY_MAX_DELAY = 60.0

OverlapSink = Callable[[HeldLease | None, Deployment, list[Deployment]], None]


def unlocked_record(held: HeldLease, outcome: Outcome, finished_at: float) -> Deployment:
    """Return the deployment record of a deploy that never got the store's lock."""
    lease = held.lease
    return Deployment(
        session_id=lease.holder,
        lock=lease.lock,
        token=0,
        owner=lease.owner,
        purpose=lease.purpose,
        started_at=held.unlocked_since or lease.acquired_at,
        waited=held.waited,
        finished_at=finished_at,
        outcome=str(outcome.status),
        exit_code=outcome.exit_code,
        revision=outcome.revision,
        degraded=True,
        takeover="unlocked",
        detail=f"ran without a lock: {held.unlocked_reason or 'the store was unreachable'}",
    )


def overlapping(own: Deployment, others: list[Deployment]) -> list[Deployment]:
    """Return the deploys of other holders whose time overlaps ``own``'s."""
    start = own.started_at
    end = own.finished_at if own.finished_at is not None else time.time()
    return [
        other
        for other in others
        if other.session_id != own.session_id
        and other.lock == own.lock
        and other.started_at < end
        and (other.finished_at is None or other.finished_at > start)
    ]


def describe_overlap(own: Deployment, other: Deployment) -> str:
    """Return one line that names both deploys of an overlap."""
    duration = (own.finished_at or time.time()) - own.started_at
    until = "still running" if other.finished_at is None else clock_time(other.finished_at)
    return (
        f"{own.lock} was deployed by {other.owner.user} on {other.owner.host} "
        f"(session {other.session_id}, token {other.token}, from "
        f"{clock_time(other.started_at)} to {until}) while "
        f"{own.owner.user} on {own.owner.host} deployed it without a lock "
        f"(session {own.session_id}, for {format_duration(duration)})"
    )


class UnlockedDeploys:
    """Owed records of unlocked deploys: written when possible, retried until stored.

    ``on_overlap`` is called for each unlocked deploy that overlapped deploys
    of others, with the held lease when it is still running.
    """

    def __init__(self, store: LeaseStore, on_overlap: OverlapSink) -> None:
        self.store = store
        self._on_overlap = on_overlap
        self._owed: list[Deployment] = []
        self._wakeup = anyio.Event()

    @property
    def owed(self) -> list[Deployment]:
        """Return the records not written yet, oldest first."""
        return list(self._owed)

    def owe(self, records: list[Deployment]) -> None:
        """Add records to write, such as those a previous daemon run could not write."""
        self._owed.extend(records)
        self._wakeup.set()

    def record(self, held: HeldLease, outcome: Outcome) -> None:
        """Queue the record of an unlocked deploy that has ended."""
        record = unlocked_record(held, outcome, time.time())
        logger.info(
            "recording a deploy that ran without a lock: lock=%s session=%s outcome=%s",
            record.lock,
            record.session_id,
            record.outcome,
        )
        self.owe([record])

    async def check_upgraded(self, held: HeldLease) -> None:
        """Report deploys that overlapped a lease's unlocked time, now that it holds the lock."""
        own = replace(
            unlocked_record(held, Outcome.from_exit_code(None), time.time()),
            finished_at=held.unlocked_until,
        )
        await self._report_overlaps(own, held)

    async def run(self) -> None:
        """Write owed records until cancelled; retry with growing pauses while the store fails."""
        delay = RETRY_FIRST_DELAY
        while True:
            if not self._owed:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            record = self._owed[0]
            try:
                await self.store.record_deployment(record)
            except StoreError as exc:
                logger.warning(
                    "cannot record an unlocked deploy yet, retrying in %s: lock=%s session=%s: %s",
                    format_duration(delay),
                    record.lock,
                    record.session_id,
                    exc,
                )
                with anyio.move_on_after(delay):
                    await anyio.sleep_forever()
                delay = min(delay * 2, RETRY_MAX_DELAY)
                continue
            delay = RETRY_FIRST_DELAY
            self._owed.pop(0)
            logger.info(
                "recorded an unlocked deploy: lock=%s session=%s", record.lock, record.session_id
            )
            await self._report_overlaps(record, None)

    async def _report_overlaps(self, own: Deployment, held: HeldLease | None) -> None:
        try:
            history = await self.store.history(own.lock, limit=200, since=own.started_at - 86400)
        except StoreError as exc:
            logger.warning(
                "cannot look for deploys that overlapped an unlocked one: lock=%s session=%s: %s",
                own.lock,
                own.session_id,
                exc,
            )
            return
        others = overlapping(own, history)
        for other in others:
            logger.warning("overlap: %s", describe_overlap(own, other))
        if others:
            self._on_overlap(held, own, others)


def overlap_event(own: Deployment, others: list[Deployment]) -> dict[str, Any]:
    """Return the ``overlap`` event pushed to a client whose unlocked deploy overlapped others."""
    return {
        "event": "overlap",
        "schema": EVENT_SCHEMA,
        "lock": own.lock,
        "lease_id": own.session_id,
        "message": "; ".join(describe_overlap(own, other) for other in others),
        "others": [other.to_json() for other in others],
    }
