"""A first end-to-end check: a daemon, a run, a busy lock."""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import DaemonProcess, Workstation, wait_until


def test_run_passes_exit_code(workstation: Workstation, daemon: DaemonProcess) -> None:
    result = workstation.deployd("run", "api", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr


def test_status_lists_lock(workstation: Workstation, daemon: DaemonProcess) -> None:
    workstation.deployd("run", "api", "--", "true")
    result = workstation.deployd("status", "--json")
    assert result.returncode == 0, result.stderr
    assert '"api"' in result.stdout


def test_grant_logged_before_end(workstation: Workstation, daemon: DaemonProcess) -> None:
    """The grant's line is written after the response, but still before the lease's end."""
    result = workstation.deployd("run", "api", "--", "true")
    assert result.returncode == 0, result.stderr

    def lines() -> list[str]:
        log = workstation.log_file.read_text(errors="replace").splitlines()
        return [line for line in log if "lease granted: lock=api" in line or "lease ended" in line]

    logged = wait_until(lambda: len(lines()) == 2 and lines())
    assert "lease granted: lock=api" in logged[0]
    assert "token=1" in logged[0]
    assert "lease ended: lock=api" in logged[1]


def test_installed_command_flushes_and_exits(
    workstation: Workstation, daemon: DaemonProcess
) -> None:
    """The installed script ends with os._exit; output must still arrive in full."""
    script = Path(sys.executable).parent / "deployd"
    assert script.exists(), f"the deployd script is not installed next to {sys.executable}"
    result = subprocess.run(
        [str(script), "acquire", "api", "--pid", str(os.getpid()), "--format", "json"],
        env=workstation.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lock"] == "api"

    result = subprocess.run(
        [str(script), "run", "web", "--", "sh", "-c", "echo out; exit 3"],
        env=workstation.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "out\n"
