"""The chat messages of each deploy event: Block Kit blocks with a plain-text fallback.

``plan_messages`` turns one DeployEvent into drafts: posts, thread replies
and updates of an earlier post. A deploy's messages form one thread whose
parent is the "started" post (ref ``top``); that post is updated with the
outcome. A wait behind another holder is posted on its own (ref
``waiting``) and updated when the deploy starts. Without threads (an
incoming webhook) every draft is a plain post and nothing is updated.

Text from people (commits, reasons, revisions, output) is escaped for
Slack's mrkdwn, in the blocks and in the plain-text fallback alike, because
Slack parses the fallback ``text`` for mentions and links too. It cannot
mention users or forge links.
"""

from __future__ import annotations

import enum
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deployd.config import SlackConfig
from deployd.events import DeployEvent, EventKind
from deployd_client.durations import format_duration

TOP = "top"
WAITING = "waiting"
# Slack's limits: 3000 characters for a section's text, and 4000
# recommended for the fallback text of a message.
SECTION_LIMIT = 3000
TEXT_LIMIT = 4000
OUTPUT_LINES = 20


class Action(enum.StrEnum):
    """The effect of a draft in the channel."""

    POST = "post"  # a new top-level message
    REPLY = "reply"  # a reply in the thread of the deploy's ``top`` post
    UPDATE = "update"  # a new text for an earlier post of the same deploy


@dataclass(frozen=True, slots=True)
class Draft:
    """One message to send. ``ref`` names the post a POST creates or an UPDATE changes."""

    action: Action
    ref: str | None
    text: str
    blocks: list[dict[str, Any]]

    def payload(self) -> dict[str, Any]:
        """Return the fields that the outbox stores and the transport sends."""
        return {"text": self.text, "blocks": self.blocks}


@dataclass(frozen=True, slots=True)
class Text:
    """The same words as Slack mrkdwn and as plain text.

    ``plain`` is not escaped yet: ``_draft`` escapes the whole fallback text
    once it is put together.
    """

    mrkdwn: str
    plain: str


def escape(text: str) -> str:
    """Escape ``&``, ``<`` and ``>``, the characters Slack reads as markup in message text.

    Slack's message formatting guide (api.slack.com/docs/message-formatting)
    names these three and no others, for all text that a client posts.
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def bold(text: str) -> Text:
    """Return ``text`` in bold."""
    return Text(f"*{escape(text)}*", text)


def plain(text: str) -> Text:
    """Return ``text`` without markup."""
    return Text(escape(text), text)


def join(*parts: Text | str) -> Text:
    """Concatenate texts; a str is taken as plain text."""
    items = [part if isinstance(part, Text) else plain(part) for part in parts]
    return Text("".join(item.mrkdwn for item in items), "".join(item.plain for item in items))


def linked(label: str, url: str | None) -> Text:
    """Return ``label``, linked to ``url`` when there is one."""
    if not url:
        return plain(label)
    safe_url = url.replace("|", "%7C").replace(">", "%3E").replace("<", "%3C")
    return Text(f"<{safe_url}|{escape(label)}>", label)


def clock(epoch: float) -> Text:
    """Return a time of day that Slack shows in each reader's time zone (UTC in the fallback)."""
    utc = time.strftime("%H:%M UTC", time.gmtime(epoch))
    return Text(f"<!date^{int(epoch)}^{{time}}|{utc}>", utc)


class Links:
    """Link templates from ``slack.commit_url`` and ``slack.revision_url``."""

    def __init__(self, commit_url: str | None = None, revision_url: str | None = None) -> None:
        self.commit_url = commit_url
        self.revision_url = revision_url

    @classmethod
    def from_config(cls, config: SlackConfig) -> Links:
        """Return the links configured in the ``[slack]`` section."""
        return cls(config.commit_url, config.revision_url)

    def commit(self, lock: str, commit: str) -> str | None:
        """Return the URL of ``commit``, or None without a template."""
        return _fill(self.commit_url, lock, commit=commit, revision="")

    def revision(self, lock: str, revision: str, commit: str | None) -> str | None:
        """Return the URL of ``revision``, or None without a template."""
        return _fill(self.revision_url, lock, commit=commit or "", revision=revision)


