"""Nested calls: a deploy's own helpers take the same lock again and join its lease.

A script under ``deployd run api`` gets DEPLOYD_LEASE_ID and DEPLOYD_LOCK.
Its ``deployd run api`` and ``deployd acquire api`` join that lease: no
deadlock, no second grant, record or token, and the outer lease stays held
until the outer command ends. Another lock is taken the normal way. A lease
id of a lease that ended falls back to a normal acquire, and a nested call
whose outer lease was lost exits 76.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import DaemonProcess, Gate, Workstation, wait_until
from report_rigs import (
    DEPLOYD_COMMAND,
    deployd_wrapper,
    history,
    record_of,
    run_deploy,
    session_of,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "deploy-service.sh"
JOINED = "deployd: joined the lease on api of the deploy this runs under"
# Prints the lease that the shell runs under: lock, lease id, fencing token, depth.
LEASE_LINE = (
    'printf "%s %s %s %s\\n" '
    '"$DEPLOYD_LOCK" "$DEPLOYD_LEASE_ID" "$DEPLOYD_FENCING_TOKEN" "$DEPLOYD_LEASE_DEPTH"'
)


def lease_line(path: Path) -> list[str]:
    """Return lock, lease id, fencing token and depth as a command under a lease wrote them."""
    return path.read_text().split()


def lock_entry(status: dict[str, Any], lock: str) -> dict[str, Any] | None:
    for entry in status["locks"]:
        if entry["lock"] == lock:
            found: dict[str, Any] = entry
            return found
    return None


def test_nested_run_and_acquire_join_lease(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    out = tmp_path / "out"
    out.mkdir()
    q = shlex.quote
    write_lease = q(LEASE_LINE + ' > "$0"')
    script = f"""
set -e
$DEPLOYD run api -- sh -c {write_lease} {q(str(out / "run.txt"))} 2> {q(str(out / "run.err"))}
lease=$($DEPLOYD acquire api --format env 2> {q(str(out / "acquire.err"))})
eval "$lease"
{LEASE_LINE} > {q(str(out / "acquire.txt"))}
$DEPLOYD release "$DEPLOYD_LEASE_ID" --exit-code 0 2> {q(str(out / "release.err"))}
$DEPLOYD status --json > {q(str(out / "status.json"))}
"""
    outer = run_deploy(workstation, tmp_path / "outer", "api", script=script, timeout=60)

    assert outer.returncode == 0, outer.stderr
    assert outer.session_id is not None
    nested_run = lease_line(out / "run.txt")
    acquired = lease_line(out / "acquire.txt")
    assert nested_run[0] == acquired[0] == "api"
    assert session_of(nested_run[1]) == session_of(acquired[1]) == outer.session_id
    assert nested_run[2] == acquired[2] == "1"
    assert nested_run[3] == acquired[3] == "2"
    assert (out / "run.err").read_text() == JOINED + "\n"
    assert (out / "acquire.err").read_text() == JOINED + "\n"
    assert (out / "release.err").read_text() == (
        "deployd: api was joined, not taken, here; the deploy that took it releases it\n"
    )
    # After the nested calls ended, the outer deploy still held its lease.
    inside = lock_entry(json.loads((out / "status.json").read_text()), "api")
    assert inside is not None
    assert inside["held"] is True
    assert inside["lease"]["session_id"] == outer.session_id
    assert inside["token"] == 1

    [record] = history(workstation, "api")
    assert record["session_id"] == outer.session_id
    assert record["token"] == 1
    assert record["outcome"] == "succeeded"
    after = lock_entry(workstation.status(), "api")
    assert after is not None
    assert after["held"] is False
    assert after["token"] == 1


def example_environment(tmp_path: Path) -> dict[str, str]:
    """Return what examples/deploy-service.sh needs to run its stand-ins at once."""
    return {
        "DEPLOYD": str(deployd_wrapper(tmp_path / "bin")),
        "DEPLOY_DRY_RUN": "1",
        "DEPLOY_STEP_SECONDS": "0",
        "DEPLOY_COMMIT": "abc1234",
        "DEPLOY_WAIT": "10s",
    }


def served_revision(stderr: str) -> str:
    """Return the revision that the example script says Cloud Run serves."""
    match = re.search(r"Cloud Run serves revision (\S+)", stderr)
    assert match is not None, stderr
    return match.group(1)


def test_example_script_under_run_joins_lease(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    environment = example_environment(tmp_path)

    outer = run_deploy(
        workstation,
        tmp_path / "outer",
        "api",
        "--commit",
        "abc1234",
        script=f"{shlex.quote(str(EXAMPLE))} api",
        environment=environment,
        timeout=60,
    )

    assert outer.returncode == 0, outer.stderr
    assert JOINED in outer.stderr
    assert "api was joined, not taken, here" in outer.stderr
    assert outer.session_id is not None
    assert f"got the lock: lease {outer.session_id}+" in outer.stderr
    assert "fencing token 1" in outer.stderr
    [record] = history(workstation, "api")
    assert record["session_id"] == outer.session_id
    assert record["token"] == 1
    assert record["outcome"] == "succeeded"
    assert record["revision"] == served_revision(outer.stderr)


def test_nested_call_of_other_lock_takes_it(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    environment = example_environment(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    q = shlex.quote
    script = f"""
