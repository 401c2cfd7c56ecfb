"""The Slack notifier: an outbox written by the event sink and emptied by one sender task.

``accept`` plans the messages of each event and writes them to the outbox.
``run`` sends them one request at a time, in the order that
``outbox.pick_next`` chooses, by these rules:

- Retries: a failed attempt is retried after the service's Retry-After, or
  after an exponential backoff (1 s, 2 s, 4 s ... at most 5 min). Every
  failure pauses the whole sender until then, so a Slack outage costs one
  request per backoff step, not one per message. A message still undelivered
  after MAX_AGE is given up.
- At most once: an attempt that may have reached Slack (timeout, broken
  connection, 5xx, or a daemon killed mid-request) leaves the message
  unsure. Before it is posted again, the sender looks it up in the channel
  by the id in its metadata. With a webhook nothing can be looked up, so an
  unsure message is dropped instead.
- Rejections: an error that no retry can fix (a bad token, a missing
  channel) is logged once with its fix, shown by ``status``, and parks
  every queued message until the daemon restarts; an error that concerns
  one message fails that message only.
"""

from __future__ import annotations

import importlib
import logging
import random
import sqlite3
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

from deployd.config import SlackConfig
from deployd.events import DeployEvent, EventKind
from deployd.notifiers.base import Notifier
from deployd.notifiers.credentials import SlackCredentials
from deployd.notifiers.messages import Action, Links, plan_messages
from deployd.notifiers.outbox import Outbox, Row, State, pick_next
from deployd.notifiers.transport import NotFound, Rejected, Result, Retry, Scope, Sent, Transport

logger = logging.getLogger("deployd.notifiers")

# Backoff after a failed attempt without Retry-After: 1 s doubling up to 5 min.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
# A message still undelivered this long after its event is given up.
MAX_AGE = 24 * 3600.0
# Finished messages are kept this long, for the counts in ``status``.
RETENTION = 7 * 24 * 3600.0
PRUNE_EVERY = 3600.0
# Deploys remembered as waiting, so their start can update the waiting post.
WAITING_REMEMBERED = 1000
# Sending starts once no event has come for SEND_QUIET seconds, and at the
# latest SEND_MAX_DELAY seconds after the first unsent event. Events come in
# bursts with the requests of a deploy (a grant and then bind, or a release
# and then its response), so sending later keeps its work off the event loop
# while those requests run.
SEND_QUIET = 0.25
SEND_MAX_DELAY = 2.0