def _fill(template: str | None, lock: str, commit: str, revision: str) -> str | None:
    if not template:
        return None
    environment, _, service = lock.rpartition(":")
    values = {
        "lock": lock,
        "service": service,
        "environment": environment,
        "commit": commit,
        "revision": revision,
    }
    quoted = {name: urllib.parse.quote(value, safe="") for name, value in values.items()}
    return template.format(**quoted)


# --- the plan per event kind ---


@dataclass(frozen=True, slots=True)
class _Context:
    event: DeployEvent
    links: Links
    threaded: bool

    @property
    def lock(self) -> str:
        return self.event.lock

    @property
    def details(self) -> dict[str, Any]:
        return self.event.details

    def who(self) -> Text:
        owner = self.event.owner
        return join(bold(owner.user), f" on {owner.host}")

    def commit(self) -> Text | None:
        commit = self.event.purpose.commit
        if not commit:
            return None
        return linked(commit, self.links.commit(self.lock, commit))

    def revision(self) -> Text | None:
        revision = self.details.get("revision")
        if not revision:
            return None
        return linked(revision, self.links.revision(self.lock, revision, self.event.purpose.commit))

    def service_with(self, label: Text | None) -> Text:
        """Return ``*api* (label)``, or ``*api*`` without a label."""
        if label is None:
            return bold(self.lock)
        return join(bold(self.lock), " (", label, ")")

    def deploy_facts(self) -> list[Text]:
        """Return who deploys, and why, for the context line of a top-level message."""
        facts = [join("by ", self.who())]
        reason = self.event.purpose.reason
        if reason:
            facts.append(plain(f"reason: {reason}"))
        return facts

    def reply_facts(self) -> list[Text]:
        """Return the context a reply needs when it is posted without a thread."""
        return [] if self.threaded else self.deploy_facts()

    def duration(self) -> str | None:
        duration = self.details.get("duration")
        return format_duration(float(duration)) if duration is not None else None


def _draft(
    action: Action,
    ref: str | None,
    headline: Text,
    facts: Sequence[Text] = (),
    output: Sequence[str] | None = None,
) -> Draft:
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(headline.mrkdwn)}}
    ]
    if facts:
        context = " · ".join(fact.mrkdwn for fact in facts)
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(context)}]})
    text = headline.plain
    if facts:
        text += " (" + ", ".join(fact.plain for fact in facts) + ")"
    if output:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _code(output)}})
        text += "\n" + "\n".join(output)
    return Draft(action, ref, _clip(escape(text), TEXT_LIMIT), blocks)


def _clip(text: str, limit: int = SECTION_LIMIT) -> str:
    """Cut escaped text to ``limit`` characters, never inside an entity such as ``&amp;``."""
    if len(text) <= limit:
        return text
    kept = text[: limit - 1]
    entity_start = kept.rfind("&", max(0, len(kept) - len("&amp;")))
    if entity_start != -1 and ";" not in kept[entity_start:]:
        kept = kept[:entity_start]
    return kept + "…"


def _code(lines: Sequence[str]) -> str:
    """Return the last lines of output as a code block that fits in one section."""
    kept: list[str] = []
    size = len("```\n\n```")
    for line in reversed(lines[-OUTPUT_LINES:]):
        # Three backticks in the output would end the code block early.
        text = escape(line.replace("```", "'''"))
        if size + len(text) + 1 > SECTION_LIMIT:
            break
        kept.append(text)
        size += len(text) + 1
    return "```\n" + "\n".join(reversed(kept)) + "\n```"


def _holder(data: Any) -> Text:
    """Describe a lease given as JSON: who holds it, since when, for which commit."""
    if not isinstance(data, dict):
        return plain("another holder")
    owner = data.get("owner") or {}
    text = join(bold(str(owner.get("user", "?"))), f" on {owner.get('host', '?')}")
    acquired_at = data.get("acquired_at")
    if isinstance(acquired_at, int | float):
        text = join(text, " since ", clock(acquired_at))
    commit = (data.get("purpose") or {}).get("commit")
    if commit:
        text = join(text, f" (commit {commit})")
    return text


