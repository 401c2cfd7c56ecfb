"""Shared fixtures: workstations with real daemons, and the anyio backend."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

# The Firestore emulator fixtures, registered for every test module.
from firestore_emulator import firestore_emulator, firestore_namespace  # noqa: F401
from firestore_stations import (  # noqa: F401
    make_firestore_workstation,
    private_emulator,
    store_reader,
)
from harness import (
    DaemonProcess,
    Workstation,
    short_tempdir,
    start_daemon,
    stop_started_daemon,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def ignore_closed_loop_callbacks() -> AsyncIterator[None]:
    """Drop gRPC's callbacks for event loops of earlier tests; pass on every other loop error.

    Each async test runs in an event loop of its own, while grpc.aio's
    completion queue serves the whole process. A call of an earlier test that
    completes after that test's loop has closed makes
    ``PollerCompletionQueue._handle_events`` raise "Event loop is closed" in
    the next test's loop, and anyio would fail that test for it. The daemon
    runs one loop for its whole life, so this concerns only the tests (see
    https://github.com/grpc/grpc/pull/36096 on loops sharing that queue).
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        from_grpc = "PollerCompletionQueue._handle_events" in repr(context.get("handle"))
        if from_grpc and isinstance(error, RuntimeError) and "loop is closed" in str(error):
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    loop.set_exception_handler(handle)
    yield
    loop.set_exception_handler(previous)


@pytest.fixture
def make_workstation() -> Iterator[Callable[..., Workstation]]:
    """Return a factory of workstations, each with its own private directory.

    Keyword arguments become the config file, for example
    ``make_workstation(lease={"ttl": "2s"})``.
    """
    roots = []

    def make(**settings: Any) -> Workstation:
        root = short_tempdir()
        roots.append(root)
        workstation = Workstation(root, dict(settings))
        workstation.write_config()
        return workstation

    yield make
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workstation(make_workstation: Callable[..., Workstation]) -> Workstation:
    """Return one workstation with the default config."""
    return make_workstation()


@pytest.fixture
def start() -> Iterator[Callable[..., DaemonProcess]]:
    """Return a function that starts a daemon; every daemon started is stopped afterwards."""
    daemons: list[DaemonProcess] = []

    def start_one(workstation: Workstation, wait: bool = True) -> DaemonProcess:
        daemon = start_daemon(workstation, wait=wait)
        daemons.append(daemon)
        return daemon

    yield start_one
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.stop()


@pytest.fixture
def daemon(workstation: Workstation, start: Callable[..., DaemonProcess]) -> DaemonProcess:
    """Return a running daemon on the default workstation."""
    return start(workstation)


@pytest.fixture
def stop_started(workstation: Workstation) -> Iterator[None]:
    """Stop, by the pid in its lock file, a daemon that a client of the test started."""
    yield
    stop_started_daemon(workstation)