class SlackNotifier(Notifier):
    """Send deploy events to one Slack channel, through the outbox."""

    kind = "slack"

    def __init__(
        self,
        config: SlackConfig,
        credentials: SlackCredentials,
        outbox: Outbox,
        transport_factory: Callable[[], Transport] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.outbox = outbox
        self.threaded = credentials.mode == "bot"
        self.links = Links.from_config(config)
        self._transport_factory = transport_factory or self._slack_transport
        self._transport: Transport | None = None
        self._clock = clock
        self._wakeup = anyio.Event()
        self._idle = anyio.Event()
        self._waiting: OrderedDict[str, None] = OrderedDict()
        self._paused_until = 0.0
        self._pruned_at = 0.0
        self._failures = 0
        self._last_error: str | None = None
        self._last_error_fix: str | None = None
        self._last_error_at: float | None = None
        self._problem: Rejected | None = None
        self._logged_codes: set[str] = set()
        # time.monotonic() of the last event, and of the first since the sender was idle.
        self._last_event_at = 0.0
        self._burst_started_at: float | None = None
        self._flushing = False

    # --- the event sink ---

    def accept(self, event: DeployEvent) -> None:
        announced_wait = False
        if self.threaded and event.kind is EventKind.WAITING:
            self._waiting[event.session_id] = None
            while len(self._waiting) > WAITING_REMEMBERED:
                self._waiting.popitem(last=False)
        elif event.kind is EventKind.STARTED and event.session_id in self._waiting:
            del self._waiting[event.session_id]
            announced_wait = True
        drafts = plan_messages(
            event, threaded=self.threaded, links=self.links, announced_wait=announced_wait
        )
        if not drafts:
            return
        try:
            self.outbox.add(event.session_id, event.lock, str(event.kind), drafts, self._clock())
        except sqlite3.Error as exc:
            logger.error(
                "Slack message not queued, the outbox cannot be written: kind=%s lock=%s "
                "session=%s: %s",
                event.kind,
                event.lock,
                event.session_id,
                exc,
            )
            return
        self._last_event_at = time.monotonic()
        if self._burst_started_at is None:
            self._burst_started_at = self._last_event_at
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._wakeup.set()

    # --- lifecycle ---

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        now = self._clock()
        unparked = self.outbox.requeue(now)
        task_status.started()
        try:
            self._transport = await self._transport_factory_off_loop()
        except ImportError as exc:
            # create_notifier checked that the packages exist; a broken install remains.
            self._reject_all(
                Rejected(
                    "import_failed",
                    f"slack-sdk or aiohttp cannot be imported: {exc}",
                    "reinstall them in deployd's environment ('pip install slack-sdk aiohttp'), "
                    "then restart the daemon",
                    Scope.NOTIFIER,
                )
            )
            while True:
                await self._step()
        known = self.outbox.channel_id(self.config.channel)
        if known is not None and self._transport.known_channel_id() is None:
            self._transport.learn_channel_id(known)
        counts = self.outbox.counts()
        logger.info(
            "Slack notifier started: mode=%s channel=%s credentials=%s queued=%d "
            "(%d parked ones queued again)",
            self.credentials.mode,
            self.config.channel,
            self.credentials.source,
            counts[State.QUEUED],
            unparked,
        )
        await self._check_credentials()
        while True:
            try:
                await self._step()
            except Exception as exc:
                # A bug or a broken outbox must not take the daemon down with the sender.
                self._sender_failed(exc)
                await self._wait(BACKOFF_MAX)

    async def flush(self, timeout: float) -> None:
        if self._transport is None:
            return
        self._flushing = True
        self._wakeup.set()
        with anyio.move_on_after(timeout):
            while True:
                idle = self._idle
                await idle.wait()
                if self._idle is idle:
                    return

    async def aclose(self) -> None:
        if self._transport is not None:
            with anyio.CancelScope(shield=True):
                await self._transport.aclose()
        self.outbox.close()

    # --- status ---

    def health(self) -> dict[str, Any]:
        now = self._clock()
        counts = self.outbox.counts()
        oldest = self.outbox.oldest_queued()
        problem = self._problem
        transport = self._transport
        return {
            "configured": True,
            "kind": self.kind,
            "mode": self.credentials.mode,
            "channel": self.config.channel,
            "channel_id": transport.known_channel_id() if transport is not None else None,
            "credentials": self.credentials.source,
            **{str(state): counts[state] for state in State},
            "oldest_queued_age": round(now - oldest, 3) if oldest is not None else None,
            "retry_in": round(self._paused_until - now, 3) if self._paused_until > now else None,
            "last_error": self._last_error,
            "last_error_fix": self._last_error_fix,
            "last_error_at": self._last_error_at,
            "problem": (
                {"error": problem.code, "message": problem.message, "fix": problem.fix}
                if problem is not None
                else None
            ),
            "retention": RETENTION,
        }

    # --- the sender ---

    def _slack_transport(self) -> Transport:
        slack: Any = importlib.import_module("deployd.notifiers.slack")
        secret = self.credentials.secret
        if self.credentials.mode == "webhook":
            transport: Transport = slack.SlackWebhookTransport(secret, self.config.timeout)
        else:
            transport = slack.SlackBotTransport(
                secret, self.config.channel, self.config.api_url, self.config.timeout
            )
        return transport

    async def _transport_factory_off_loop(self) -> Transport:
        """Build the transport; slack-sdk and aiohttp are imported in a worker thread."""
        await anyio.to_thread.run_sync(importlib.import_module, "deployd.notifiers.slack")
        return self._transport_factory()

    async def _check_credentials(self) -> None:
        assert self._transport is not None
        result = await self._transport.check()
        if isinstance(result, Rejected) and result.scope is Scope.NOTIFIER:
            self._reject_all(result)
        elif isinstance(result, Retry):
            self._note_error(result.error)
            logger.warning(
                "Slack credentials not checked because auth.test failed: %s; messages are "
                "sent once Slack responds",
                result.error,
            )

    async def _step(self) -> None:
        now = self._clock()
        self._prune(now)
        if self._problem is not None:
            self.outbox.park_queued(self._problem_text())
            await self._sleep(None)
            return
        if now < self._paused_until:
            await self._sleep(self._paused_until)
            return
        heads = self.outbox.heads()
        try:
            row, wake_at = pick_next(heads, self.outbox.is_posted, self.outbox.creator, now)
        finally:
            heads.close()
        if row is None:
            self._burst_started_at = None
            await self._sleep(wake_at)
            return
        hold = self._hold()
        if hold > 0:
            await self._wait(hold)
            return
        await self._deliver(row)

    def _hold(self) -> float:
        """Return how long sending waits for the burst of events to end (see SEND_QUIET)."""
        if self._flushing or self._burst_started_at is None:
            return 0.0
        until = min(self._last_event_at + SEND_QUIET, self._burst_started_at + SEND_MAX_DELAY)
        return max(0.0, until - time.monotonic())

    async def _sleep(self, until: float | None) -> None:
        """Mark the sender idle and wait for new messages, or until ``until`` (epoch seconds)."""
        self._idle.set()
        await self._wait(None if until is None else max(0.0, until - self._clock()))

    async def _wait(self, delay: float | None) -> None:
        """Wait for new messages, or ``delay`` seconds (no limit when None)."""
        self._wakeup = anyio.Event()
        with anyio.move_on_after(delay if delay is not None else float("inf")):
            await self._wakeup.wait()

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        removed = self.outbox.prune(now - RETENTION)
        if removed:
            logger.debug("pruned %d finished Slack messages older than 7 days", removed)

    async def _deliver(self, row: Row) -> None:
        transport = self._transport
        assert transport is not None
        payload = self.outbox.payload(row.id)
        thread: tuple[str, str] | None = None
        if row.action is Action.REPLY:
            parent = self.outbox.posted(row.session_id, "top")
            # Without a parent (its post failed) the reply goes to the channel on its own.
            thread = (parent.channel_id, parent.ts) if parent is not None else None
        elif row.action is Action.UPDATE:
            assert row.ref is not None
            target = self.outbox.posted(row.session_id, row.ref)
            if target is None:
                self.outbox.mark_finished(
                    row.id, State.SKIPPED, "the message to update was never posted", self._clock()
                )
                return
            thread = (target.channel_id, target.ts)

        if row.unsure and row.action is not Action.UPDATE:
            since = row.first_attempt_at or row.created_at
            found = await transport.find(row.uid, since, thread)
            if isinstance(found, Sent):
                logger.info(
                    "Slack message found in the channel after an unanswered attempt, not sent "
                    "again: message=%d session=%s",
                    row.id,
                    row.session_id,
                )
                self._record(row, found, unsure=True)
                return
            if not isinstance(found, NotFound):
                self._record(row, found, unsure=True, checking=True)
                return

        self.outbox.begin_attempt(row.id, self._clock())
        if row.action is Action.UPDATE:
            assert thread is not None
            result = await transport.update(payload, thread[0], thread[1])
        else:
            result = await transport.post(payload, row.uid, thread)
        self._record(row, result, unsure=False)

    def _record(self, row: Row, result: Result, unsure: bool, checking: bool = False) -> None:
        """Store the result of an attempt; ``unsure`` when the row may already be in the channel.

        ``checking`` marks the result of the lookup before an attempt, which
        is not an attempt itself.
        """
        now = self._clock()
        if isinstance(result, Sent):
            self.outbox.mark_sent(row.id, result.channel_id, result.ts, now)
            if result.channel_id and self._transport is not None:
                if self._transport.known_channel_id() is None:
                    self.outbox.remember_channel(self.config.channel, result.channel_id)
                self._transport.learn_channel_id(result.channel_id)
            if self._failures:
                logger.info("Slack delivery works again after %d failed attempts", self._failures)
                self._failures = 0
            return
        if isinstance(result, Rejected):
            self._rejected(row, result, now)
            return
        self._retry(row, result, unsure or result.delivered_maybe, now, checking)

    def _retry(self, row: Row, result: Retry, unsure: bool, now: float, checking: bool) -> None:
        # The error names the API method, the HTTP status and Slack's error code.
        error = self.credentials.secret.redact(result.error)
        self._note_error(error)
        # row.attempts counts the posts and updates sent before this one.
        attempts = row.attempts + 1
        if result.max_attempts is not None and attempts >= result.max_attempts:
            self._give_up(row, f"{error}; gave up after {attempts} attempts", now)
            return
        if now - row.created_at > MAX_AGE:
            self._give_up(row, f"{error}; gave up after {attempts} attempts over 24h", now)
            return
        if result.after is not None:
            delay = result.after
        else:
            # Failed lookups add no attempt, so the failures in a row make the backoff grow too.
            steps = max(row.attempts, self._failures)
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(steps, 16))
            delay *= random.uniform(0.9, 1.1)
        self._paused_until = max(self._paused_until, now + delay)
        self.outbox.mark_retry(row.id, now + delay, error, unsure)
        self._failures += 1
        log = logger.warning if self._failures == 1 else logger.info
        what = "lookup before attempt" if checking else "attempt"
        log(
            "Slack request failed, retrying in %.1fs: message=%d session=%s %s=%d: %s",
            delay,
            row.id,
            row.session_id,
            what,
            attempts,
            error,
        )

    def _give_up(self, row: Row, error: str, now: float) -> None:
        self.outbox.mark_finished(row.id, State.FAILED, error, now)
        logger.warning(
            "Slack message given up: message=%d session=%s: %s", row.id, row.session_id, error
        )

    def _rejected(self, row: Row, result: Rejected, now: float) -> None:
        if result.scope is Scope.NOTIFIER:
            self.outbox.mark_retry(row.id, now, self._problem_text(result), unsure=False)
            self._reject_all(result)
            return
        text = f"{result.message}; fix: {result.fix}"
        self._note_error(result.message, result.fix)
        self.outbox.mark_finished(row.id, State.FAILED, text, now)
        log = logger.warning if result.code not in self._logged_codes else logger.debug
        self._logged_codes.add(result.code)
        log(
            "Slack message not delivered: message=%d session=%s: %s",
            row.id,
            row.session_id,
            text,
        )

    def _reject_all(self, result: Rejected) -> None:
        """Stop delivery after a rejection of the credentials or channel, and log it once."""
        self._problem = result
        self._note_error(result.message, result.fix)
        parked = self.outbox.park_queued(self._problem_text(result))
        logger.error(
            "Slack delivery stopped: %s; fix: %s. %d queued messages are kept and sent "
            "again when the daemon restarts",
            result.message,
            result.fix,
            parked,
        )

    def _problem_text(self, problem: Rejected | None = None) -> str:
        problem = problem or self._problem
        assert problem is not None
        return f"{problem.message}; fix: {problem.fix}"

    def _sender_failed(self, exc: Exception) -> None:
        text = "".join(traceback.format_exception(exc))
        self._note_error(f"{type(exc).__name__}: {exc}")
        logger.error(
            "Slack sender failed, trying again in %.0fs:\n%s",
            BACKOFF_MAX,
            self.credentials.secret.redact(text),
        )

    def _note_error(self, error: str, fix: str | None = None) -> None:
        self._last_error = self.credentials.secret.redact(error)
        self._last_error_fix = fix
        self._last_error_at = self._clock()
