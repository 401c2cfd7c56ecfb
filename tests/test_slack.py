"""Slack notifications from real daemons, against the fake Slack in ``slack_server``.

The only stand-in is Slack itself: daemons, clients, the example deploy
script and slack-sdk are real, and slack-sdk reaches the fake through
``slack.api_url``. The tests cover the thread of one deploy, rate limits,
a hanging Slack, a killed daemon, rejected credentials, credentials file
modes, and that no token ever shows up in logs or status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProcess, Workstation, wait_until
from slack_server import SlackServer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "deploy-service.sh"
LOCK = "api"


@pytest.fixture
def slack() -> Iterator[SlackServer]:
    """Return a running fake Slack; it is stopped after the test."""
    with SlackServer() as server:
        yield server


def slack_settings(
    workstation: Workstation,
    slack: SlackServer,
    token: str | None = None,
    mode: int = 0o600,
    **extra: Any,
) -> dict[str, Any]:
    """Write a token file into ``workstation`` and return the ``[slack]`` settings for it."""
    token_file = workstation.root / "slack-token"
    token_file.write_text((token or slack.token) + "\n")
    token_file.chmod(mode)
    return {"token_file": str(token_file), "api_url": slack.api_url, "timeout": "2s", **extra}


@pytest.fixture
def slack_workstation(
    make_workstation: Callable[..., Workstation], slack: SlackServer
) -> Workstation:
    """Return a workstation whose daemon posts to the fake Slack with a valid token."""
    workstation = make_workstation()
    workstation.write_config({"slack": slack_settings(workstation, slack)})
    return workstation


@pytest.fixture
def slack_daemon(
    slack_workstation: Workstation, start: Callable[..., DaemonProcess]
) -> DaemonProcess:
    """Return the running daemon of ``slack_workstation``."""
    return start(slack_workstation)


def top_level(slack: SlackServer) -> list[Any]:
    return [message for message in slack.posts() if message.thread_ts is None]


def replies(slack: SlackServer, parent_ts: str) -> list[Any]:
    return [message for message in slack.posts() if message.thread_ts == parent_ts]


def assert_each_message_once(slack: SlackServer) -> None:
    """Fail when any outbox message (by the id in its metadata) is in the channel twice."""
    uids = [message.uid for message in slack.posts() if message.uid is not None]
    duplicates = {uid for uid in uids if uids.count(uid) > 1}
    assert not duplicates, f"messages posted more than once: {duplicates}"


def deploy_finished(slack: SlackServer, replies_expected: int = 1, deploys: int = 1) -> bool:
    """Return whether each deploy's thread holds its outcome: an updated top post and replies."""
    tops = top_level(slack)
    if len(tops) != deploys:
        return False
    return all(top.edits and len(replies(slack, top.ts)) >= replies_expected for top in tops)


def outbox_empty(workstation: Workstation) -> bool:
    """Return whether the daemon has recorded every message as sent (or given up)."""
    health = notifications(workstation)
    return health["queued"] == 0 and health["parked"] == 0


def notifications(workstation: Workstation) -> dict[str, Any]:
    result: dict[str, Any] = workstation.status()["notifications"]
    return result


def deployd_wrapper(directory: Path) -> Path:
    """Write a ``deployd`` command that runs this interpreter's deployd_client."""
    wrapper = directory / "deployd"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m deployd_client "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


# --- one deploy, one thread ---


