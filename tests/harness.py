"""Real daemons and real clients for the tests.

Each DaemonProcess is a ``deployd serve`` subprocess with its own socket,
state directory and config file, as a separate workstation would have.
Clients run as subprocesses of ``python -m deployd_client``, so the tests
exercise the same code paths as the installed ``deployd`` command.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEPLOYD = [sys.executable, "-m", "deployd_client"]


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


def toml_value(value: object) -> str:
    """Render a Python value as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def render_config(settings: Mapping[str, Any]) -> str:
    """Render ``{"on_store_error": "open", "lease": {"ttl": "2s"}}`` as TOML."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables.extend(f"{name} = {toml_value(item)}" for name, item in value.items())
        else:
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


@dataclass
class Workstation:
    """The directories and environment of one simulated workstation.

    ``environment`` contains variables that this workstation's daemon and
    clients get on top of the test's own, such as FIRESTORE_EMULATOR_HOST.
    """

    root: Path
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "deployd.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.log"

    @property
    def store_file(self) -> Path:
        """The SQLite lease store, unless the config sets ``store.path``."""
        return self.state_dir / "locks.sqlite3"

    @property
    def kept_leases_file(self) -> Path:
        """The daemon's local state file, which holds the leases kept across a restart."""
        return self.state_dir / "daemon.sqlite3"

    def env(self, **extra: str) -> dict[str, str]:
        """Return the environment for a daemon or client of this workstation."""
        env = dict(os.environ)
        for name in list(env):
            if name.startswith("DEPLOYD_"):
                del env[name]
        env.update(
            DEPLOYD_SOCKET=str(self.socket),
            DEPLOYD_STATE_DIR=str(self.state_dir),
            DEPLOYD_CONFIG=str(self.config_file),
            DEPLOYD_NO_AUTOSTART="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.environment)
        env.update(extra)
        return env

    def write_config(self, settings: Mapping[str, Any] | None = None) -> None:
        """Write the config file from ``settings`` (default: the workstation's settings)."""
        if settings is not None:
            self.settings = dict(settings)
        self.config_file.write_text(render_config(self.settings))

    def deployd(
        self, *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``deployd`` command to completion and return its result."""
        return subprocess.run(
            [*DEPLOYD, *args],
            env=dict(env) if env is not None else self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    def spawn(
        self, *args: str, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[str]:
        """Start the ``deployd`` command in the background."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(
            [*DEPLOYD, *args],
            env=dict(env) if env is not None else self.env(),
            text=True,
            **kwargs,
        )

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request over the socket and return the whole response."""
        with raw_connection(self.socket) as connection:
            return connection.call(op, **fields)

    def status(self) -> dict[str, Any]:
        """Return the result of a ``status`` request; fail if the daemon returns an error."""
        response = self.request("status")
        assert response["ok"], response
        result: dict[str, Any] = response["result"]
        return result

    def local_queue(self, lock: str) -> list[dict[str, Any]]:
        """Return the callers queued for ``lock`` in this workstation's daemon."""
        for entry in self.status()["locks"]:
            if entry["lock"] == lock:
                queue: list[dict[str, Any]] = entry["local_queue"]
                return queue
        return []


class RawConnection:
    """A bare protocol connection, for sending exactly the bytes a test wants."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.next_id = 0

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: str, **fields: Any) -> int:
        self.next_id += 1
        message = {"v": 1, "id": self.next_id, "op": op, **fields}
        self.send_bytes((json.dumps(message) + "\n").encode())
        return self.next_id

    def read(self, timeout: float = 10.0) -> dict[str, Any]:
        """Return the next message; fail if none arrives within ``timeout``."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the daemon closed the connection")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def response(self, request_id: int | None, timeout: float = 10.0) -> dict[str, Any]:
        """Return the response to ``request_id``, skipping events."""
        while True:
            message = self.read(timeout)
            if "event" in message:
                continue
            if message.get("id") == request_id:
                return message

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.response(self.send(op, **fields))

    def close(self) -> None:
        self.sock.close()


