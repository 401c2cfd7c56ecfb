"""What people see of Slack delivery: the messages' fallback text, stats, status, doctor, the log.

Real daemons and clients post to the fake Slack in ``slack_server``, which
is made to reject the token, fail requests with HTTP 500 or lack a scope.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import DaemonProcess, Workstation, wait_until
from slack_server import SlackServer

LOCK = "api"
# People's text that Slack would read as a channel-wide mention and a link.
COMMIT = "<!channel>"
REASON = "<https://evil|click> @here"


@pytest.fixture
def slack() -> Iterator[SlackServer]:
    """Return a running fake Slack; it is stopped after the test."""
    with SlackServer() as server:
        yield server


def bot_workstation(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    token: str | None = None,
    **settings: Any,
) -> Workstation:
    """Return a workstation whose daemon posts to ``slack`` with a bot token."""
    workstation = make_workstation()
    token_file = workstation.root / "slack-token"
    token_file.write_text((token or slack.token) + "\n")
    token_file.chmod(0o600)
    workstation.write_config(
        {
            "slack": {
                "token_file": str(token_file),
                "api_url": slack.api_url,
                "timeout": "2s",
                **settings,
            }
        }
    )
    return workstation


def notifications(workstation: Workstation) -> dict[str, Any]:
    result: dict[str, Any] = workstation.status()["notifications"]
    return result


def assert_escaped(text: str) -> None:
    """Fail when ``text`` carries COMMIT or REASON unescaped, or lacks their escaped forms."""
    assert "<!channel>" not in text
    assert "<https://evil|click>" not in text
    assert "&lt;!channel&gt;" in text
    assert "&lt;https://evil|click&gt; @here" in text


# --- escaping ---


def test_fallback_text_escaped_for_bot(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = bot_workstation(make_workstation, slack)
    start(workstation)

    result = workstation.deployd("run", LOCK, "--commit", COMMIT, "--reason", REASON, "--", "false")

    assert result.returncode == 1, result.stderr
    slack.wait_for(lambda: slack.calls("chat.update"))
    started = slack.calls("chat.postMessage")[0]
    assert_escaped(started.params["text"])
    update = slack.calls("chat.update")[0]
    assert "<!channel>" not in update.params["text"]
    assert "&lt;!channel&gt;" in update.params["text"]
    assert_escaped(json.dumps(started.params["blocks"]))


def test_fallback_text_escaped_for_webhook(
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

    result = workstation.deployd("run", LOCK, "--commit", COMMIT, "--reason", REASON, "--", "false")

    assert result.returncode == 1, result.stderr
    slack.wait_for(lambda: len(slack.calls("webhook")) == 2)
    for call in slack.calls("webhook"):
        assert_escaped(call.params["text"])


# --- stats ---


def test_stats_rate_counts_parked_messages(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = bot_workstation(make_workstation, slack, token="xoxb-revoked-0000")
    start(workstation)
    for _ in range(2):
        result = workstation.deployd("run", LOCK, "--", "true")
        assert result.returncode == 0, result.stderr
    wait_until(lambda: notifications(workstation)["parked"] == 6)

    stats = json.loads(workstation.deployd("stats", "--json").stdout)
    text = workstation.deployd("stats").stdout

    delivery = stats["notifications"]
    assert delivery["parked"] == 6
    assert delivery["sent"] == 0
    assert delivery["delivery_rate"] == 0.0
    assert delivery["problem"]["error"] == "invalid_auth"
    assert "slack        0% of messages delivered (6 parked)" in text
    assert "STOPPED: Slack rejected auth.test: invalid_auth" in text
    assert "fix: the bot token is not valid" in text


def test_stats_rate_counts_failed_messages(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = bot_workstation(make_workstation, slack)
    start(workstation)
    slack.fail_next(1, status=200, error="msg_too_long", methods={"chat.postMessage"})

    result = workstation.deployd("run", LOCK, "--", "true")

    assert result.returncode == 0, result.stderr
    wait_until(lambda: notifications(workstation)["queued"] == 0, timeout=30)
    delivery = json.loads(workstation.deployd("stats", "--json").stdout)["notifications"]
    # The started post failed, so the update of it was skipped; the reply went out.
    assert (delivery["sent"], delivery["failed"], delivery["skipped"]) == (1, 1, 1)
    assert delivery["delivery_rate"] == round(1 / 3, 4)
    assert delivery["problem"] is None


# --- status and doctor after a dropped message ---


def test_dropped_message_shows_error_and_fix(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    """A post that got no response and cannot be looked up is dropped; status and doctor show it."""
    workstation = bot_workstation(make_workstation, slack, channel=slack.channel_id)
    start(workstation)
    slack.fail_next(1, status=500, error="internal_error", methods={"chat.postMessage"})
    slack.fail_next(None, error="missing_scope", methods={"conversations.history"})

    result = workstation.deployd("run", LOCK, "--", "true")

    assert result.returncode == 0, result.stderr
    wait_until(lambda: notifications(workstation)["failed"] == 1, timeout=30)
    health = notifications(workstation)
    status = workstation.deployd("status")
    doctor = workstation.deployd("doctor")

    assert health["last_error"] == (
        "cannot read the channel to check whether an unanswered post reached it "
        "(conversations.history: missing_scope)"
    )
    assert health["last_error_fix"].startswith("give the Slack app the channels:history")
    assert isinstance(health["last_error_at"], float)
    assert "1 failed" in status.stdout
    assert "         last error at " in status.stdout
    assert "(conversations.history: missing_scope)" in status.stdout
    assert "         fix: give the Slack app the channels:history" in status.stdout
    assert doctor.returncode == 0, doctor.stdout
    slack_line = next(line for line in doctor.stdout.splitlines() if "slack" in line)
    assert slack_line.startswith("warn  slack"), doctor.stdout
    assert "1 message not delivered in the last 7 days" in slack_line
    assert "fix: give the Slack app the channels:history" in doctor.stdout


# --- the log ---


def test_retry_log_names_method_and_status(
    make_workstation: Callable[..., Workstation],
    slack: SlackServer,
    start: Callable[..., DaemonProcess],
) -> None:
    workstation = bot_workstation(make_workstation, slack, channel=slack.channel_id)
    daemon = start(workstation)
    slack.wait_for(lambda: slack.calls("auth.test"))
    slack.fail_next(1, status=500, error="oops", methods={"chat.postMessage"})
    slack.fail_next(1, status=500, error="oops", methods={"conversations.history"})

    result = workstation.deployd("run", LOCK, "--", "true")

    assert result.returncode == 0, result.stderr
    wait_until(lambda: notifications(workstation)["sent"] == 3, timeout=30)
    retries = [line for line in daemon.log().splitlines() if "Slack request failed" in line]
    assert len(retries) == 2, retries
    assert retries[0].endswith("attempt=1: chat.postMessage: HTTP 500, error oops"), retries
    assert retries[1].endswith(
        "lookup before attempt=2: conversations.history: HTTP 500, error oops"
    ), retries
    labels = [re.search(r"session=\S+ (.*?attempt=\d+):", line) for line in retries]
    assert all(labels), retries
    assert len({label.group(1) for label in labels if label}) == len(retries), retries
