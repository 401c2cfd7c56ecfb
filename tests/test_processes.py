"""Tests for deployd.processes on real processes, signals and pid reuse.

Run as a script, this module reuses a pid inside the PID namespace it was started
in and prints the results of its checks as JSON. test_pid_reuse_in_new_namespace
runs it that way under ``unshare``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from deployd.processes import (
    ProcessIdentity,
    ancestors,
    identify,
    is_alive,
    parent_pid,
    wait_for_exit,
)

LINUX = sys.platform.startswith("linux")
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")

# Every async test runs under this bound, so a wait that never returns fails the
# test instead of hanging the suite.
WAIT_LIMIT_SECONDS = 10

# A poll interval longer than any test runs. A polling wait that returns within
# WAIT_LIMIT_SECONDS with it has returned on its first check.
FIRST_CHECK_ONLY_INTERVAL = 3600.0

# Attempts to get an old pid back when other processes may take pids meanwhile.
PID_REUSE_ATTEMPTS = 20

requires_linux = pytest.mark.skipif(not LINUX, reason="reads /proc, which only Linux provides")

WAIT_MODES = [
    pytest.param(False, id="notification"),
    pytest.param(True, id="polling"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- helpers -------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill and reap a child that the test started."""
    if process.poll() is None:
        process.kill()
    process.wait()


def _kill_if_alive(identity: ProcessIdentity | None) -> None:
    """Kill a process the test started but cannot reap, unless its pid is now another's."""
    if identity is not None and is_alive(identity):
        with contextlib.suppress(ProcessLookupError):
            os.kill(identity.pid, signal.SIGKILL)