def _started(context: _Context, announced_wait: bool) -> list[Draft]:
    details = context.details
    facts = context.deploy_facts()
    if context.event.token:
        facts.append(plain(f"fencing token {context.event.token}"))
    waited = float(details.get("waited") or 0)
    if waited >= 1:
        facts.append(plain(f"waited {format_duration(waited)}"))
    takeover = details.get("takeover")
    if details.get("unlocked"):
        facts.append(plain(":warning: WITHOUT a lock: the lease store is unreachable"))
    elif takeover == "forced":
        facts.append(plain(":warning: took the lock by force"))
    elif takeover == "expired":
        facts.append(plain("took over an expired lease"))
    headline = join(":rocket: Deploying ", context.service_with(context.commit()))
    drafts = [_draft(Action.POST, TOP, headline, facts)]
    if announced_wait and context.threaded:
        update = join(
            ":hourglass_flowing_sand: ",
            bold(context.event.owner.user),
            f" waited {format_duration(waited)} for ",
            bold(context.lock),
            " and is deploying now",
        )
        drafts.append(_draft(Action.UPDATE, WAITING, update, context.deploy_facts()))
    return drafts


def _waiting(context: _Context) -> list[Draft]:
    headline = join(
        ":hourglass_flowing_sand: ",
        bold(context.event.owner.user),
        " is waiting to deploy ",
        context.service_with(context.commit()),
    )
    facts = [join("held by ", _holder(context.details.get("holder")))]
    position = context.details.get("position")
    if isinstance(position, int):
        facts.append(plain(f"place in line: {position}"))
    facts.extend(context.deploy_facts())
    return [_draft(Action.POST, WAITING if context.threaded else None, headline, facts)]


def _deployed(context: _Context) -> list[Draft]:
    revision = context.revision() or plain("(no revision given)")
    headline = join(":package: ", bold(context.lock), " is serving revision ", revision)
    return [_reply(context, headline, context.reply_facts())]


def _outcome(context: _Context) -> list[Draft]:
    """Update the top post with how the deploy ended, and post the same line in the thread."""
    headline, facts = _outcome_line(context)
    details = context.details
    if details.get("unlocked"):
        facts.append(plain(":warning: ran without a lock"))
    revision = context.revision()
    if revision is not None and context.event.kind is not EventKind.SUCCEEDED:
        facts.append(join("revision ", revision))

    tail = details.get("output_tail")
    output = [str(line) for line in tail] if isinstance(tail, list | tuple) else None
    drafts = []
    if context.threaded:
        drafts.append(_draft(Action.UPDATE, TOP, headline, facts))
    drafts.append(_reply(context, headline, context.reply_facts(), output))
    return drafts


def _outcome_line(context: _Context) -> tuple[Text, list[Text]]:
    """Return the headline of an outcome and the facts for its context line."""
    kind = context.event.kind
    facts = context.deploy_facts()
    commit = context.commit()
    if kind is EventKind.SUCCEEDED:
        revision = context.revision()
        headline = join(":white_check_mark: Deployed ", context.service_with(revision or commit))
        if commit is not None and revision is not None:
            facts.append(join("commit ", commit))
        return _with_duration(headline, "in", context), facts

    if kind is EventKind.FAILED:
        exit_code = context.details.get("exit_code")
        headline = join(
            ":x: Deploy of ", context.service_with(commit), f" failed with exit code {exit_code}"
        )
        return _with_duration(headline, "after", context), facts

    if kind is EventKind.RELEASED:
        headline = join(":white_circle: Released ", context.service_with(commit))
        facts.append(plain("no exit code was reported"))
        return _with_duration(headline, "after", context), facts

    headline = join(
        ":grey_question: Deploy of ", context.service_with(commit), " ended without a report"
    )
    if context.details.get("detail"):
        facts.append(plain(str(context.details["detail"])))
    return _with_duration(headline, "after", context), facts


def _with_duration(headline: Text, preposition: str, context: _Context) -> Text:
    duration = context.duration()
    return join(headline, f" {preposition} {duration}") if duration else headline


def _lost(context: _Context) -> list[Draft]:
    headline = join(
        ":warning: Lost the lock on ", context.service_with(context.commit()), " during the deploy"
    )
    facts = [plain(str(context.details.get("message") or "the lease could not be renewed"))]
    new_holder = context.details.get("holder")
    if isinstance(new_holder, dict):
        facts.append(join("now held by ", _holder(new_holder)))
    drafts = []
    if context.threaded:
        drafts.append(_draft(Action.UPDATE, TOP, headline, context.deploy_facts()))
    drafts.append(_reply(context, headline, [*facts, *context.reply_facts()]))
    return drafts


