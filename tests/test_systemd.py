"""Socket activation, readiness and watchdog notifications, as systemd drives them.

The test plays systemd's part. It binds the listening socket and hands it
to ``deployd serve`` as fd 3, with ``LISTEN_FDS=1`` and ``LISTEN_PID`` set by
a small wrapper that then execs the daemon. It receives the daemon's
notifications on a datagram socket of its own named by ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import itertools
import os
import queue
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import DEPLOYD, DaemonProcess, ShellHolder, Workstation, wait_until

from deployd.systemd import ActivationError, NotifySocket, take_listening_socket

# Puts the descriptor given as argv[1] at fd 3, sets LISTEN_PID to its own pid
# (which exec keeps), and execs the daemon: what systemd does for deployd.service.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[2], sys.argv[2:])
"""

needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="abstract socket addresses exist on Linux only"
)


class PassedFd:
    """A descriptor to pass as fd 3 that need not be a socket."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def listening_socket(path: Path) -> socket.socket:
    """Bind and listen on ``path`` as deployd.socket does (directory 0700, socket 0600)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(0o600)
    sock.listen(16)
    return sock


class NotifyReceiver(threading.Thread):
    """Receive the daemon's notifications in the background, so its datagrams never pile up."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_address = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_address)
        self.sock.settimeout(0.1)
        self.address = address
        self.messages: queue.Queue[tuple[float, str]] = queue.Queue()
        self.received: list[tuple[float, str]] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.put((time.monotonic(), data.decode()))

    def next_message(self, timeout: float = 20.0) -> str:
        """Return the next notification that is not a watchdog ping."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no notification within {timeout}s: {self.received}")
            try:
                item = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            self.received.append(item)
            if item[1] != "WATCHDOG=1":
                return item[1]

    def drain(self) -> list[tuple[float, str]]:
        """Collect every message received so far and return all of them."""
        while True:
            try:
                self.received.append(self.messages.get_nowait())
            except queue.Empty:
                return self.received

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(workstation: Workstation) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(str(workstation.root / "notify"))
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def activate(
    workstation: Workstation,
) -> Iterator[Callable[..., DaemonProcess]]:
    """Return a function that starts ``deployd serve`` on a passed socket; stops them all after."""
    daemons: list[DaemonProcess] = []

    def start(sock: socket.socket | PassedFd, **environment: str) -> DaemonProcess:
        log = open(workstation.log_file, "ab")  # noqa: SIM115 - the child keeps it
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", ACTIVATE, str(sock.fileno()), *DEPLOYD, "serve"],
                pass_fds=[sock.fileno()],
                env=workstation.env(**environment),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        daemon = DaemonProcess(workstation, process)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.stop()


def wait_answering(daemon: DaemonProcess) -> None:
    def answering() -> bool:
        if daemon.process.poll() is not None:
            raise AssertionError(f"the daemon exited with {daemon.process.returncode}")
        return daemon.answers()

    wait_until(answering, timeout=20)


# --- socket activation ---


def test_activated_daemon_serves_passed_socket(
    workstation: Workstation,
    activate: Callable[..., DaemonProcess],
    notify_socket: NotifyReceiver,
) -> None:
    listener = listening_socket(workstation.socket)
    try:
        inode = workstation.socket.lstat().st_ino
        daemon = activate(listener, NOTIFY_SOCKET=notify_socket.address)

        ready = notify_socket.next_message()
        assert ready.splitlines()[0] == "READY=1"
        assert f"STATUS=serving {workstation.socket}" in ready.splitlines()[1]
        hello = workstation.request("hello")
        assert hello["result"]["pid"] == daemon.pid
        run = workstation.deployd("run", "api", "--", "sh", "-c", "exit 3")
        assert run.returncode == 3, run.stderr
        assert workstation.socket.lstat().st_ino == inode, "the daemon bound a socket of its own"

        assert daemon.stop() == 0
        stopping = notify_socket.next_message()
        assert stopping.splitlines()[0] == "STOPPING=1"
        assert workstation.socket.lstat().st_ino == inode, "the daemon removed systemd's socket"
        assert stat.S_ISSOCK(workstation.socket.lstat().st_mode)
        log = daemon.log()
        assert "removing stale socket file" not in log
    finally:
        listener.close()


def test_plain_daemon_refused_while_activated_one_runs(
    workstation: Workstation, activate: Callable[..., DaemonProcess]
) -> None:
    listener = listening_socket(workstation.socket)
    try:
        daemon = activate(listener)
        wait_answering(daemon)
        inode = workstation.socket.lstat().st_ino

        second = workstation.deployd("serve", timeout=60)

        assert second.returncode == 75, second.stderr
        assert f"pid {daemon.pid}" in second.stderr
        assert workstation.socket.lstat().st_ino == inode
        assert workstation.request("hello")["result"]["pid"] == daemon.pid
    finally:
        listener.close()


def test_second_activated_daemon_refused(
    workstation: Workstation, activate: Callable[..., DaemonProcess]
) -> None:
    """A daemon on systemd's socket cannot probe it: it waits for the daemon lock, then exits 75."""
    listener = listening_socket(workstation.socket)
    try:
        first = activate(listener)
        wait_answering(first)

        second = activate(listener)

        assert second.process.wait(60) == 75
        assert f"another deployd daemon (pid {first.pid}) already runs" in second.log()
        assert first.process.poll() is None
        assert workstation.request("hello")["result"]["pid"] == first.pid
    finally:
        listener.close()


