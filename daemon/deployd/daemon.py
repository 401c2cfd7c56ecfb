"""The daemon's lifecycle: start, serve, stop.

Start: check the socket directory, take the daemon lock, reclaim a stale
socket file, open the store, resume the leases the previous daemon kept,
listen. Stop (SIGTERM or SIGINT): stop accepting, release the leases whose
holders are gone, keep the others for the next daemon, remove the socket,
exit 0.

Under systemd the listening socket may come from ``deployd.socket`` (socket
activation). The daemon then serves that socket and never removes or
re-creates its file, because the file belongs to systemd. The daemon lock
still keeps a second daemon out. With ``NOTIFY_SOCKET`` set the daemon reports its
readiness, reloads and stop, and sends watchdog pings (``deployd.systemd``).
SIGHUP reloads the configuration (``deployd.reload``).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import signal
import socket
import sqlite3
import stat
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace

import anyio
from anyio.abc import SocketListener, TaskGroup, TaskStatus

from deployd import __version__
from deployd.config import Config, environment_warnings, firestore_project
from deployd.coordinator import HeldLease
from deployd.errors import ConfigError, DeploydError, StoreError
from deployd.handlers import DaemonInfo, Ops
from deployd.models import Outcome, OutcomeStatus
from deployd.notifiers import Notifier, create_notifier
from deployd.processes import is_alive
from deployd.reload import ConfigReloader
from deployd.report_ops import ReportOps
from deployd.server import Limits, Server
from deployd.service import Binding, LeaseService
from deployd.sessions import new_daemon_id, short_hostname
from deployd.state import KeptLease, LocalState
from deployd.stores import create_store
from deployd.systemd import (
    ActivationError,
    NotifySocket,
    check_socket_path,
    take_listening_socket,
)
from deployd_client import exitcodes, paths

logger = logging.getLogger("deployd.daemon")

# How long a starting daemon waits for a stopping one to let go of the
# daemon lock (a restart), before it gives up.
LOCK_WAIT = 10.0
# How often the daemon checks that its socket file still exists.
SOCKET_CHECK_INTERVAL = 2.0
# How long a stopping daemon lets the notifier send the messages that are due;
# the rest stays in the outbox for the next daemon.
NOTIFIER_FLUSH_TIMEOUT = 2.0


class StartupError(Exception):
    """The daemon cannot start; carries the exit code and a message with the fix."""

    def __init__(self, message: str, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(message)


def check_socket_dir(directory: str) -> None:
    """Create the socket directory with mode 0700, or check that an existing one is private."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError as exc:
        raise StartupError(
            f"cannot create the socket directory {directory}: {exc.strerror}; "
            "set DEPLOYD_SOCKET to a path in a directory you own",
            exitcodes.NO_PERMISSION,
        ) from exc
    if info.st_uid != os.getuid():
        raise StartupError(
            f"socket directory {directory} belongs to uid {info.st_uid}, not to you "
            f"(uid {os.getuid()}); remove it or set DEPLOYD_SOCKET to a path in a directory "
            "you own",
            exitcodes.NO_PERMISSION,
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        # chmod is the fix for a directory of the user's own, never for a
        # shared one such as /, /etc or /tmp (top-level or sticky directories).
        shared = os.path.dirname(directory.rstrip("/")) in ("", "/") or bool(
            info.st_mode & stat.S_ISVTX
        )
        fix = (
            "set DEPLOYD_SOCKET to a path in a private directory of your own"
            if shared
            else f"run 'chmod 700 {directory}'"
        )
        raise StartupError(
            f"socket directory {directory} is open to other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}); {fix}",
            exitcodes.NO_PERMISSION,
        )


def _answers(path: str) -> bool:
    """Return whether a daemon accepts connections on ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        with paths.socket_address(path) as address:
            probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def take_daemon_lock(
    directory: str, socket_path: str, wait: float = LOCK_WAIT, probe: bool = True
) -> int:
    """Take the exclusive lock that makes this the only daemon on the socket directory.

    A daemon that answers on the socket means another daemon runs: refuse.
    A lock held by a daemon that does not answer is one that is stopping: wait
    for it up to ``wait`` seconds. Without ``probe`` (a socket from systemd,
    which accepts connections for whichever daemon serves it) every holder
    of the lock is waited for. Returns the lock file's descriptor, which must
    stay open for the daemon's lifetime.
    """
    lock_path = os.path.join(directory, "deployd.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        if (probe and _answers(socket_path)) or time.monotonic() >= deadline:
            running = _read_lock_pid(fd)
            os.close(fd)
            stop_command = f"kill {running}" if running else f"kill $(cat {lock_path})"
            raise StartupError(
                f"another deployd daemon (pid {running or 'unknown'}) already runs on "
                f"{socket_path}; stop it first ('{stop_command}') or use it as it is",
                exitcodes.BUSY,
            )
        time.sleep(0.05)


def _read_lock_pid(fd: int) -> int | None:
    """Return the pid that the daemon holding the lock file wrote into it, if readable."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def reclaim_socket(path: str) -> None:
    """Remove a socket file that no daemon listens on; refuse to touch anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(
            f"{path} exists and is not a socket; move it away or set DEPLOYD_SOCKET elsewhere",
            exitcodes.CONFIG,
        )
    if _answers(path):
        raise StartupError(f"another deployd daemon is already listening on {path}", exitcodes.BUSY)
    logger.info("removing stale socket file %s left by a daemon that is gone", path)
    os.unlink(path)


def bind_listener(path: str) -> socket.socket:
    """Create the listening socket with mode 0600 (set at creation by the umask)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with paths.socket_address(path) as address:
            sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {path}: {exc.strerror}", exitcodes.NO_PERMISSION
        ) from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Daemon:
    """One run of the daemon on one socket."""

    def __init__(
        self,
        config: Config,
        socket_path: str,
        config_path: str | None = None,
        listening: socket.socket | None = None,
        notify: NotifySocket | None = None,
    ) -> None:
        """``config_path`` is the ``--config`` file, if any; ``listening`` a socket from systemd."""
        self.config = config
        self.socket_path = socket_path
        self.config_path = config_path
        self.listening = listening
        self.notify = notify or NotifySocket(None)
        self.daemon_id = new_daemon_id(short_hostname())
        self._stop: anyio.Event | None = None
        self._stop_requested = False
        self._socket_inode: int | None = None

    def request_stop(self) -> None:
        """Ask the daemon to stop as on SIGTERM."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(self, ready: Callable[[], None] | None = None) -> int:
        """Serve until SIGTERM or SIGINT; return the exit code."""
        self._stop = anyio.Event()
        if self._stop_requested:
            self._stop.set()
        directory = os.path.dirname(self.socket_path)
        with ExitStack() as cleanup:
            check_socket_dir(directory)
            if self.listening is not None:
                cleanup.callback(self.listening.close)
                try:
                    check_socket_path(self.listening, self.socket_path)
                except ActivationError as exc:
                    raise StartupError(str(exc), exitcodes.CONFIG) from exc
            lock_fd = await anyio.to_thread.run_sync(
                take_daemon_lock, directory, self.socket_path, LOCK_WAIT, self.listening is None
            )
            cleanup.callback(os.close, lock_fd)
            if self.listening is None:
                reclaim_socket(self.socket_path)

            store = create_store(self.config)
            try:
                await store.open()
            except StoreError as exc:
                raise StartupError(
                    f"cannot open the lease store: {exc}", exitcodes.UNAVAILABLE
                ) from exc
            state_path = os.path.join(self.config.state_dir, "daemon.sqlite3")
            try:
                state = LocalState(state_path)
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(
                    f"cannot open the daemon's state file {state_path}: {exc}; make "
                    f"{self.config.state_dir} a writable directory, or set DEPLOYD_STATE_DIR",
                    exitcodes.CONFIG,
                ) from exc
            cleanup.callback(state.close)
            # Reads the Slack credentials: a token file open to others stops the start here.
            notifier = create_notifier(self.config, state_path)

            service = LeaseService(self.config, store, self.daemon_id)
            if notifier is not None:
                service.events.subscribe(notifier.accept)
            info = DaemonInfo(
                daemon_id=self.daemon_id,
                socket_path=self.socket_path,
                config_file=self.config.file,
                store_kind=store.kind,
                store_location=_store_location(self.config),
            )
            server = Server(
                {
                    **Ops(service, info, notifier).table(),
                    **ReportOps(service, info, notifier).table(),
                },
                limits=Limits(half_line_timeout=self.config.server.half_line_timeout),
                on_close=service.unbind_connection,
            )
            reloader = ConfigReloader(
                self.config,
                self.config_path,
                functools.partial(self._apply_config, service, server, info),
                notify=self.notify,
                ready_status=self._ready_status(store.kind),
            )
            server.handlers["reload"] = reloader.reload_op
            try:
                await self._serve(service, server, state, ready, reloader, notifier=notifier)
            finally:
                with anyio.CancelScope(shield=True):
                    await store.aclose()
                    if notifier is not None:
                        await notifier.aclose()
        logger.info("daemon stopped: daemon_id=%s", self.daemon_id)
        return exitcodes.OK

    async def _serve(
        self,
        service: LeaseService,
        server: Server,
        state: LocalState,
        ready: Callable[[], None] | None,
        reloader: ConfigReloader,
        notifier: Notifier | None = None,
    ) -> None:
        async with anyio.create_task_group() as task_group:
            await task_group.start(service.run)
            if notifier is not None:
                await task_group.start(notifier.run)
            await self._resume(service, state)

            listeners: list[SocketListener] = []
            async with anyio.create_task_group() as connections:
                inode = await self._listen(server, connections, listeners)
                assert self._stop is not None
                # Started before READY=1, so that a SIGHUP right after it reloads, not kills.
                await task_group.start(self._watch_signals, reloader, task_group)
                task_group.start_soon(self._guard_socket, server, connections, listeners, inode)
                task_group.start_soon(reloader.watch, self._stop)
                task_group.start_soon(self.notify.run_watchdog)
                logger.info(
                    "daemon started: version=%s pid=%d daemon_id=%s socket=%s store=%s",
                    __version__,
                    os.getpid(),
                    self.daemon_id,
                    self.socket_path,
                    service.store.kind,
                )
                self.notify.ready(self._ready_status(service.store.kind))
                if ready is not None:
                    ready()
                await self._stop.wait()

                logger.info("stopping: no new connections")
                self.notify.stopping("stopping: keeping the leases of running deploys")
                for listener in listeners:
                    await listener.aclose()
                kept = await service.stop()
                state.save_kept(
                    self.socket_path, [_kept_record(held, binding) for held, binding in kept]
                )
                state.save_owed(service.unlocked.owed)
                if notifier is not None:
                    await notifier.flush(NOTIFIER_FLUSH_TIMEOUT)
                if self.listening is None:
                    _remove_socket(self.socket_path, self._socket_inode)
                connections.cancel_scope.cancel()
            task_group.cancel_scope.cancel()

    async def _listen(
        self, server: Server, connections: TaskGroup, listeners: list[SocketListener]
    ) -> int:
        """Serve the socket from systemd, or create the socket file; return the file's inode."""
        if self.listening is not None and not listeners:
            raw = self.listening
        else:
            raw = bind_listener(self.socket_path)
        listener = await SocketListener.from_socket(raw)
        listeners.append(listener)
        connections.start_soon(server.serve, listener, connections)
        self._socket_inode = os.lstat(self.socket_path).st_ino
        return self._socket_inode

    async def _guard_socket(
        self,
        server: Server,
        connections: TaskGroup,
        listeners: list[SocketListener],
        inode: int,
    ) -> None:
        """Create the socket file again if someone deletes it, so clients can still connect.

        Without this, a daemon whose socket file was removed keeps running and
        holding the daemon lock, and no client can reach it or replace it.
        """
        while True:
            await anyio.sleep(SOCKET_CHECK_INTERVAL)
            if self._stop is not None and self._stop.is_set():
                return  # the stop sequence removes the socket file on purpose
            try:
                info = os.lstat(self.socket_path)
            except FileNotFoundError:
                info = None
            except OSError as exc:
                logger.warning("cannot check the socket file %s: %s", self.socket_path, exc)
                continue
            if info is not None and info.st_ino == inode:
                continue
            if info is not None:
                logger.error(
                    "the socket file %s was replaced by another file; leaving it alone, so "
                    "clients cannot reach this daemon (pid %d) until it is removed",
                    self.socket_path,
                    os.getpid(),
                )
                continue
            if self.listening is not None:
                logger.error(
                    "the socket file %s from systemd was deleted, so clients cannot reach this "
                    "daemon (pid %d); run 'systemctl --user restart deployd.socket "
                    "deployd.service'",
                    self.socket_path,
                    os.getpid(),
                )
                return
            logger.warning("the socket file %s was deleted; creating it again", self.socket_path)
            try:
                inode = await self._listen(server, connections, listeners)
            except StartupError as exc:
                logger.error("cannot create the socket file again: %s", exc)

    def _ready_status(self, store_kind: str) -> str:
        """Return the status line that systemd shows for a daemon that serves."""
        return f"serving {self.socket_path} (store: {store_kind}, pid {os.getpid()})"

    def _apply_config(
        self, service: LeaseService, server: Server, info: DaemonInfo, config: Config
    ) -> None:
        """Put a reloaded config in force; new leases, connections and log lines use it."""
        previous = self.config
        self.config = config
        service.update_config(config)
        server.limits = replace(server.limits, half_line_timeout=config.server.half_line_timeout)
        info.config_file = config.file
        if config.log != previous.log:
            configure_logging(config)

    async def _watch_signals(
        self,
        reloader: ConfigReloader,
        task_group: TaskGroup,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    logger.info("received SIGHUP: reloading the configuration")
                    task_group.start_soon(reloader.reload_quietly, "SIGHUP")
                    continue
                logger.info("received %s", signal.Signals(signum).name)
                self.request_stop()
                return

    async def _resume(self, service: LeaseService, state: LocalState) -> None:
        """Resume leases kept by the previous daemon whose holders still run."""
        service.unlocked.owe(state.take_owed())
        boot_id = LocalState.boot_id()
        now = time.monotonic()
        for kept in state.take_kept(self.socket_path):
            lease = kept.lease
            alive = tuple(identity for identity in kept.processes if is_alive(identity))
            valid = kept.boot_id == boot_id and (
                kept.unlocked_since is not None or now < kept.confirmed_at + kept.timings.ttl
            )
            if alive and valid:
                held = HeldLease(
                    lease=lease,
                    timings=kept.timings,
                    binding=None,
                    confirmed_at=kept.confirmed_at,
                    next_renew_at=now,
                    granted_at=now,
                    waited=kept.waited,
                    takeover=kept.takeover,
                    unlocked_since=kept.unlocked_since,
                    unlocked_reason=kept.unlocked_reason,
                    next_upgrade_at=now if kept.unlocked_since is not None else None,
                )
                binding = Binding(lease_id=lease.holder, kind=kept.binding_kind, key=kept.key)
                binding.processes = {identity.pid: identity for identity in alive}
                service.adopt(held, binding)
                continue
            # A 'deployd run' client gives the lease up as lost at the renew
            # deadline, so from then on its record is 'lost', matching its exit code 76.
            told_lost = kept.binding_kind == "connection" and (
                now >= kept.confirmed_at + kept.timings.renew_deadline
            )
            if valid and not told_lost:
                why = "its holder exited"
                outcome = Outcome(OutcomeStatus.ABANDONED, detail=f"holder gone: {why}")
            elif valid:
                why = "no daemon renewed it by the renew deadline, and its holder exited"
                outcome = Outcome(OutcomeStatus.LOST, detail=why)
            else:
                why = "it expired while no daemon renewed it"
                if not alive:
                    why += ", and its holder exited"
                outcome = Outcome(OutcomeStatus.LOST, detail=why)
            logger.info(
                "not resuming kept lease: lock=%s session=%s: %s", lease.lock, lease.holder, why
            )
            # An expired lease is released as well, so its record does not show
            # "running" until the next grant of the lock.
            if kept.unlocked_since is not None:
                held = HeldLease(
                    lease=lease,
                    timings=kept.timings,
                    binding=None,
                    confirmed_at=now,
                    next_renew_at=now,
                    granted_at=now,
                    waited=kept.waited,
                    unlocked_since=kept.unlocked_since,
                    unlocked_reason=kept.unlocked_reason,
                )
                service.unlocked.record(held, outcome)
            else:
                try:
                    with anyio.fail_after(self.config.store.timeout):
                        await service.store.release(lease, outcome)
                except (StoreError, TimeoutError) as exc:
                    logger.warning("release of a kept lease failed: lock=%s: %s", lease.lock, exc)


def _kept_record(held: HeldLease, binding: Binding) -> KeptLease:
    return KeptLease(
        lease=held.lease,
        timings=held.timings,
        binding_kind=binding.kind,
        processes=tuple(binding.processes.values()),
        confirmed_at=held.confirmed_at,
        boot_id=LocalState.boot_id(),
        waited=held.waited,
        takeover=held.takeover,
        unlocked_since=held.unlocked_since if held.degraded else None,
        unlocked_reason=held.unlocked_reason if held.degraded else None,
        key=binding.key,
    )


def _remove_socket(path: str, inode: int | None) -> None:
    """Remove the socket file at ``path`` if it is still the one this daemon created."""
    try:
        if inode is not None and os.lstat(path).st_ino != inode:
            logger.info("leaving %s alone: it is no longer this daemon's socket file", path)
            return
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            logger.warning("cannot remove the socket file %s: %s", path, exc)


def _store_location(config: Config) -> str:
    if config.store.kind == "sqlite":
        return config.store.sqlite_path(config.state_dir)
    # The project the store uses; load_config rejects a Firestore store without one.
    resolved = firestore_project(config.store)
    project = resolved[0] if resolved else "(no project)"
    return f"{project}/{config.store.database}/{config.store.namespace}"


def configure_logging(config: Config) -> None:
    """Send log records to stderr, or to the configured file, at the configured level."""
    handler: logging.Handler
    if config.log.file:
        os.makedirs(os.path.dirname(config.log.file), exist_ok=True)
        handler = logging.FileHandler(config.log.file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # The format shows no caller, thread or process, so records skip collecting
    # them, with the switches that the "Optimization" section of Python's
    # logging HOWTO lists. Finding the caller walks the stack for every record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())


# The next steps after a config error that stops the start. The client that
# started the daemon shows them with the error.
CONFIG_FIX = (
    "'deployd config check' lists every invalid key, and the next deployd command after the "
    "fix starts the daemon"
)


def serve_main(config_path: str | None = None) -> int:
    """Run the daemon in the foreground; the entry point of ``deployd serve``."""
    from deployd.config import Config, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        # An invalid config names no log file or level to trust: log to stderr,
        # which is deployd.log for a daemon that a client started.
        configure_logging(Config())
        return _start_failed(f"{exc}; {CONFIG_FIX}", exitcodes.CONFIG)
    configure_logging(config)
    for warning in environment_warnings():
        logger.warning("%s", warning)
    try:
        socket_path = paths.socket_path()
        listening = take_listening_socket()
    except (ActivationError, paths.PathError) as exc:
        return _start_failed(str(exc), exitcodes.CONFIG)
    notify = NotifySocket.from_environment()
    try:
        daemon = Daemon(config, socket_path, config_path, listening, notify)
        try:
            return anyio.run(daemon.run)
        except BaseExceptionGroup as group:
            # Task groups wrap errors; report the first one the user can act on.
            raise _first_reportable(group) from group
    except StartupError as exc:
        return _start_failed(str(exc), exc.exit_code)
    except paths.PathError as exc:
        return _start_failed(str(exc), exitcodes.CONFIG)
    except ConfigError as exc:
        # The Slack credentials, read once the store is open.
        return _start_failed(f"{exc}; {CONFIG_FIX}", exitcodes.CONFIG)
    except DeploydError as exc:
        return _start_failed(str(exc), exitcodes.for_error_code(exc.code))
    except KeyboardInterrupt:
        return exitcodes.OK
    except (OSError, sqlite3.Error) as exc:
        logger.exception("daemon failed")
        print(f"deployd serve: failed: {exc}; see the log for details", file=sys.stderr)
        return exitcodes.INTERNAL


def _start_failed(message: str, exit_code: int) -> int:
    """Log why the daemon cannot start, print it for the client that started it, return the code.

    A client that started this daemon quotes the ``deployd serve:`` line from
    the daemon's stderr (``deployd_client.autostart``), so it stays one line.
    """
    if exit_code == exitcodes.BUSY:
        # Another daemon already serves the socket: clients that start one at
        # the same moment race, and the losers end here, which is harmless.
        logger.info("not starting: %s", message)
    else:
        logger.error("cannot start: %s", message)
    print(f"deployd serve: {message}", file=sys.stderr)
    return exit_code


def _first_reportable(group: BaseExceptionGroup) -> BaseException:
    """Return the first StartupError or DeploydError in ``group``, else its first error."""
    for exception in group.exceptions:
        if isinstance(exception, BaseExceptionGroup):
            found = _first_reportable(exception)
        else:
            found = exception
        if isinstance(found, StartupError | DeploydError | paths.PathError):
            return found
    first = group.exceptions[0]
    return _first_reportable(first) if isinstance(first, BaseExceptionGroup) else first
