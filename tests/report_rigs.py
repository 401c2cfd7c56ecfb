"""What the tests of history, stats, status, freezes and nesting share.

``deployd_json`` runs a command with ``--json`` and returns what it printed.
``RunDeploy`` is a ``deployd run`` whose command writes down its lease id,
so a test has the session id of every deploy it makes. ``SharedStore``
builds workstations whose daemons share one store: an SQLite file, or a
namespace of the Firestore emulator.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shlex
import struct
import subprocess
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from firestore_emulator import FirestoreEmulator
from harness import DEPLOYD, Workstation, wait_until

from deployd.models import Acquired, LeaseRequest, Outcome, Owner, Purpose
from deployd.sessions import short_hostname
from deployd.stores.sqlite import SQLiteStore

USER = pwd.getpwuid(os.getuid()).pw_name
HOST = short_hostname()
# The command that runs this interpreter's deployd_client, for shell scripts.
DEPLOYD_COMMAND = shlex.join(DEPLOYD)


def deployd_json(workstation: Workstation, *args: str) -> dict[str, Any]:
    """Run ``deployd ARGS --json``; fail unless it exits 0, and return the parsed output."""
    result = workstation.deployd(*args, "--json")
    assert result.returncode == 0, f"deployd {' '.join(args)} --json: {result.stderr}"
    output: dict[str, Any] = json.loads(result.stdout)
    return output


def history(workstation: Workstation, lock: str | None = None) -> list[dict[str, Any]]:
    """Return the deployment records of ``history --json``, newest first."""
    arguments = ["history", "--limit", "1000"] + ([lock] if lock else [])
    records: list[dict[str, Any]] = deployd_json(workstation, *arguments)["deployments"]
    return records


def record_of(workstation: Workstation, session_id: str) -> dict[str, Any] | None:
    """Return the deployment record of ``session_id`` from ``history``, if there is one."""
    for record in history(workstation):
        if record["session_id"] == session_id:
            return record
    return None


def wait_for_outcome(
    workstation: Workstation, session_id: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait until the record of ``session_id`` has an outcome; return the record."""

    def finished() -> dict[str, Any] | None:
        record = record_of(workstation, session_id)
        return record if record is not None and record["outcome"] is not None else None

    found: dict[str, Any] = wait_until(finished, timeout, 0.1)
    return found


def session_of(lease_id: str) -> str:
    """Return the session id in a lease id, which may end in ``+`` and the holder's key."""
    return lease_id.split("+", 1)[0]


def seed_deploys(path: Path, lock: str, deploys: list[tuple[float, float]]) -> list[str]:
    """Grant and release ``lock`` in the SQLite store at ``path`` before its daemon starts.

    Each deploy is (start, duration) in wall-clock seconds; the store's wall
    clock is set to those times, so history shows deploys of the past. The
    deploys succeed. Returns their session ids, oldest first.
    """
    sessions = [f"{USER}@{HOST}_seeded_{index}" for index in range(1, len(deploys) + 1)]

    async def seed() -> None:
        wall = [0.0]
        store = SQLiteStore(str(path), wall=lambda: wall[0])
        await store.open()
        try:
            for session, (started, duration) in zip(sessions, deploys, strict=True):
                wall[0] = started
                request = LeaseRequest(
                    lock=lock,
                    holder=session,
                    acquisition_id=f"{session}-acquisition",
                    owner=Owner(USER, HOST, 4242, "seeded"),
                    purpose=Purpose(commit="old"),
                    ttl=30.0,
                )
                granted = await store.try_acquire(request)
                assert isinstance(granted, Acquired), granted
                wall[0] = started + duration
                await store.release(granted.lease, Outcome.from_exit_code(0))
        finally:
            await store.aclose()

    anyio.run(seed)
    return sessions


