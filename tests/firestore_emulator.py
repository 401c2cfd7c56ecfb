"""The Firestore emulator for the tests, and a server clock that the tests move by hand.

The emulator is part of the Google Cloud CLI (``gcloud emulators firestore
start``) and runs on Java. One emulator serves the whole test session on a
free loopback port, and each test gets its own namespace in it. Without the
emulator the Firestore tests are skipped, except when the CI environment
variable is set, where a missing emulator fails them.

FIRESTORE_EMULATOR_HOST is set only for the tests that use the emulator, and
only for as long as each test runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from unittest import mock

import pytest
from conftest_store import FakeClock

if TYPE_CHECKING:
    from deployd.stores.firestore import FirestoreStore

PROJECT = "deployd-test"
# Maximum seconds for the emulator to respond after it starts, and to exit after SIGTERM.
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def emulator_problem() -> str | None:
    """Return why the emulator cannot run here, or None when it is installed."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return "gcloud is not on PATH; install the Google Cloud CLI to run the Firestore tests"
    if shutil.which("java") is None:
        return "java is not on PATH; the Firestore emulator needs Java 17 or later"

    result = subprocess.run(
        [gcloud, "info", "--format=value(installation.sdk_root)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    sdk_root = result.stdout.strip()
    component = os.path.join(sdk_root, "platform", "cloud-firestore-emulator")
    if result.returncode != 0 or not os.path.isdir(component):
        return (
            "the Firestore emulator is not installed; run 'gcloud components install "
            "cloud-firestore-emulator' (or install google-cloud-cli-firestore-emulator)"
        )
    return None


class FirestoreEmulator:
    """One emulator, in its own process group, listening on a loopback port.

    ``start()`` returns once the emulator responds to gRPC requests, and
    ``stop()`` ends the whole process group. The same object can start again on the same
    port, as an emulator restarted after a crash, with empty storage.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log_directory = tempfile.mkdtemp(prefix="deployd-firestore-")
        self.log_path = os.path.join(self._log_directory, "emulator.log")

    @property
    def host(self) -> str:
        """Return the address to put in FIRESTORE_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the emulator and wait until it has responded to a first gRPC request."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["gcloud", "emulators", "firestore", "start", f"--host-port={self.host}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
            self._warm_up()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the emulator's process group: SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        process = self.process
        if process is None:
            return

        self.process = None
        # The gcloud process leads the group, which also contains the shell script and Java.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)
        self._wait_until_port_is_free()

    def remove_logs(self) -> None:
        """Delete the emulator's log directory."""
        shutil.rmtree(self._log_directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the emulator's output."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError as exc:
            return f"(no emulator log: {exc})"

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the Firestore emulator exited with code {self.process.returncode} "
                    f"while starting:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                    if response.read().strip() == b"Ok":
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"the Firestore emulator did not respond on {self.host} within "
            f"{START_TIMEOUT:g}s:\n{self.log_tail()}"
        )

    def _warm_up(self) -> None:
        """Send one gRPC request, which takes the emulator a few seconds the first time."""
        from google.cloud.firestore import Client

        # The library reads FIRESTORE_EMULATOR_HOST only while creating the client.
        with mock.patch.dict(os.environ, {"FIRESTORE_EMULATOR_HOST": self.host}):
            client = Client(project=PROJECT)
        try:
            client.collection("warm-up").document("first").get(timeout=START_TIMEOUT)
        finally:
            client._firestore_api.transport.close()

    def _wait_until_port_is_free(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return
            time.sleep(0.1)


@dataclass(frozen=True)
class FirestoreNamespace:
    """A namespace of its own in the session's emulator, for one test."""

    host: str
    project: str
    namespace: str

    def build_store(self, **changes: Any) -> FirestoreStore:
        """Return a FirestoreStore in this namespace, not yet open.

        ``changes`` are keyword arguments of FirestoreStore, such as ``timeout``.
        """
        # Imported here, so that test sessions without Firestore tests never load the library.
        from deployd.stores.firestore import FirestoreStore

        arguments: dict[str, Any] = {"project": self.project, "namespace": self.namespace}
        arguments.update(changes)
        return FirestoreStore(**arguments)


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[FirestoreEmulator]:
    """Start one emulator for the session; skip without one, but fail when CI is set."""
    problem = emulator_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the Firestore tests need the emulator in CI: {problem}")
        pytest.skip(problem)

    emulator = FirestoreEmulator()
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
        emulator.remove_logs()


@pytest.fixture
def firestore_namespace(
    firestore_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> FirestoreNamespace:
    """Return a fresh namespace, with FIRESTORE_EMULATOR_HOST set while the test runs."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    return FirestoreNamespace(firestore_emulator.host, PROJECT, f"test-{secrets.token_hex(6)}")


class ManualServerClock:
    """Server time for the store contract suite, which moves only when the test's FakeClock does.

    Every server timestamp from before a ``FakeClock.advance`` reads as the
    fake wall time before it, and every later one as the time after it. So the
    Firestore store judges expiry against the emulator exactly as a store on
    the fake clock does. The steps are placed by this machine's wall clock,
    which the emulator, running on the same machine, also reads.
    """

    def __init__(self, clock: FakeClock) -> None:
        self._fake = clock
        self._start = clock.wall_seconds
        # Each step: the first server time in it, in microseconds since the
        # epoch, and the fake wall time that it reads as.
        self._steps: list[tuple[int, float]] = []

    @classmethod
    def attached_to(cls, clock: FakeClock) -> ManualServerClock:
        """Return the server clock that follows ``clock``, and make one on first use."""
        existing = getattr(clock, "server_clock", None)
        if isinstance(existing, cls):
            return existing

        server_clock = cls(clock)
        advance = clock.advance

        def advance_with_server(seconds: float) -> None:
            advance(seconds)
            server_clock.start_step()

        clock.advance = advance_with_server  # type: ignore[method-assign]
        clock.server_clock = server_clock  # type: ignore[attr-defined]
        return server_clock

    def start_step(self) -> None:
        """Make server times from now on read as the fake clock's current wall time."""
        # Every server time so far is earlier than `now`, because the store
        # calls that made them have returned. The pause puts every later one
        # at `now` + 2 ms or later, so it falls into the new step even when a
        # field timestamp is truncated to the millisecond.
        now = time.time_ns() // 1000
        time.sleep(0.002)
        self._steps.append((now + 1000, self._fake.wall_seconds))

    def seconds(self, timestamp: datetime) -> float:
        microseconds = (timestamp - _EPOCH) // _MICROSECOND
        value = self._start
        for first, step_value in self._steps:
            if microseconds < first:
                break
            value = step_value
        return value

    def timestamp(self, seconds: float) -> datetime:
        if seconds <= self._start:
            return _EPOCH
        for first, step_value in self._steps:
            if step_value >= seconds:
                return _EPOCH + first * _MICROSECOND
        return _LATEST