def test_example_deploy_threads_its_messages(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    env = slack_workstation.env(
        DEPLOY_DRY_RUN="1",
        DEPLOY_STEP_SECONDS="1",
        DEPLOY_COMMIT="abc1234",
        DEPLOYD=str(deployd_wrapper(slack_workstation.root)),
    )
    result = subprocess.run(
        ["bash", str(EXAMPLE), LOCK], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    served = re.search(r"Cloud Run serves revision (\S+)", result.stderr)
    assert served is not None, result.stderr
    revision = served.group(1)

    slack.wait_for(lambda: deploy_finished(slack, replies_expected=2))
    (top,) = top_level(slack)
    assert top.edits[0]["text"].startswith(f":rocket: Deploying {LOCK} (abc1234)")
    assert "by " in top.edits[0]["text"]
    assert top.text.startswith(f":white_check_mark: Deployed {LOCK} ({revision}) in ")
    thread = replies(slack, top.ts)
    assert thread[0].text.startswith(f":package: {LOCK} is serving revision {revision}")
    assert thread[1].text.startswith(f":white_check_mark: Deployed {LOCK} ({revision})")

    methods = [call.method for call in slack.calls() if call.method != "auth.test"]
    assert methods == ["chat.postMessage", "chat.postMessage", "chat.update", "chat.postMessage"]
    update = slack.calls("chat.update")[0]
    assert update.params["channel"] == slack.channel_id
    assert update.params["ts"] == top.ts
    assert_each_message_once(slack)


def test_event_reports_revision_for_run_outcome(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    wrapper = deployd_wrapper(slack_workstation.root)
    result = slack_workstation.deployd(
        "run", LOCK, "--", str(wrapper), "event", LOCK, "deployed", "--revision", "api-00042-xyz"
    )
    assert result.returncode == 0, result.stderr

    slack.wait_for(lambda: deploy_finished(slack, replies_expected=2))
    (top,) = top_level(slack)
    # deployd run releases without a revision; the reported one is used.
    assert top.text.startswith(f":white_check_mark: Deployed {LOCK} (api-00042-xyz)")


def test_event_from_other_shell_is_rejected(
    slack_workstation: Workstation, slack_daemon: DaemonProcess
) -> None:
    holder = slack_workstation.spawn("run", LOCK, "--", "sleep", "30")
    try:
        wait_until(lambda: slack_workstation.status()["leases"], timeout=20)
        result = slack_workstation.deployd("event", LOCK, "deployed", "--revision", "r1")
        assert result.returncode == 77, result.stderr
        assert "not by this shell" in result.stderr
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.communicate(timeout=20)


def test_event_without_lease_is_rejected(
    slack_workstation: Workstation, slack_daemon: DaemonProcess
) -> None:
    result = slack_workstation.deployd("event", LOCK, "deployed", "--revision", "r1")
    assert result.returncode == 77, result.stderr
    assert "not held by a deploy on this workstation" in result.stderr


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"event": "deployed"}, "needs a revision"),
        ({"event": "rolled-back", "revision": "r1"}, "unknown event 'rolled-back'"),
        ({"revision": "r1"}, "missing field 'event'"),
        ({"event": "deployed", "revision": 42}, "revision must be a string"),
    ],
)
def test_event_op_rejects_bad_fields(
    slack_workstation: Workstation,
    slack_daemon: DaemonProcess,
    fields: dict[str, Any],
    problem: str,
) -> None:
    response = slack_workstation.request("event", lock=LOCK, **fields)
    assert response["ok"] is False
    assert response["error"]["code"] == "invalid_argument"
    assert problem in response["error"]["message"]


@pytest.mark.parametrize("tail", ["one line", [1, 2], {"a": "b"}])
def test_release_rejects_bad_output_tail(
    slack_workstation: Workstation, slack_daemon: DaemonProcess, tail: Any
) -> None:
    response = slack_workstation.request("release", lock=LOCK, exit_code=1, output_tail=tail)
    assert response["ok"] is False
    assert response["error"]["code"] == "invalid_argument"
    assert "output_tail must be an array of strings" in response["error"]["message"]


