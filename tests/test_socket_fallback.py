"""Without XDG_RUNTIME_DIR (cron, ``sudo -u``), the client and the daemon agree on the socket.

The processes run under ``env -i`` with only PATH and HOME, as cron starts
them, so both sides fall back to ``/run/user/UID`` or ``/tmp/deployd-UID``.
Those are real, shared paths, so each case runs in a private mount
namespace (``unshare --mount``) with fresh tmpfs mounts on ``/tmp`` and
``/run/user``: nothing a developer runs there is touched. That needs root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

# Runs inside the new mount namespace: mounts the private /tmp and /run/user,
# starts the daemon and the clients with 'env -i', prints a JSON report, and
# stops every daemon it learnt of by pid.
DRIVER = r"""
import ctypes, json, os, signal, subprocess, sys, time

case, python, keep = sys.argv[1], sys.argv[2], sys.argv[3:]
uid = os.getuid()
os.makedirs("/run/user", exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run/user"], check=True)
# A checkout or virtual environment under /tmp would be hidden by the new tmpfs,
# so each such top-level directory is bind-mounted back from the host /tmp.
kept_dirs = sorted({"/tmp/" + p.split("/")[2] for p in keep if p.startswith("/tmp/")})
if kept_dirs:
    os.mkdir("/run/user/.host-tmp")
    subprocess.run(["mount", "--bind", "/tmp", "/run/user/.host-tmp"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp"], check=True)
for kept in kept_dirs:
    os.mkdir(kept)
    source = "/run/user/.host-tmp/" + kept.split("/")[2]
    subprocess.run(["mount", "--bind", source, kept], check=True)
if case == "run-user":
    os.mkdir(f"/run/user/{uid}", 0o700)
home = "/tmp/home"
os.mkdir(home, 0o700)
bare = ["env", "-i", f"PATH={os.environ['PATH']}", f"HOME={home}"]
deployd = [python, "-m", "deployd_client"]
report = {"uid": uid}
daemons = []

def die_with_parent():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

def client(*args, extra=()):
    result = subprocess.run(
        [*bare, *extra, *deployd, *args], capture_output=True, text=True, timeout=60
    )
    return result.returncode, result.stdout, result.stderr

def wait_status(extra=()):
    deadline = time.monotonic() + 20
    while True:
        code, out, err = client("status", "--json", extra=extra)
        if code == 0:
            return json.loads(out)
        if time.monotonic() > deadline:
            raise SystemExit(f"status failed: {code} {err}")
        time.sleep(0.05)

try:
    if case == "autostart":
        status = wait_status()
        daemons.append(status["daemon"]["pid"])
        report["first"] = status["daemon"]
        report["second"] = wait_status()["daemon"]
    else:
        log = open(f"{home}/serve.log", "wb")
        serve = subprocess.Popen(
            [*bare, *deployd, "serve"], stdout=log, stderr=log, preexec_fn=die_with_parent
        )
        daemons.append(serve.pid)
        report["serve_pid"] = serve.pid
        report["cron"] = wait_status(extra=["DEPLOYD_NO_AUTOSTART=1"])["daemon"]
        if case == "run-user":
            login = [f"XDG_RUNTIME_DIR=/run/user/{uid}", "DEPLOYD_NO_AUTOSTART=1"]
            report["login"] = wait_status(extra=login)["daemon"]
    probe = subprocess.run(
        [*bare, python, "-c", "from deployd_client import paths; print(paths.socket_path())"],
        capture_output=True, text=True, check=True,
    )
    report["client_path"] = probe.stdout.strip()
finally:
    for pid in daemons:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.05)
print(json.dumps(report))
"""


def private_namespace_problem() -> str | None:
    """Return why a private mount namespace cannot be made here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "mount namespaces exist on Linux only"
    if os.geteuid() != 0:
        return "a private mount namespace with tmpfs mounts needs root"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount (util-linux) is missing"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"unshare --mount was rejected: {probe.stderr.strip()}"
    return None


needs_private_namespace = pytest.mark.skipif(
    private_namespace_problem() is not None, reason=str(private_namespace_problem())
)


def paths_to_keep() -> list[str]:
    """Return the paths the clients need: the interpreter, its environment and this checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [
        os.path.abspath(sys.executable),
        os.path.realpath(sys.executable),
        sys.prefix,
        sys.base_prefix,
        repo,
    ]


def run_case(case: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            DRIVER,
            case,
            sys.executable,
            *paths_to_keep(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


@needs_private_namespace
def test_env_i_uses_tmp_fallback() -> None:
    report = run_case("tmp")

    expected = f"/tmp/deployd-{report['uid']}/deployd.sock"
    assert report["client_path"] == expected
    assert report["cron"]["socket"] == expected
    assert report["cron"]["pid"] == report["serve_pid"]


@needs_private_namespace
def test_env_i_uses_run_user_fallback() -> None:
    """With /run/user/UID present, a cron client and a login shell reach the same daemon."""
    report = run_case("run-user")

    expected = f"/run/user/{report['uid']}/deployd/deployd.sock"
    assert report["client_path"] == expected
    assert report["cron"]["socket"] == expected
    assert report["cron"]["pid"] == report["serve_pid"]
    assert report["login"]["socket"] == expected
    assert report["login"]["pid"] == report["serve_pid"]


@needs_private_namespace
def test_env_i_client_autostarts_daemon_it_finds() -> None:
    report = run_case("autostart")

    expected = f"/tmp/deployd-{report['uid']}/deployd.sock"
    assert report["first"]["socket"] == expected
    assert report["second"]["pid"] == report["first"]["pid"]