def _forced(context: _Context) -> list[Draft]:
    details = context.details
    reason = str(details.get("force_reason") or "no reason given")
    previous = details.get("holder")
    forced_by = details.get("forced_by")
    if forced_by:
        # force-unlock: the event belongs to the deploy that lost the lock.
        headline = join(":warning: ", bold(str(forced_by)), " force-unlocked ", bold(context.lock))
        if isinstance(previous, dict):
            headline = join(headline, ", taking it from ", _holder(previous))
    else:
        headline = join(
            ":warning: ", bold(context.event.owner.user), " took ", bold(context.lock), " by force"
        )
        if isinstance(previous, dict):
            headline = join(headline, " from ", _holder(previous))
    return [_reply(context, headline, [plain(f"reason: {reason}")])]


def _stale_takeover(context: _Context) -> list[Draft]:
    headline = join(
        ":hourglass: ",
        bold(context.event.owner.user),
        " took over ",
        bold(context.lock),
        " from the expired lease of ",
        _holder(context.details.get("holder")),
    )
    facts = [plain("its holder stopped renewing for longer than the TTL")]
    return [_reply(context, headline, [*facts, *context.reply_facts()])]


def _unlocked(context: _Context) -> list[Draft]:
    headline = join(
        ":warning: ", context.service_with(context.commit()), " is being deployed WITHOUT a lock"
    )
    facts = [
        plain(str(context.details.get("message") or "the lease store is unreachable")),
        plain(
            f"deploys from {context.event.owner.host} still go one at a time; deployd takes "
            "the lock when the store is back and reports any overlap"
        ),
    ]
    return [_reply(context, headline, [*facts, *context.reply_facts()])]


def _overlap(context: _Context) -> list[Draft]:
    headline = join(":rotating_light: Deploys of ", bold(context.lock), " overlapped")
    facts = [plain(str(context.details.get("message") or "another holder deployed meanwhile"))]
    return [_reply(context, headline, [*facts, *context.reply_facts()])]


def _max_hold(context: _Context) -> list[Draft]:
    held_for = format_duration(float(context.details.get("held_for") or 0))
    max_hold = format_duration(float(context.details.get("max_hold") or 0))
    headline = join(
        ":hourglass_flowing_sand: ",
        bold(context.lock),
        f" has been deploying for {held_for}, longer than lease.max_hold ({max_hold})",
    )
    facts = [plain("the lease is kept for as long as the deploy runs")]
    return [_reply(context, headline, [*facts, *context.reply_facts()])]


def _reply(
    context: _Context,
    headline: Text,
    facts: Sequence[Text] = (),
    output: Sequence[str] | None = None,
) -> Draft:
    action = Action.REPLY if context.threaded else Action.POST
    return _draft(action, None, headline, facts, output)


_PLANS: dict[EventKind, Callable[[_Context], list[Draft]]] = {
    EventKind.WAITING: _waiting,
    EventKind.DEPLOYED: _deployed,
    EventKind.SUCCEEDED: _outcome,
    EventKind.FAILED: _outcome,
    EventKind.RELEASED: _outcome,
    EventKind.ABANDONED: _outcome,
    EventKind.LOST: _lost,
    EventKind.FORCED: _forced,
    EventKind.STALE_TAKEOVER: _stale_takeover,
    EventKind.UNLOCKED: _unlocked,
    EventKind.OVERLAP: _overlap,
    EventKind.MAX_HOLD: _max_hold,
}


def plan_messages(
    event: DeployEvent, *, threaded: bool, links: Links, announced_wait: bool = False
) -> list[Draft]:
    """Return the drafts that ``event`` calls for, in the order they must be sent.

    ``threaded`` is false for transports without threads and updates (incoming
    webhooks). ``announced_wait`` is true when a WAITING post of the same
    deploy exists, so that its STARTED event updates it.
    """
    context = _Context(event, links, threaded)
    if event.kind is EventKind.STARTED:
        return _started(context, announced_wait)
    plan = _PLANS.get(event.kind)
    return plan(context) if plan is not None else []