def test_failed_run_sends_captured_output(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    script = "for i in $(seq 1 30); do echo line-$i; done; echo oops >&2; exit 2"
    result = slack_workstation.deployd("run", LOCK, "--capture-output", "--", "sh", "-c", script)
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == [f"line-{i}" for i in range(1, 31)]
    assert "oops" in result.stderr

    slack.wait_for(lambda: deploy_finished(slack))
    (top,) = top_level(slack)
    assert top.text.startswith(f":x: Deploy of {LOCK} failed with exit code 2")
    (reply,) = replies(slack, top.ts)
    code = reply.blocks[-1]["text"]["text"]
    assert "line-12\n" in code
    assert "line-11\n" not in code
    assert "oops" in code


def test_waiting_deploy_posts_and_updates_wait(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    first = slack_workstation.spawn("run", LOCK, "--commit", "aaa1111", "--", "sleep", "2")
    try:
        slack.wait_for(lambda: top_level(slack))
        second = slack_workstation.deployd(
            "run", LOCK, "--wait", "30s", "--commit", "bbb2222", "--", "true"
        )
        assert second.returncode == 0, second.stderr
    finally:
        first.communicate(timeout=30)

    slack.wait_for(lambda: len(top_level(slack)) == 3 and outbox_empty(slack_workstation))
    first_top, waiting, second_top = top_level(slack)
    assert first_top.text.startswith(f":white_check_mark: Deployed {LOCK} (aaa1111)")
    announced = waiting.edits[0]["text"]
    assert announced.startswith(":hourglass_flowing_sand: ")
    assert f"is waiting to deploy {LOCK} (bbb2222)" in announced
    assert "held by" in announced
    assert "and is deploying now" in waiting.text
    assert second_top.text.startswith(f":white_check_mark: Deployed {LOCK} (bbb2222)")


def test_force_unlock_lands_in_holders_thread(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    holder = slack_workstation.spawn("run", LOCK, "--", "sleep", "30")
    try:
        slack.wait_for(lambda: top_level(slack))
        result = slack_workstation.deployd("force-unlock", LOCK, "--reason", "stuck", "--yes")
        assert result.returncode == 0, result.stderr
    finally:
        holder.communicate(timeout=30)
    assert holder.returncode == 76

    (top,) = top_level(slack)
    slack.wait_for(lambda: len(replies(slack, top.ts)) >= 2 and top.edits)
    texts = [reply.text for reply in replies(slack, top.ts)]
    assert any("force-unlocked api" in text and "reason: stuck" in text for text in texts)
    assert top.text.startswith(f":warning: Lost the lock on {LOCK}")


# --- retries and ordering ---


def test_rate_limit_waits_retry_after(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    slack.fail_next(1, status=429, error="ratelimited", retry_after=2, methods={"chat.postMessage"})
    result = slack_workstation.deployd("run", LOCK, "--commit", "abc1234", "--", "true")
    assert result.returncode == 0, result.stderr

    slack.wait_for(lambda: deploy_finished(slack), timeout=30)
    posts = slack.calls("chat.postMessage")
    assert posts[0].status == 429
    assert posts[1].received_at - posts[0].received_at >= 2.0
    methods = [call.method for call in slack.calls() if call.method != "auth.test"]
    assert methods == ["chat.postMessage", "chat.postMessage", "chat.update", "chat.postMessage"]
    assert len(top_level(slack)) == 1
    assert_each_message_once(slack)


def test_server_errors_are_retried_in_order(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    slack.fail_next(2, status=500, error="internal_error", methods={"chat.postMessage"})
    result = slack_workstation.deployd("run", LOCK, "--", "true")
    assert result.returncode == 0, result.stderr

    slack.wait_for(lambda: deploy_finished(slack), timeout=30)
    assert len(top_level(slack)) == 1
    assert_each_message_once(slack)
    methods = [call.method for call in slack.calls() if call.method != "auth.test"]
    # A 500 may hide a stored post, so the sender looks before it posts again.
    assert "conversations.history" in methods
    assert methods.index("chat.update") > max(
        index for index, method in enumerate(methods) if method == "conversations.history"
    )


def time_runs(workstation: Workstation, count: int) -> list[float]:
    """Return the wall-clock seconds of ``count`` runs of ``deployd run LOCK -- true``."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        result = workstation.deployd("run", LOCK, "--", "true")
        times.append(time.monotonic() - started)
        assert result.returncode == 0, result.stderr
    return times


def test_hanging_slack_does_not_slow_deploys(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    quiet = make_workstation()
    with_slack = make_workstation()
    with_slack.write_config({"slack": slack_settings(with_slack, slack)})
    start(quiet)
    start(with_slack)
    slack.wait_for(lambda: slack.calls("auth.test"))
    slack.hang(30)

    without, hanging = [], []
    for _ in range(3):
        without += time_runs(quiet, 1)
        hanging += time_runs(with_slack, 1)
    # Generous: a run takes well under a second either way, while Slack hangs for 30 s.
    assert statistics.median(hanging) < statistics.median(without) + 2.0
    assert max(hanging) < 10.0

    # Let the first post time out on the daemon's side before Slack answers it.
    slack.wait_for(lambda: len(slack.calls()) >= 3, timeout=30)
    slack.release()
    slack.wait_for(lambda: deploy_finished(slack, deploys=3), timeout=60)
    assert_each_message_once(slack)
    for top in top_level(slack):
        assert len(replies(slack, top.ts)) == 1


# --- restarts ---


def test_killed_daemon_messages_sent_once_after_restart(
    slack_workstation: Workstation,
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    daemon = start(slack_workstation)
    slack.wait_for(lambda: slack.calls("auth.test"))
    slack.hang(None)
    result = slack_workstation.deployd("run", LOCK, "--commit", "abc1234", "--", "true")
    assert result.returncode == 0, result.stderr
    slack.wait_for(lambda: slack.calls("chat.postMessage"))

    daemon.kill()
    # The post the killed daemon sent is applied now, after its client is gone.
    slack.release()
    slack.wait_for(lambda: len(top_level(slack)) == 1)
    start(slack_workstation)

    slack.wait_for(lambda: deploy_finished(slack), timeout=30)
    wait_until(lambda: outbox_empty(slack_workstation))
    assert len(top_level(slack)) == 1
    assert_each_message_once(slack)
    assert slack.calls("conversations.history"), "the restarted daemon did not check history"
    health = notifications(slack_workstation)
    assert health["queued"] == 0
    assert health["sent"] == 3


def test_queued_messages_survive_sigkill(
    slack_workstation: Workstation,
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    daemon = start(slack_workstation)
    slack.wait_for(lambda: slack.calls("auth.test"))
    slack.fail_next(None, status=429, error="ratelimited", retry_after=600)
    for _ in range(2):
        result = slack_workstation.deployd("run", LOCK, "--", "true")
        assert result.returncode == 0, result.stderr
    wait_until(lambda: notifications(slack_workstation)["queued"] == 6)

    daemon.kill()
    slack.clear_failures()
    start(slack_workstation)

    slack.wait_for(lambda: deploy_finished(slack, deploys=2))
    assert_each_message_once(slack)
    for top in top_level(slack):
        assert len(replies(slack, top.ts)) == 1


# --- rejections ---


@pytest.mark.parametrize(
    ("channel", "token", "error", "requests"),
    [
        pytest.param(None, "xoxb-revoked-0000", "invalid_auth", {"auth.test": 1}, id="token"),
        pytest.param(
            "#no-such-channel",
            None,
            "channel_not_found",
            {"auth.test": 1, "chat.postMessage": 1},
            id="channel",
        ),
    ],
)
def test_rejection_parks_messages_once(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
    channel: str | None,
    token: str | None,
    error: str,
    requests: dict[str, int],
) -> None:
    workstation = make_workstation()
    extra = {"channel": channel} if channel else {}
    workstation.write_config({"slack": slack_settings(workstation, slack, token=token, **extra)})
    daemon = start(workstation)
    for _ in range(3):
        result = workstation.deployd("run", LOCK, "--", "true")
        assert result.returncode == 0, result.stderr
    wait_until(lambda: notifications(workstation)["parked"] == 9)
    time.sleep(1.0)  # a retry storm would show up as more requests by now

    counted = {method: len(slack.calls(method)) for method in requests}
    assert counted == requests
    assert len(slack.calls()) == sum(requests.values())
    errors = [line for line in daemon.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert error in errors[0]
    assert "fix:" in errors[0]
    health = notifications(workstation)
    assert health["problem"]["error"] == error
    status = workstation.deployd("status")
    assert "STOPPED" in status.stdout
    assert "fix:" in status.stdout


def test_parked_messages_sent_after_restart_with_good_token(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = make_workstation()
    workstation.write_config(
        {"slack": slack_settings(workstation, slack, token="xoxb-revoked-0000")}
    )
    daemon = start(workstation)
    result = workstation.deployd("run", LOCK, "--", "true")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: notifications(workstation)["parked"] == 3)
    daemon.stop()

    workstation.write_config({"slack": slack_settings(workstation, slack)})
    start(workstation)
    slack.wait_for(lambda: deploy_finished(slack))
    assert_each_message_once(slack)


# --- credentials ---


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
@pytest.mark.parametrize("key", ["token_file", "webhook_url_file"])
def test_open_credentials_file_refuses_start(
    workstation: Workstation, slack: SlackServer, key: str, mode: int
) -> None:
    secret_file = workstation.root / "slack-secret"
    secret_file.write_text(slack.token if key == "token_file" else slack.webhook_url)
    secret_file.chmod(mode)
    workstation.write_config({"slack": {key: str(secret_file), "api_url": slack.api_url}})

    result = workstation.deployd("serve", timeout=30)
    assert result.returncode == 78, result.stderr
    assert str(secret_file) in result.stderr
    assert f"chmod 600 {secret_file}" in result.stderr
    assert slack.token not in result.stderr
    assert not slack.calls()


def test_missing_token_file_refuses_start(workstation: Workstation) -> None:
    workstation.write_config({"slack": {"token_file": str(workstation.root / "absent")}})
    result = workstation.deployd("serve", timeout=30)
    assert result.returncode == 78, result.stderr
    assert "slack.token_file" in result.stderr
    assert "does not exist" in result.stderr


def test_secrets_never_in_log_or_status(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    bot = make_workstation()
    settings = slack_settings(bot, slack)
    bot.write_config({"slack": settings, "log": {"level": "debug"}})
    hook = make_workstation()
    hook_file = hook.root / "slack-webhook"
    hook_file.write_text(slack.webhook_url)
    hook_file.chmod(0o600)
    hook.write_config({"slack": {"webhook_url_file": str(hook_file)}, "log": {"level": "debug"}})
    daemons = [start(bot), start(hook)]
    # Errors whose texts reach the log and status: a 500 makes the bot check the
    # history, and makes the webhook drop a message it cannot check.
    slack.fail_next(1, status=500, error="internal_error", methods={"chat.postMessage"})
    slack.fail_next(1, status=500, error="internal_error", methods={"webhook"})

    outputs = []
    for workstation in (bot, hook):
        result = workstation.deployd("run", LOCK, "--", "false")
        outputs += [result.stdout, result.stderr]
    slack.wait_for(lambda: len(slack.calls("chat.update")) >= 1, timeout=30)
    slack.wait_for(lambda: len(slack.calls("webhook")) >= 2, timeout=30)
    for workstation in (bot, hook):
        outputs.append(workstation.deployd("status").stdout)
        outputs.append(workstation.deployd("status", "--json").stdout)
    outputs += [daemon.log() for daemon in daemons]

    secrets = [slack.token, slack.webhook_url, slack.webhook_url.rsplit("/", 1)[1]]
    for text in outputs:
        for secret in secrets:
            assert secret not in text
    assert "internal_error" in daemons[0].log()


def test_token_from_environment(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = make_workstation()
    workstation.environment["DEPLOYD_SLACK_TOKEN"] = slack.token
    workstation.write_config({"slack": {"api_url": slack.api_url}})
    daemon = start(workstation)

    result = workstation.deployd("run", LOCK, "--", "true")
    assert result.returncode == 0, result.stderr
    slack.wait_for(lambda: deploy_finished(slack))
    assert notifications(workstation)["credentials"] == "DEPLOYD_SLACK_TOKEN"
    assert slack.token not in daemon.log()


# --- webhook and Slack off ---


def test_webhook_posts_without_threads(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = make_workstation()
    hook_file = workstation.root / "slack-webhook"
    hook_file.write_text(slack.webhook_url + "\n")
    hook_file.chmod(0o600)
    workstation.write_config({"slack": {"webhook_url_file": str(hook_file)}})
    start(workstation)

    result = workstation.deployd("run", LOCK, "--commit", "abc1234", "--", "true")
    assert result.returncode == 0, result.stderr
    slack.wait_for(lambda: len(slack.posts()) == 2)
    started, finished = slack.posts()
    assert started.text.startswith(f":rocket: Deploying {LOCK} (abc1234)")
    assert finished.text.startswith(f":white_check_mark: Deployed {LOCK} (abc1234)")
    assert {call.method for call in slack.calls()} == {"webhook"}
    assert notifications(workstation)["mode"] == "webhook"


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/PID/maps")
def test_slack_off_loads_no_slack_library(workstation: Workstation, daemon: DaemonProcess) -> None:
    result = workstation.deployd("run", LOCK, "--", "true")
    assert result.returncode == 0, result.stderr
    health = notifications(workstation)
    assert health["configured"] is False
    assert "aiohttp" not in loaded_libraries(daemon.pid)
    status = workstation.deployd("status")
    assert "slack    off" in status.stdout


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/PID/maps")
def test_slack_on_loads_library_in_background(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    slack.wait_for(lambda: slack.calls("auth.test"))
    assert "aiohttp" in loaded_libraries(slack_daemon.pid)


def test_status_json_counts(
    slack_workstation: Workstation, slack: SlackServer, slack_daemon: DaemonProcess
) -> None:
    result = slack_workstation.deployd("run", LOCK, "--", "true")
    assert result.returncode == 0, result.stderr
    slack.wait_for(lambda: deploy_finished(slack))
    wait_until(lambda: outbox_empty(slack_workstation))
    status = json.loads(slack_workstation.deployd("status", "--json").stdout)
    health = status["notifications"]
    assert health["configured"] is True
    assert health["channel"] == "#daily-orchestration"
    assert health["channel_id"] == slack.channel_id
    assert (health["queued"], health["sent"], health["failed"]) == (0, 3, 0)
    assert health["oldest_queued_age"] is None
    assert os.path.basename(health["credentials"]) == "slack-token"