def test_restart_on_same_socket_resumes_lease(
    workstation: Workstation, activate: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """As 'systemctl restart deployd': the next daemon gets the same socket, resumes the lease."""
    listener = listening_socket(workstation.socket)
    holder = None
    try:
        first = activate(listener)
        wait_answering(first)
        holder = ShellHolder(workstation, tmp_path / "holder", "api")
        lease = holder.lease()

        assert first.stop() == 0
        second = activate(listener)
        wait_answering(second)

        leases = workstation.status()["leases"]
        assert [entry["session_id"] for entry in leases] == [lease["session_id"]]
        busy = workstation.deployd("acquire", "api")
        assert busy.returncode == 75, busy.stderr
    finally:
        if holder is not None:
            holder.kill()
        listener.close()


@pytest.mark.parametrize(
    ("make_fd", "message"),
    [
        (lambda root: os.pipe()[0], "is not a usable socket"),
        (
            lambda root: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach(),
            "must use ListenStream=",
        ),
        (
            lambda root: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach(),
            "is not a listening socket",
        ),
    ],
    ids=["pipe", "datagram-socket", "unbound-socket"],
)
def test_unusable_passed_fd_exits_78(
    workstation: Workstation,
    activate: Callable[..., DaemonProcess],
    make_fd: Callable[[Path], int],
    message: str,
) -> None:
    fd = make_fd(workstation.root)
    try:
        daemon = activate(PassedFd(fd))
        assert daemon.process.wait(30) == 78
        assert message in daemon.log()
    finally:
        os.close(fd)


def test_socket_at_other_path_exits_78(
    workstation: Workstation, activate: Callable[..., DaemonProcess]
) -> None:
    other = workstation.root / "elsewhere" / "deployd.sock"
    listener = listening_socket(other)
    try:
        daemon = activate(listener)
        assert daemon.process.wait(30) == 78
        log = daemon.log()
        assert f"the socket from systemd is {other}" in log
        assert f"clients look for {workstation.socket}" in log
    finally:
        listener.close()


def test_listen_pid_of_other_process_ignored() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "deployd.socket"}
    assert take_listening_socket(environ) is None
    assert environ == {}


@pytest.mark.parametrize(
    ("count", "message"),
    [("2", "systemd passed 2 sockets"), ("x", "LISTEN_FDS must be a number")],
)
def test_bad_listen_fds_rejected(count: str, message: str) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    with pytest.raises(ActivationError, match=message):
        take_listening_socket(environ)
    assert environ == {}


def test_no_listen_variables_means_no_socket() -> None:
    assert take_listening_socket({}) is None


# --- notifications and the watchdog ---


def test_watchdog_pings_repeat(
    workstation: Workstation,
    activate: Callable[..., DaemonProcess],
    notify_socket: NotifyReceiver,
) -> None:
    listener = listening_socket(workstation.socket)
    try:
        daemon = activate(listener, NOTIFY_SOCKET=notify_socket.address, WATCHDOG_USEC="200000")
        notify_socket.next_message()  # READY=1
        wait_until(
            lambda: sum(text == "WATCHDOG=1" for _, text in notify_socket.drain()) >= 5,
            timeout=10,
        )
        pings = [at for at, text in notify_socket.drain() if text == "WATCHDOG=1"]
        gaps = sorted(later - earlier for earlier, later in itertools.pairwise(pings))
        # Half of WATCHDOG_USEC apart, 0.1s; the median leaves room for a slow machine.
        assert gaps[len(gaps) // 2] < 0.15, gaps
        assert daemon.process.poll() is None
    finally:
        listener.close()


def test_watchdog_of_other_pid_not_pinged(
    workstation: Workstation,
    activate: Callable[..., DaemonProcess],
    notify_socket: NotifyReceiver,
) -> None:
    listener = listening_socket(workstation.socket)
    try:
        activate(
            listener,
            NOTIFY_SOCKET=notify_socket.address,
            WATCHDOG_USEC="100000",
            WATCHDOG_PID="1",
        )
        notify_socket.next_message()  # READY=1
        time.sleep(0.5)  # five watchdog intervals: a ping would have come by now
        assert [text for _, text in notify_socket.drain() if text == "WATCHDOG=1"] == []
    finally:
        listener.close()


@needs_linux
def test_abstract_notify_socket_gets_ready(
    workstation: Workstation, activate: Callable[..., DaemonProcess]
) -> None:
    receiver = NotifyReceiver(f"@deployd-test-{secrets.token_hex(6)}")
    receiver.start()
    listener = listening_socket(workstation.socket)
    try:
        daemon = activate(listener, NOTIFY_SOCKET=receiver.address)
        assert receiver.next_message().startswith("READY=1\n")
        daemon.process.send_signal(signal.SIGHUP)
        assert receiver.next_message().startswith("RELOADING=1\n")
        assert receiver.next_message().startswith("READY=1\n")
    finally:
        receiver.stop()
        listener.close()


def test_notify_variables_removed() -> None:
    environ = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    NotifySocket.from_environment(environ)
    assert environ == {}


def test_notify_without_socket_does_nothing() -> None:
    notify = NotifySocket.from_environment({})
    assert not notify.enabled
    assert notify.send("READY=1") is False


def test_notify_to_missing_socket_is_dropped(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "missing"))
    assert notify.send("READY=1") is False