def _start_sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def _start_orphan() -> int:
    """Start `sleep 60` as a grandchild whose shell has exited, so the test is not its parent."""
    result = subprocess.run(
        ["sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        check=True,
        timeout=WAIT_LIMIT_SECONDS,
    )
    return int(result.stdout)


def _open_pidfd_count() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            if "pidfd" in os.readlink(f"/proc/self/fd/{name}"):
                count += 1
    return count


def _start_ticks(pid: int) -> int:
    """Read field 22 of /proc/PID/stat: the process's start, in clock ticks since boot."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 1 :].split()[19])


def _current_ticks() -> int:
    # The kernel derives starttime from the same clock, truncated to whole ticks.
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * ticks_per_second // 1_000_000_000


def _wait_for_next_tick(start_ticks: int) -> None:
    """Wait until the clock tick of start_ticks has passed.

    A start time is only exact to one tick, so a process started in the same tick
    with the same pid could not be distinguished. Real pid reuse takes far longer
    than a tick, but this test reuses a pid within milliseconds.
    """
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while _current_ticks() <= start_ticks:
        assert time.monotonic() < deadline, "the boot clock did not advance"
        time.sleep(0.001)


def _write_ns_last_pid(pid: int) -> None:
    NS_LAST_PID.write_text(str(pid), encoding="ascii")


def _start_sleeper_with_reused_pid() -> tuple[ProcessIdentity, subprocess.Popen[bytes]]:
    """Start a sleeper, kill and reap it, then start another that gets its pid.

    Return the first sleeper's identity and the second sleeper. The next pid the
    kernel hands out is set through ns_last_pid, which needs CAP_SYS_ADMIN. Another
    process may take the pid in between, so the whole sequence is retried.
    """
    for _ in range(PID_REUSE_ATTEMPTS):
        old = _start_sleeper()
        try:
            old_identity = identify(old.pid)
            assert old_identity is not None
            _wait_for_next_tick(_start_ticks(old.pid))
        finally:
            _stop(old)

        _write_ns_last_pid(old.pid - 1)
        new = _start_sleeper()
        if new.pid == old.pid:
            return old_identity, new
        _stop(new)
    pytest.fail(f"no new process got an old pid back in {PID_REUSE_ATTEMPTS} attempts")


def _skip_unless_ns_last_pid_writable() -> None:
    if not LINUX:
        pytest.skip("pid reuse is forced through Linux's ns_last_pid")
    if os.geteuid() != 0:
        pytest.skip("writing ns_last_pid needs root")
    if not NS_LAST_PID.exists():
        pytest.skip(f"{NS_LAST_PID} is missing (kernel without CONFIG_CHECKPOINT_RESTORE)")
    try:
        _write_ns_last_pid(int(NS_LAST_PID.read_text(encoding="ascii")))
    except OSError as exc:
        pytest.skip(f"writing {NS_LAST_PID} was rejected: {exc}")


# --- ProcessIdentity -----------------------------------------------------------------


def test_identity_json_round_trip() -> None:
    identity = ProcessIdentity(pid=1234, start_time="boot:5678")

    restored = ProcessIdentity.from_json(json.loads(json.dumps(identity.to_json())))

    assert restored == identity


@pytest.mark.parametrize(
    "data",
    [
        {"start_time": "boot:1"},
        {"pid": "12", "start_time": "boot:1"},
        {"pid": True, "start_time": "boot:1"},
        {"pid": 0, "start_time": "boot:1"},
        {"pid": 12},
        {"pid": 12, "start_time": ""},
        {"pid": 12, "start_time": 5},
    ],
)
def test_identity_from_json_rejects_invalid(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        ProcessIdentity.from_json(data)


def test_identity_rejects_non_positive_pid() -> None:
    with pytest.raises(ValueError, match="invalid pid -5"):
        ProcessIdentity(pid=-5, start_time="boot:1")


# --- identify and is_alive -----------------------------------------------------------


def test_identify_current_process() -> None:
    first = identify(os.getpid())
    second = identify(os.getpid())

    assert first is not None
    assert first.pid == os.getpid()
    assert first == second
    assert is_alive(first)


@pytest.mark.parametrize("pid", [0, -1])
def test_identify_rejects_non_positive_pid(pid: int) -> None:
    with pytest.raises(ValueError, match="invalid pid"):
        identify(pid)


def test_identify_running_child() -> None:
    child = _start_sleeper()
    try:
        identity = identify(child.pid)

        assert identity is not None
        assert identity.pid == child.pid
        assert is_alive(identity)
        assert parent_pid(child.pid) == os.getpid()
    finally:
        _stop(child)


def test_reaped_child_is_not_alive() -> None:
    child = _start_sleeper()
    try:
        identity = identify(child.pid)
        assert identity is not None
    finally:
        _stop(child)

    assert not is_alive(identity)
    assert identify(child.pid) is None


def test_zombie_child_is_not_alive() -> None:
    """A dead holder whose parent has not reaped it yet must count as exited."""
    child = _start_sleeper()
    try:
        identity = identify(child.pid)
        assert identity is not None

        child.kill()
        # WNOWAIT waits for the exit but leaves the child unreaped, as a zombie.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)

        assert identify(child.pid) is None
        assert not is_alive(identity)
        assert parent_pid(child.pid) == os.getpid()
    finally:
        _stop(child)


@requires_linux
def test_identify_parses_command_name_with_parentheses() -> None:
    """Fields are counted after the last ")", so a name that looks like fields is skipped.

    Counting after the first ")" would read state "Z" and parent 1 from this name.
    """
    name = "x) Z 1 (y"
    script = f'printf "%s" "{name}" > /proc/$$/comm; echo ready; read line'
    shell = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert shell.stdout is not None
        assert shell.stdout.readline() == b"ready\n"
        assert Path(f"/proc/{shell.pid}/comm").read_text() == f"{name}\n"

        identity = identify(shell.pid)

        assert identity is not None
        assert is_alive(identity)
        assert parent_pid(shell.pid) == os.getpid()
    finally:
        assert shell.stdin is not None
        shell.stdin.close()
        assert shell.stdout is not None
        shell.stdout.close()
        _stop(shell)


# --- parent_pid and ancestors --------------------------------------------------------


def test_parent_pid_of_init_is_none() -> None:
    assert parent_pid(1) is None


def test_ancestors_of_grandchild_contain_test_process() -> None:
    shell = subprocess.Popen(
        ["sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & echo $!; wait"],
        stdout=subprocess.PIPE,
    )
    grandchild: ProcessIdentity | None = None
    try:
        assert shell.stdout is not None
        grandchild_pid = int(shell.stdout.readline())
        grandchild = identify(grandchild_pid)

        chain = ancestors(grandchild_pid)

        assert chain[0] == shell.pid
        assert os.getpid() in chain
        assert grandchild_pid not in chain
    finally:
        _kill_if_alive(grandchild)
        assert shell.stdout is not None
        shell.stdout.close()
        _stop(shell)


def test_ancestors_of_exited_process_are_empty() -> None:
    child = _start_sleeper()
    _stop(child)

    assert ancestors(child.pid) == []


# --- wait_for_exit -------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("force_polling", WAIT_MODES)
async def test_wait_for_exit_returns_after_sigkill(force_polling: bool) -> None:
    """The wait ends when a process that is not the test's child is killed while it waits."""
    pid = _start_orphan()
    identity = identify(pid)
    try:
        assert identity is not None
        with anyio.fail_after(WAIT_LIMIT_SECONDS):
            async with anyio.create_task_group() as group:
                wait = functools.partial(wait_for_exit, force_polling=force_polling)
                group.start_soon(wait, identity, 0.05)
                await anyio.wait_all_tasks_blocked()

                os.kill(pid, signal.SIGKILL)

        assert not is_alive(identity)
    finally:
        _kill_if_alive(identity)


@pytest.mark.anyio
@pytest.mark.parametrize("force_polling", WAIT_MODES)
async def test_wait_for_exit_returns_for_reaped_child(force_polling: bool) -> None:
    child = _start_sleeper()
    try:
        identity = identify(child.pid)
        assert identity is not None
    finally:
        _stop(child)

    with anyio.fail_after(WAIT_LIMIT_SECONDS):
        await wait_for_exit(identity, FIRST_CHECK_ONLY_INTERVAL, force_polling=force_polling)


@pytest.mark.anyio
async def test_wait_for_exit_rejects_non_positive_interval() -> None:
    identity = identify(os.getpid())
    assert identity is not None

    with pytest.raises(ValueError, match="invalid poll_interval"):
        await wait_for_exit(identity, 0)


@requires_linux
@pytest.mark.anyio
async def test_finished_wait_closes_pidfd() -> None:
    pid = _start_orphan()
    identity = identify(pid)
    # Pidfds, not all descriptors: the event loop and its worker threads may
    # open others meanwhile, depending on which tests ran before.
    pidfds_before = _open_pidfd_count()
    try:
        assert identity is not None
        with anyio.fail_after(WAIT_LIMIT_SECONDS):
            async with anyio.create_task_group() as group:
                group.start_soon(wait_for_exit, identity)
                await anyio.wait_all_tasks_blocked()
                assert _open_pidfd_count() == pidfds_before + 1

                os.kill(pid, signal.SIGKILL)

        assert _open_pidfd_count() == pidfds_before
    finally:
        _kill_if_alive(identity)


@requires_linux
@pytest.mark.anyio
async def test_cancelled_wait_closes_pidfd() -> None:
    child = _start_sleeper()
    pidfds_before = _open_pidfd_count()
    try:
        identity = identify(child.pid)
        assert identity is not None
        with anyio.fail_after(WAIT_LIMIT_SECONDS):
            async with anyio.create_task_group() as group:
                group.start_soon(wait_for_exit, identity)
                await anyio.wait_all_tasks_blocked()
                assert _open_pidfd_count() == pidfds_before + 1

                group.cancel_scope.cancel()

        assert _open_pidfd_count() == pidfds_before
        assert is_alive(identity)
    finally:
        _stop(child)


@pytest.mark.anyio
async def test_cancelled_polling_wait_ends() -> None:
    child = _start_sleeper()
    try:
        identity = identify(child.pid)
        assert identity is not None
        with anyio.fail_after(WAIT_LIMIT_SECONDS):
            async with anyio.create_task_group() as group:
                group.start_soon(wait_for_exit, identity, 0.05)
                await anyio.wait_all_tasks_blocked()

                group.cancel_scope.cancel()

        assert is_alive(identity)
    finally:
        _stop(child)


@requires_linux
@pytest.mark.anyio
async def test_wait_polls_when_pidfd_open_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pidfd_open rejects a thread id that is not a process with EINVAL, so the wait polls.

    /proc still lists the thread, so it reads as alive until the thread ends.
    """
    release = threading.Event()
    thread = threading.Thread(target=release.wait, args=(WAIT_LIMIT_SECONDS,))
    thread.start()
    try:
        assert thread.native_id is not None
        identity = identify(thread.native_id)
        assert identity is not None

        with anyio.fail_after(WAIT_LIMIT_SECONDS):
            async with anyio.create_task_group() as group:
                group.start_soon(wait_for_exit, identity, 0.05)
                await anyio.wait_all_tasks_blocked()
                assert "pidfd_open failed for pid" in caplog.text
                assert _open_pidfd_count() == 0

                release.set()
                thread.join()

        assert not is_alive(identity)
    finally:
        release.set()
        thread.join()


# --- pid reuse -----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("force_polling", WAIT_MODES)
async def test_pid_reuse_is_detected(force_polling: bool) -> None:
    """A new process with a dead holder's pid does not keep the holder alive.

    The kernel is made to give the new process the old pid for real, through
    ns_last_pid. The old identity must then read as dead, and wait_for_exit on it
    must return at once. For the pidfd this proves the identity check after
    pidfd_open, because the pidfd watches the new process, which runs on.
    """
    _skip_unless_ns_last_pid_writable()
    old_identity, new = _start_sleeper_with_reused_pid()
    try:
        new_identity = identify(new.pid)

        assert new_identity is not None
        assert new_identity.pid == old_identity.pid
        assert new_identity.start_time != old_identity.start_time
        assert not is_alive(old_identity)
        with anyio.fail_after(WAIT_LIMIT_SECONDS):
            await wait_for_exit(
                old_identity, FIRST_CHECK_ONLY_INTERVAL, force_polling=force_polling
            )
        assert is_alive(new_identity)
    finally:
        _stop(new)


@requires_linux
def test_pid_reuse_in_new_namespace() -> None:
    """Pid reuse is detected inside a fresh PID namespace, where no other process takes pids.

    This runs the same scenario as test_pid_reuse_is_detected without racing the
    rest of the machine, and where ns_last_pid of the main namespace is read-only.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")

    command = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child"]
    command += [sys.executable, __file__]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.communicate()

    if runner.returncode != 0 and stderr.startswith(b"unshare:"):
        pytest.skip(f"creating a PID namespace was rejected: {stderr.decode().strip()}")
    assert runner.returncode == 0, stderr.decode()
    report = json.loads(stdout)

    assert report["new_pid"] == report["old_pid"]
    assert report["new_identified"]
    assert report["start_times_differ"]
    assert not report["old_alive"]
    assert report["notification_wait_returned"]
    assert report["polling_wait_returned"]


async def _returns_at_once(identity: ProcessIdentity, force_polling: bool) -> bool:
    with anyio.move_on_after(WAIT_LIMIT_SECONDS):
        await wait_for_exit(identity, FIRST_CHECK_ONLY_INTERVAL, force_polling=force_polling)
        return True
    return False


def _report_pid_reuse() -> dict[str, Any]:
    """Reuse a pid in the current PID namespace and return the results of the checks."""
    old_identity, new = _start_sleeper_with_reused_pid()
    try:
        new_identity = identify(new.pid)
        return {
            "old_pid": old_identity.pid,
            "new_pid": new.pid,
            "new_identified": new_identity is not None,
            "start_times_differ": (
                new_identity is not None and new_identity.start_time != old_identity.start_time
            ),
            "old_alive": is_alive(old_identity),
            "notification_wait_returned": anyio.run(_returns_at_once, old_identity, False),
            "polling_wait_returned": anyio.run(_returns_at_once, old_identity, True),
        }
    finally:
        _stop(new)


if __name__ == "__main__":
    print(json.dumps(_report_pid_reuse()))