def deployd_wrapper(directory: Path) -> Path:
    """Write an executable ``deployd`` that runs this interpreter's deployd_client."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "deployd"
    wrapper.write_text(f'#!/bin/sh\nexec {DEPLOYD_COMMAND} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@dataclass
class RunDeploy:
    """A finished ``deployd run``: its client's pid, exit code, stderr and session id."""

    pid: int
    returncode: int
    stderr: str
    session_id: str | None


def run_deploy(
    workstation: Workstation,
    directory: Path,
    lock: str,
    *options: str,
    script: str = "true",
    timeout: float = 90.0,
    environment: dict[str, str] | None = None,
) -> RunDeploy:
    """Run ``deployd run LOCK OPTIONS -- sh -c SCRIPT`` to its end.

    The shell first writes DEPLOYD_LEASE_ID to a file, then runs ``script``,
    in which ``$DEPLOYD`` is the deployd command. ``environment`` adds to the
    workstation's environment.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lease_file = directory / "lease-id"
    body = f'printf %s "$DEPLOYD_LEASE_ID" > {shlex.quote(str(lease_file))}\n{script}\n'
    env = workstation.env(**{"DEPLOYD": DEPLOYD_COMMAND, **(environment or {})})
    process = workstation.spawn(
        "run", lock, *options, "--", "sh", "-c", body, env=env, stdout=subprocess.DEVNULL
    )
    _, stderr = process.communicate(timeout=timeout)
    session = session_of(lease_file.read_text()) if lease_file.exists() else None
    return RunDeploy(process.pid, process.returncode, stderr, session)


@dataclass
class SharedStore:
    """Workstations whose daemons share one store, and what kind of store it is.

    ``emulator`` is the Firestore emulator that the store lives in, which a
    test may stop and start again; None for SQLite.
    """

    kind: str
    make: Callable[..., Workstation]
    emulator: FirestoreEmulator | None = None


# The two kinds of store, as parameters of a fixture; the Firestore one needs the emulator.
STORE_KINDS = ["sqlite", pytest.param("firestore", marks=pytest.mark.firestore)]


def shared_store_for(
    request: pytest.FixtureRequest, kind: str, private: bool = False
) -> SharedStore:
    """Return workstations sharing one store of ``kind`` (``sqlite`` or ``firestore``).

    SQLite daemons share one file in the test's directory. Firestore daemons
    share the test's namespace in the session's emulator, or with ``private``
    an emulator of the test's own, which it may stop and start.
    """
    make_workstation: Callable[..., Workstation] = request.getfixturevalue("make_workstation")
    if kind == "sqlite":
        path = request.getfixturevalue("tmp_path") / "locks.sqlite3"

        def make_sqlite(**settings: Any) -> Workstation:
            store = {"path": str(path), **settings.pop("store", {})}
            return make_workstation(store=store, **settings)

        return SharedStore("sqlite", make_sqlite)

    make_firestore: Callable[..., Workstation] = request.getfixturevalue(
        "make_firestore_workstation"
    )
    if not private:
        return SharedStore("firestore", make_firestore)
    emulator: FirestoreEmulator = request.getfixturevalue("private_emulator")

    def make_private(**settings: Any) -> Workstation:
        return make_firestore(emulator_host=emulator.host, **settings)

    return SharedStore("firestore", make_private, emulator)


@pytest.fixture(params=STORE_KINDS)
def shared_store(request: pytest.FixtureRequest) -> SharedStore:
    """Return workstations sharing one store, once with SQLite and once with Firestore."""
    return shared_store_for(request, request.param)


def terminal_command(
    argv: list[str], env: dict[str, str], columns: int = 250
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv`` on a new pseudo-terminal, ``columns`` wide, as its controlling terminal.

    Returns the process and the terminal's controller end, which the caller
    reads and closes. The process leads a new session, as the commands of an
    interactive shell do, and its stdin, stdout and stderr are the terminal.
    """
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    try:
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
    except BaseException:
        os.close(controller)
        raise
    finally:
        os.close(terminal)
    return process, controller


def _take_terminal() -> None:
    # Runs in the child after setsid(): make stdin the session's controlling terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