class raw_connection:
    """Open a RawConnection to a socket path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection: RawConnection | None = None

    def __enter__(self) -> RawConnection:
        from deployd_client.paths import socket_address

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with socket_address(str(self.path)) as address:
                sock.connect(address)
        except BaseException:
            sock.close()
            raise
        self.connection = RawConnection(sock)
        return self.connection

    def __exit__(self, *exc_info: object) -> None:
        assert self.connection is not None
        self.connection.close()


@dataclass
class DaemonProcess:
    """A running ``deployd serve`` of one workstation."""

    workstation: Workstation
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def answers(self) -> bool:
        try:
            response = self.workstation.request("hello")
        except OSError:
            return False
        return bool(response.get("ok"))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``signum`` and wait for the daemon to exit; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Kill the daemon with SIGKILL and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def log(self) -> str:
        return self.workstation.log_file.read_text(errors="replace")


def start_daemon(
    workstation: Workstation, wait: bool = True, timeout: float = 20.0
) -> DaemonProcess:
    """Start ``deployd serve`` for ``workstation`` and wait until it answers."""
    if not workstation.config_file.exists():
        workstation.write_config()
    log = open(workstation.log_file, "ab")  # noqa: SIM115 - the child process keeps it
    try:
        process = subprocess.Popen(
            [*DEPLOYD, "serve"],
            env=workstation.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    finally:
        log.close()
    daemon = DaemonProcess(workstation, process)
    if wait:
        deadline = time.monotonic() + timeout
        while not daemon.answers():
            if process.poll() is not None:
                raise AssertionError(
                    f"deployd serve exited with {process.returncode}:\n{daemon.log()}"
                )
            if time.monotonic() > deadline:
                daemon.kill()
                raise AssertionError(
                    f"deployd serve did not answer within {timeout}s:\n{daemon.log()}"
                )
            time.sleep(0.02)
    return daemon


def short_tempdir(prefix: str = "dd") -> Path:
    """Return a new private directory under /tmp with a short path (socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o700)
    return path


def terminate(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a child process by its pid: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def iter_ledger(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON records of a ledger file, one per line."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def query_sqlite(path: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Run one read query on a daemon's SQLite file and return the rows as dicts.

    Reading does not disturb a running daemon: the files are in WAL mode.
    """
    assert path.exists(), f"no SQLite file at {path}"
    connection = sqlite3.connect(path, timeout=10.0)
    try:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql, params)]
    finally:
        connection.close()


class Gate:
    """A named pipe that a command blocks on (``read line < PATH``) until the test opens it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path, 0o600)

    def open(self, timeout: float = 10.0) -> None:
        """Let the blocked reader go on; fail if no reader opens the pipe within ``timeout``."""
        fd: int = wait_until(self._open_for_writing, timeout)
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)

    def _open_for_writing(self) -> int | None:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            # ENXIO: no process has the pipe open for reading yet.
            if exc.errno == errno.ENXIO:
                return None
            raise


class ShellHolder:
    """A shell that takes a lock with ``deployd acquire`` and then waits, as a deploy script does.

    The lease is bound to the shell: through ``--pid $$`` when ``pass_pid`` is
    set, otherwise through the client's default, its parent process. The shell
    waits for a ``sleep`` child and writes the child's pid down before the
    lease file, so ``kill`` can stop the child as well.
    """

    def __init__(
        self,
        workstation: Workstation,
        directory: Path,
        lock: str,
        *options: str,
        pass_pid: bool = False,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.lease_file = directory / "lease.json"
        self.sleeper_file = directory / "sleeper.pid"
        self.stderr_file = directory / "stderr.txt"
        partial = directory / "lease.json.partial"

        acquire = shlex.join(["acquire", lock, "--format", "json", *options])
        if pass_pid:
            acquire += ' --pid "$$"'
        script = (
            f'"$@" {acquire} > {shlex.quote(str(partial))} || exit $?\n'
            f"sleep 600 &\n"
            f"echo $! > {shlex.quote(str(self.sleeper_file))}\n"
            f"mv {shlex.quote(str(partial))} {shlex.quote(str(self.lease_file))}\n"
            "wait\n"
        )
        with open(self.stderr_file, "wb") as stderr:
            self.process = subprocess.Popen(
                ["sh", "-c", script, "sh", *DEPLOYD],
                env=workstation.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    @property
    def pid(self) -> int:
        """The shell's pid, which the lease is bound to."""
        return self.process.pid

    def lease(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the shell holds the lock; return the lease that ``acquire`` printed."""

        def acquired_or_exited() -> bool:
            return self.lease_file.exists() or self.process.poll() is not None

        wait_until(acquired_or_exited, timeout)
        if not self.lease_file.exists():
            raise AssertionError(
                f"deployd acquire in the holder shell exited with {self.process.returncode}: "
                f"{self.stderr_file.read_text(errors='replace')}"
            )
        lease: dict[str, Any] = json.loads(self.lease_file.read_text())
        return lease

    def kill(self) -> None:
        """Kill the shell with SIGKILL and reap it, then kill its ``sleep`` child."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.sleeper_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(self.sleeper_file.read_text()), signal.SIGKILL)


def process_running(pid: int) -> bool:
    """Return whether ``pid`` runs and is not a zombie."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = stat_line.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def autostart_env(workstation: Workstation, **extra: str) -> dict[str, str]:
    """Return the workstation's client environment with autostart allowed."""
    env = workstation.env(**extra)
    del env["DEPLOYD_NO_AUTOSTART"]
    return env


def stop_started_daemon(workstation: Workstation, pid: int | None = None) -> None:
    """Stop a daemon that a client started, by ``pid`` or else the pid in its lock file."""
    if pid is None:
        lock_file = workstation.socket.parent / "deployd.lock"
        try:
            pid = int(lock_file.read_text().strip())
        except (OSError, ValueError):
            return
    if not process_running(pid):
        return
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not process_running(pid), timeout=30)