set -e
$DEPLOYD run web -- sh -c {q(LEASE_LINE + ' > "$0"')} {q(str(out / "web.txt"))}
{q(str(EXAMPLE))} web
$DEPLOYD status --json > {q(str(out / "status.json"))}
"""

    outer = run_deploy(
        workstation, tmp_path / "outer", "api", script=script, environment=environment, timeout=60
    )

    assert outer.returncode == 0, outer.stderr
    assert "joined" not in outer.stderr
    web_run = lease_line(out / "web.txt")
    assert web_run[0] == "web"
    assert web_run[2] == "1"
    assert web_run[3] == "1"
    web_records = history(workstation, "web")
    assert [record["token"] for record in web_records] == [2, 1]
    assert [record["outcome"] for record in web_records] == ["succeeded", "succeeded"]
    assert session_of(web_run[1]) == web_records[1]["session_id"]
    assert web_records[0]["revision"] == served_revision(outer.stderr)
    assert web_records[0]["purpose"]["commit"] == "abc1234"
    # The outer lease of api was held all along, and was its only record.
    inside = lock_entry(json.loads((out / "status.json").read_text()), "api")
    assert inside is not None
    assert inside["lease"]["session_id"] == outer.session_id
    [api_record] = history(workstation, "api")
    assert api_record["session_id"] == outer.session_id


def test_ended_outer_lease_falls_back_to_acquire(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    first = run_deploy(workstation, tmp_path / "first", "api")
    assert first.returncode == 0, first.stderr
    stale_id = (tmp_path / "first" / "lease-id").read_text()
    never_held = "nobody@nowhere_20200101T000000Z_zzzzzz"

    results = []
    for index, stale in enumerate((stale_id, never_held)):
        results.append(
            run_deploy(
                workstation,
                tmp_path / f"again-{index}",
                "api",
                environment={
                    "DEPLOYD_LEASE_ID": stale,
                    "DEPLOYD_LOCK": "api",
                    "DEPLOYD_LEASE_DEPTH": "2",
                },
            )
        )
    acquire_env = workstation.env(DEPLOYD_LEASE_ID=stale_id, DEPLOYD_LOCK="api")
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        acquired = workstation.deployd(
            "acquire", "api", "--pid", str(sleeper.pid), "--format", "json", env=acquire_env
        )
        lease = json.loads(acquired.stdout) if acquired.returncode == 0 else {}
        released = workstation.deployd("release", lease.get("lease_id", "-"), env=acquire_env)
    finally:
        sleeper.kill()
        sleeper.wait()

    for result in results:
        assert result.returncode == 0, result.stderr
        assert "joined" not in result.stderr
    assert acquired.returncode == 0, acquired.stderr
    assert "joined" not in acquired.stderr
    assert lease["depth"] == 1
    assert lease["token"] == 4
    assert released.returncode == 0, released.stderr
    assert "released api (released)" in released.stderr
    records = history(workstation, "api")
    assert [record["token"] for record in records] == [4, 3, 2, 1]
    assert [record["session_id"] for record in records[1:3]] == [
        results[1].session_id,
        results[0].session_id,
    ]


def test_nested_call_after_outer_lease_lost_exits_76(
    workstation: Workstation, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    start(workstation)
    gate = Gate(tmp_path / "gate")
    out = tmp_path / "out"
    out.mkdir()
    q = shlex.quote
    script = f"""
read line < {q(str(gate.path))}
$DEPLOYD run api -- true 2> {q(str(out / "run.err"))}
echo $? > {q(str(out / "run.code"))}
$DEPLOYD acquire api --format env > /dev/null 2> {q(str(out / "acquire.err"))}
echo $? > {q(str(out / "acquire.code"))}
"""
    outer_directory = tmp_path / "outer"
    outer_directory.mkdir()
    with open(outer_directory / "stderr", "wb") as stderr:
        outer = workstation.spawn(
            "run",
            "api",
            "--on-lost",
            "warn",
            "--",
            "sh",
            "-c",
            script,
            env=workstation.env(DEPLOYD=DEPLOYD_COMMAND),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_until(lambda: (lock_entry(workstation.status(), "api") or {}).get("held"))
        forced = workstation.deployd("force-unlock", "api", "--reason", "stuck", "--yes")
        assert forced.returncode == 0, forced.stderr
        wait_until(lambda: "lost" in (outer_directory / "stderr").read_text())
        gate.open()
        outer.wait(60)
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait(10)

    outer_stderr = (outer_directory / "stderr").read_text()
    assert outer.returncode == 76, outer_stderr
    assert (out / "run.code").read_text().strip() == "76"
    assert (out / "acquire.code").read_text().strip() == "76"
    for name in ("run.err", "acquire.err"):
        line = (out / name).read_text()
        assert line.count("\n") == 1, line
        assert "forced away by" in line, line
        assert "stuck" in line, line
    records = history(workstation, "api")
    assert len(records) == 1
    assert records[0]["outcome"] == "forced"
    session = records[0]["session_id"]
    assert record_of(workstation, session) == records[0]
