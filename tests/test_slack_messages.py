"""The Slack notifier's parts without a daemon: message texts, link templates, the outbox's
send order, credentials and masking, and the cleaning of captured output."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from deployd.config import SlackConfig, load_config
from deployd.errors import ConfigError
from deployd.events import DeployEvent, EventKind
from deployd.handlers import _clean_output_line
from deployd.models import Owner, Purpose
from deployd.notifiers.credentials import Secret, load_credentials
from deployd.notifiers.messages import TOP, WAITING, Action, Draft, Links, plan_messages
from deployd.notifiers.outbox import Outbox, Row, State, pick_next

OWNER = Owner("ana", "build-7", 4242, "build-7-d1")
SESSION = "ana@build-7_20260204T101500Z_k3f9q2"


def event(kind: EventKind, commit: str | None = "abc1234", **details: Any) -> DeployEvent:
    return DeployEvent(
        kind=kind,
        lock="api",
        session_id=SESSION,
        owner=OWNER,
        purpose=Purpose(commit=commit, reason="fix login"),
        token=42,
        at=1_770_000_000.0,
        details=details,
    )


def plan(
    kind: EventKind, threaded: bool = True, links: Links | None = None, **details: Any
) -> list[Draft]:
    return plan_messages(event(kind, **details), threaded=threaded, links=links or Links())


def holder_json(user: str = "bob") -> dict[str, Any]:
    return {
        "holder": "bob@build-3_20260204T100000Z_aaaaaa",
        "owner": {"user": user, "host": "build-3", "pid": 7, "daemon_id": "d"},
        "purpose": {"commit": "fff0000", "reason": "hotfix"},
        "acquired_at": 1_770_000_000.0,
        "token": 41,
    }


# --- texts ---


def test_started_is_thread_parent() -> None:
    (draft,) = plan(EventKind.STARTED, takeover="free", waited=0.0)
    assert draft.action is Action.POST
    assert draft.ref == TOP
    assert draft.text.startswith(":rocket: Deploying api (abc1234) (by ana on build-7")
    assert draft.blocks[0]["text"]["text"] == ":rocket: Deploying *api* (abc1234)"
    context = draft.blocks[1]["elements"][0]["text"]
    assert "by *ana* on build-7" in context
    assert "reason: fix login" in context
    assert "fencing token 42" in context


def test_started_without_commit() -> None:
    (draft,) = plan(EventKind.STARTED, commit=None, takeover="free")
    assert draft.blocks[0]["text"]["text"] == ":rocket: Deploying *api*"


def test_started_after_wait_updates_waiting_post() -> None:
    drafts = plan_messages(
        event(EventKind.STARTED, takeover="free", waited=130.0),
        threaded=True,
        links=Links(),
        announced_wait=True,
    )
    assert [(draft.action, draft.ref) for draft in drafts] == [
        (Action.POST, TOP),
        (Action.UPDATE, WAITING),
    ]
    assert "waited 2m10s" in drafts[1].text


def test_started_marks_force_and_unlocked() -> None:
    (forced,) = plan(EventKind.STARTED, takeover="forced")
    assert "took the lock by force" in forced.text
    (unlocked,) = plan(EventKind.STARTED, takeover="free", unlocked=True)
    assert "WITHOUT a lock" in unlocked.text


def test_succeeded_updates_top_and_replies() -> None:
    drafts = plan(EventKind.SUCCEEDED, exit_code=0, revision="api-00042-xyz", duration=192.0)
    assert [(draft.action, draft.ref) for draft in drafts] == [
        (Action.UPDATE, TOP),
        (Action.REPLY, None),
    ]
    for draft in drafts:
        assert draft.text.startswith(":white_check_mark: Deployed api (api-00042-xyz) in 3m12s")
    assert "commit abc1234" in drafts[0].text


def test_failed_shows_exit_code_and_output() -> None:
    lines = [f"step {index}" for index in range(1, 31)] + ["error: <bad> & ```worse```"]
    drafts = plan(EventKind.FAILED, exit_code=2, duration=63.0, output_tail=lines)
    update, reply = drafts
    assert update.text.startswith(":x: Deploy of api (abc1234) failed with exit code 2 after 1m03s")
    code = reply.blocks[-1]["text"]["text"]
    assert code.startswith("```\n")
    assert code.endswith("\n```")
    assert "step 11" not in code
    assert "step 12" in code
    assert "error: &lt;bad&gt; &amp; '''worse'''" in code
    assert "step 30" in reply.text


def test_failed_output_fits_one_section() -> None:
    lines = ["x" * 300] * 20
    _, reply = plan(EventKind.FAILED, exit_code=1, duration=1.0, output_tail=lines)
    assert len(reply.blocks[-1]["text"]["text"]) <= 3000


def test_released_and_abandoned() -> None:
    released = plan(EventKind.RELEASED, duration=5.0)
    assert released[0].text.startswith(":white_circle: Released api (abc1234) after 5s")
    abandoned = plan(EventKind.ABANDONED, duration=5.0, detail="holder gone: its process exited")
    assert "ended without a report" in abandoned[0].text
    assert "holder gone: its process exited" in abandoned[0].text


def test_waiting_names_holder() -> None:
    (draft,) = plan(EventKind.WAITING, holder=holder_json(), position=2)
    assert draft.action is Action.POST
    assert draft.ref == WAITING
    assert draft.text.startswith(":hourglass_flowing_sand: ana is waiting to deploy api (abc1234)")
    assert "held by bob on build-3 since" in draft.text
    assert "place in line: 2" in draft.text
    assert "<!date^1770000000^{time}|" in draft.blocks[1]["elements"][0]["text"]


def test_forced_takeover_says_who_whom_why() -> None:
    (draft,) = plan(EventKind.FORCED, holder=holder_json(), force_reason="prod is down")
    assert draft.action is Action.REPLY
    assert draft.text.startswith(":warning: ana took api by force from bob on build-3")
    assert "reason: prod is down" in draft.text


def test_force_unlock_names_forcer() -> None:
    (draft,) = plan(
        EventKind.FORCED, holder=holder_json(), forced_by="carol@laptop", force_reason="stuck"
    )
    assert draft.text.startswith(":warning: carol@laptop force-unlocked api, taking it from bob")


@pytest.mark.parametrize(
    ("kind", "details", "start"),
    [
        (EventKind.DEPLOYED, {"revision": "api-7"}, ":package: api is serving revision api-7"),
        (EventKind.STALE_TAKEOVER, {"holder": holder_json()}, ":hourglass: ana took over api"),
        (EventKind.UNLOCKED, {"message": "store down"}, ":warning: api (abc1234) is being"),
        (EventKind.OVERLAP, {"message": "bob deployed too"}, ":rotating_light: Deploys of api"),
        (EventKind.MAX_HOLD, {"held_for": 1260.0, "max_hold": 1200.0}, ":hourglass_flowing"),
    ],
)
def test_thread_replies(kind: EventKind, details: dict[str, Any], start: str) -> None:
    (draft,) = plan(kind, **details)
    assert draft.action is Action.REPLY
    assert draft.text.startswith(start)


def test_lost_updates_top() -> None:
    drafts = plan(EventKind.LOST, message="renewals failed for 25s", holder=holder_json())
    assert [draft.action for draft in drafts] == [Action.UPDATE, Action.REPLY]
    assert drafts[0].text.startswith(":warning: Lost the lock on api (abc1234)")
    assert "now held by bob" in drafts[1].text


def test_webhook_plan_has_no_threads() -> None:
    drafts = plan(EventKind.SUCCEEDED, threaded=False, exit_code=0, revision="r1", duration=1.0)
    assert [(draft.action, draft.ref) for draft in drafts] == [(Action.POST, None)]
    assert "by ana on build-7" in drafts[0].text
    (waiting,) = plan(EventKind.WAITING, threaded=False, holder=holder_json())
    assert waiting.ref is None


def test_people_text_is_escaped() -> None:
    deploy = DeployEvent(
        kind=EventKind.STARTED,
        lock="api",
        session_id=SESSION,
        owner=OWNER,
        purpose=Purpose(commit="<!channel>", reason="<@U123> & co"),
        token=1,
        details={"takeover": "free"},
    )
    (draft,) = plan_messages(deploy, threaded=True, links=Links())
    rendered = str(draft.blocks)
    assert "<!channel>" not in rendered
    assert "<@U123>" not in rendered
    assert "&lt;@U123&gt; &amp; co" in rendered


@pytest.mark.parametrize("threaded", [True, False])
def test_fallback_text_is_escaped(threaded: bool) -> None:
    deploy = DeployEvent(
        kind=EventKind.FAILED,
        lock="api",
        session_id=SESSION,
        owner=OWNER,
        purpose=Purpose(commit="<!channel>", reason="<https://evil|click> @here"),
        token=1,
        details={"exit_code": 1, "duration": 2.0, "output_tail": ["<!here> & done"]},
    )
    drafts = plan_messages(deploy, threaded=threaded, links=Links())
    assert drafts
    for draft in drafts:
        assert "<!" not in draft.text
        assert "<https" not in draft.text
        assert "api (&lt;!channel&gt;)" in draft.text
    assert "&lt;!here&gt; &amp; done" in drafts[-1].text
    if not threaded:
        assert "reason: &lt;https://evil|click&gt; @here" in drafts[-1].text


def test_fallback_text_clip_keeps_entities_whole() -> None:
    lines = ["&" * 300] * 20
    drafts = plan(EventKind.FAILED, exit_code=1, duration=1.0, output_tail=lines)
    text = drafts[-1].text
    assert len(text) <= 4000
    assert text.endswith("&amp;…")


@pytest.mark.parametrize("kind", list(EventKind))
@pytest.mark.parametrize("threaded", [True, False])
def test_every_kind_has_a_message(kind: EventKind, threaded: bool) -> None:
    drafts = plan(kind, threaded=threaded)
    assert drafts
    assert all(draft.text and draft.blocks for draft in drafts)


# --- links ---


def test_links_fill_placeholders() -> None:
    links = Links(
        "https://github.com/org/repo/commit/{commit}",
        "https://console.cloud.google.com/run/detail/europe-west1/{service}/revisions"
        "?project=p&env={environment}&rev={revision}",
    )
    assert links.commit("prod:api", "abc1234") == "https://github.com/org/repo/commit/abc1234"
    assert links.revision("prod:api", "api-7", None) == (
        "https://console.cloud.google.com/run/detail/europe-west1/api/revisions"
        "?project=p&env=prod&rev=api-7"
    )
    assert links.commit("api", "a/b c") == "https://github.com/org/repo/commit/a%2Fb%20c"


def test_started_links_commit() -> None:
    links = Links("https://example.test/c/{commit}")
    (draft,) = plan(EventKind.STARTED, links=links, takeover="free")
    assert draft.blocks[0]["text"]["text"] == (
        ":rocket: Deploying *api* (<https://example.test/c/abc1234|abc1234>)"
    )
    assert "(abc1234)" in draft.text


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("commit_url", "https://x.test/{sha}", "uses {sha}"),
        ("commit_url", "https://x.test/{lock}", "must contain {commit}"),
        ("commit_url", "ftp://x.test/{commit}", "http:// or https://"),
        ("commit_url", "https://x.test/{commit", "not a valid template"),
        ("commit_url", "https://x.test/{commit!r}", "uses {commit}"),
        ("revision_url", "https://x.test/{commit}", "must contain {revision} or {service}"),
        ("api_url", "localhost:8080", "http:// or https://"),
        ("channel", "daily orchestration", "channel name"),
    ],
)
def test_slack_config_rejects(tmp_path: Path, key: str, value: str, problem: str) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[slack]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(str(config_file), environ={})
    assert f"slack.{key}" in str(raised.value)
    assert problem in str(raised.value)


def test_slack_config_accepts_templates(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        "[slack]\n"
        'commit_url = "https://github.com/org/repo/commit/{commit}"\n'
        'revision_url = "https://console.cloud.google.com/run/detail/r/{service}/revisions"\n'
        'timeout = "3s"\n'
    )
    config = load_config(str(config_file), environ={"DEPLOYD_SLACK_CHANNEL": "C0123ABCD"})
    assert config.slack.channel == "C0123ABCD"
    assert config.slack.timeout == 3.0
    assert config.slack.revision_url is not None


# --- the outbox's order ---


def row(row_id: int, session: str, action: Action, ref: str | None, due: float = 0.0) -> Row:
    return Row(row_id, f"uid{row_id}", session, "api", action, ref, False, 0, 0.0, None, due)


def choose(
    rows: list[Row], posted: set[tuple[str, str]] | None = None, now: float = 10.0
) -> tuple[Row | None, float | None]:
    """Run pick_next over ``rows`` (every queued message) as the outbox would feed it."""
    heads: dict[str, Row] = {}
    for item in sorted(rows, key=lambda item: item.id):
        heads.setdefault(item.session_id, item)

    def creator(session_id: str, ref: str) -> Row | None:
        posts = [
            r for r in rows if (r.session_id, r.ref, r.action) == (session_id, ref, Action.POST)
        ]
        return min(posts, key=lambda item: item.id, default=None)

    return pick_next(
        sorted(heads.values(), key=lambda item: item.id),
        lambda session_id, ref: (session_id, ref) in (posted or set()),
        creator,
        now,
    )


def test_pick_next_keeps_deploy_order() -> None:
    chosen, _ = choose([row(1, "a", Action.POST, TOP), row(2, "a", Action.UPDATE, TOP)])
    assert chosen is not None
    assert chosen.id == 1


def test_pick_next_lets_parent_go_first() -> None:
    rows = [row(1, "a", Action.REPLY, None), row(2, "a", Action.POST, TOP)]
    chosen, _ = choose(rows)
    assert chosen is not None
    assert chosen.id == 2
    chosen, _ = choose(rows[:1], posted={("a", TOP)})
    assert chosen is not None
    assert chosen.id == 1


def test_pick_next_reply_without_parent_goes_alone() -> None:
    chosen, _ = choose([row(1, "a", Action.REPLY, None)])
    assert chosen is not None
    assert chosen.id == 1


def test_pick_next_deploy_waits_for_retry() -> None:
    rows = [row(1, "a", Action.POST, TOP, due=50.0), row(2, "a", Action.REPLY, None)]
    chosen, wake_at = choose(rows)
    assert chosen is None
    assert wake_at == 50.0


def test_pick_next_other_deploys_go_on() -> None:
    chosen, wake_at = choose(
        [row(1, "a", Action.POST, TOP, due=50.0), row(2, "b", Action.POST, TOP)]
    )
    assert chosen is not None
    assert chosen.id == 2
    assert wake_at is None


def test_pick_next_oldest_deploy_first() -> None:
    chosen, _ = choose([row(3, "b", Action.POST, TOP), row(4, "a", Action.POST, TOP)])
    assert chosen is not None
    assert chosen.id == 3


def test_outbox_heads_one_per_deploy(tmp_path: Path) -> None:
    outbox = Outbox(str(tmp_path / "daemon.sqlite3"))
    first = outbox.add("a", "api", "x", plan(EventKind.SUCCEEDED, exit_code=0), now=1.0)
    second = outbox.add("b", "api", "x", plan(EventKind.STARTED), now=2.0)
    third = outbox.add("a", "api", "x", plan(EventKind.STARTED), now=3.0)
    assert [head.id for head in outbox.heads()] == [first[0], second[0]]
    outbox.mark_sent(first[0], "C1", "1.1", now=4.0)
    outbox.mark_sent(first[1], "C1", "1.2", now=4.0)
    assert [head.id for head in outbox.heads()] == [second[0], third[0]]
    creator = outbox.creator("a", TOP)
    assert creator is not None
    assert creator.id == third[0]
    assert not outbox.is_posted("a", TOP)
    outbox.close()


def test_outbox_round_trip(tmp_path: Path) -> None:
    outbox = Outbox(str(tmp_path / "daemon.sqlite3"))
    drafts = plan(EventKind.SUCCEEDED, exit_code=0, duration=1.0)
    first, second = outbox.add(SESSION, "api", "succeeded", drafts, now=100.0)
    assert [item.id for item in outbox.queued()] == [first, second]
    assert outbox.payload(first)["text"] == drafts[0].text

    outbox.begin_attempt(first, now=101.0)
    (unsure, _) = outbox.queued()
    assert unsure.unsure
    assert unsure.attempts == 1
    assert unsure.first_attempt_at == 101.0
    outbox.mark_sent(first, "C1", "1.000100", now=102.0)
    assert outbox.counts()[State.SENT] == 1
    assert outbox.park_queued("invalid_auth") == 1
    assert outbox.counts()[State.PARKED] == 1
    assert outbox.requeue(now=200.0) == 1
    assert outbox.oldest_queued() == 100.0
    outbox.close()


def test_outbox_posted_ts_stays_string(tmp_path: Path) -> None:
    outbox = Outbox(str(tmp_path / "daemon.sqlite3"))
    (post,) = outbox.add(SESSION, "api", "started", plan(EventKind.STARTED), now=1.0)
    outbox.mark_sent(post, "C1", "1770000000.000100", now=2.0)
    posted = outbox.posted(SESSION, TOP)
    assert posted is not None
    assert posted.ts == "1770000000.000100"
    outbox.close()


def test_outbox_prune_keeps_open_deploys(tmp_path: Path) -> None:
    outbox = Outbox(str(tmp_path / "daemon.sqlite3"))
    post, update, reply = outbox.add(
        SESSION, "api", "x", plan(EventKind.SUCCEEDED, exit_code=0) + plan(EventKind.STARTED), 1.0
    )
    outbox.mark_sent(post, "C1", "1.1", now=2.0)
    assert outbox.prune(before=10.0) == 0
    outbox.mark_sent(update, "C1", "1.1", now=2.0)
    outbox.mark_finished(reply, State.FAILED, "no", now=2.0)
    assert outbox.prune(before=10.0) == 3
    outbox.close()


def test_outbox_lives_beside_state_tables(tmp_path: Path) -> None:
    from deployd.state import LocalState

    path = str(tmp_path / "daemon.sqlite3")
    state = LocalState(path)
    outbox = Outbox(path)
    outbox.add(SESSION, "api", "started", plan(EventKind.STARTED), now=1.0)
    tables = {
        name
        for (name,) in sqlite3.connect(path).execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    }
    assert {"notifier_outbox", "notifier_channels", "kept_leases"} <= tables
    outbox.close()
    state.close()


# --- credentials and masking ---


def test_secret_is_masked() -> None:
    secret = Secret("xoxb-1234-5678-abcdef")
    assert "5678" not in str(secret)
    assert "5678" not in repr(secret)
    assert secret.reveal() == "xoxb-1234-5678-abcdef"
    assert secret.redact("token xoxb-1234-5678-abcdef failed") == "token xoxb-[masked] failed"


def test_webhook_url_is_masked() -> None:
    secret = Secret("https://hooks.slack.com/services/T0/B0/s3cr3t")
    assert str(secret) == "https://hooks.slack.com/[masked]"
    text = "Cannot connect to URL('https://hooks.slack.com/services/T0/B0/s3cr3t')"
    assert "s3cr3t" not in secret.redact(text)
    assert "s3cr3t" not in secret.redact("POST /services/T0/B0/s3cr3t failed")


def test_token_shaped_text_is_masked() -> None:
    assert "9999" not in Secret("xoxb-1").redact("other token xoxp-9999-abc")


def test_credentials_environment_wins(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("xoxb-from-file\n")
    token_file.chmod(0o600)
    config = SlackConfig(token_file=str(token_file))
    from_env = load_credentials(config, {"DEPLOYD_SLACK_TOKEN": "xoxb-from-env"})
    assert from_env is not None
    assert from_env.secret.reveal() == "xoxb-from-env"
    assert from_env.source == "DEPLOYD_SLACK_TOKEN"
    from_file = load_credentials(config, {})
    assert from_file is not None
    assert from_file.secret.reveal() == "xoxb-from-file"
    assert from_file.mode == "bot"


def test_credentials_token_beats_webhook() -> None:
    environ = {"SLACK_BOT_TOKEN": "xoxb-1", "DEPLOYD_SLACK_WEBHOOK_URL": "https://h.test/x"}
    credentials = load_credentials(SlackConfig(), environ)
    assert credentials is not None
    assert credentials.mode == "bot"
    webhook = load_credentials(SlackConfig(), {"DEPLOYD_SLACK_WEBHOOK_URL": "https://h.test/x"})
    assert webhook is not None
    assert webhook.mode == "webhook"


def test_credentials_off_without_token() -> None:
    assert load_credentials(SlackConfig(), {"DEPLOYD_SLACK_TOKEN": "  "}) is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "empty"),
        ("https://hooks.slack.com/services/x", "holds a URL"),
        ("xoxb-1\nxoxb-2", "several lines"),
    ],
)
def test_bad_token_file_rejected(tmp_path: Path, content: str, problem: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(content)
    token_file.chmod(0o600)
    with pytest.raises(ConfigError) as raised:
        load_credentials(SlackConfig(token_file=str(token_file)), {})
    assert problem in str(raised.value)
    assert "xoxb-2" not in str(raised.value)


def test_open_token_file_rejected(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("xoxb-1")
    token_file.chmod(0o640)
    with pytest.raises(ConfigError) as raised:
        load_credentials(SlackConfig(token_file=str(token_file)), {})
    assert f"chmod 600 {token_file}" in str(raised.value)
    assert "mode 0640" in str(raised.value)


# --- captured output ---


@pytest.mark.parametrize(
    ("line", "cleaned"),
    [
        ("\x1b[31mred\x1b[0m text", "red text"),
        ("10%\r50%\r100% done", "100% done"),
        ("a\tb", "a    b"),
        ("bell\x07 and \x1b]0;title\x07after", "bell and after"),
        ("right-to-left \u202e mark", "right-to-left  mark"),
        ("x" * 500, "x" * 300),
    ],
)
def test_output_lines_are_cleaned(line: str, cleaned: str) -> None:
    assert _clean_output_line(line) == cleaned
