"""A first end-to-end check: a daemon, a run, a busy lock."""

from harness import DaemonProcess, Workstation


def test_run_passes_exit_code(workstation: Workstation, daemon: DaemonProcess) -> None:
    result = workstation.deployd("run", "api", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr


def test_status_lists_lock(workstation: Workstation, daemon: DaemonProcess) -> None:
    workstation.deployd("run", "api", "--", "true")
    result = workstation.deployd("status", "--json")
    assert result.returncode == 0, result.stderr
    assert '"api"' in result.stdout
