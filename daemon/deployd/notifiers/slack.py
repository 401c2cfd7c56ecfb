"""Slack transports, through slack-sdk: a bot token (Web API) or an incoming webhook.

With a bot token, messages are posted with ``chat.postMessage``, threaded
with ``thread_ts`` and updated with ``chat.update``. Each post carries its
outbox id in its message metadata, so a search of ``conversations.history``
(or ``conversations.replies``) shows whether an attempt that timed out
reached the channel. An incoming webhook can only post: no threads, no
updates, and no way to look a message up.

slack-sdk retries nothing here (``retry_handlers=[]``): its built-in
handler re-sends after a dropped connection, which could post a message
twice. The outbox owns every retry instead.

This module imports slack-sdk and aiohttp, so the daemon imports it only
when Slack is configured, and then off the event loop.
"""

from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import aiohttp
import anyio
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from deployd.notifiers.credentials import Secret
from deployd.notifiers.transport import NotFound, Rejected, Result, Retry, Scope, Sent

logger = logging.getLogger("deployd.notifiers.slack")

# slack-sdk's own logger. Its DEBUG lines carry request URLs and bodies, and a
# webhook URL is a secret, so it never logs below INFO.
sdk_logger = logging.getLogger("deployd.notifiers.slack_sdk")
sdk_logger.setLevel(logging.INFO)

METADATA_EVENT_TYPE = "deployd_message"
# conversations.history pages searched for an unsure message, 200 messages each.
HISTORY_PAGES = 5
# conversations.list pages searched for a channel name, 200 channels each.
CHANNEL_LIST_PAGES = 10
# A history search starts this long before the first attempt, in case the
# daemon's clock runs ahead of Slack's.
CLOCK_SKEW = 300.0
# The longest Retry-After honoured as given, in seconds.
MAX_RETRY_AFTER = 3600.0
# Attempts allowed for an error code this module does not know.
UNKNOWN_ERROR_ATTEMPTS = 5

_REINSTALL = "then restart the daemon"

# Rejections that stop all delivery, by Slack error code: what a person must do.
NOTIFIER_ERRORS: dict[str, str] = {
    "invalid_auth": "the bot token is not valid; put a valid bot token (xoxb-...) in "
    f"slack.token_file or DEPLOYD_SLACK_TOKEN, {_REINSTALL}",
    "not_authed": "no bot token reached Slack; put one in slack.token_file or "
    f"DEPLOYD_SLACK_TOKEN, {_REINSTALL}",
    "token_revoked": "the bot token was revoked; reinstall the Slack app and put its new bot "
    f"token in slack.token_file or DEPLOYD_SLACK_TOKEN, {_REINSTALL}",
    "token_expired": "the bot token expired; put a fresh bot token in slack.token_file or "
    f"DEPLOYD_SLACK_TOKEN, {_REINSTALL}",
    "account_inactive": "the Slack app or its bot user was deactivated; reinstall the app and "
    f"put its new bot token in slack.token_file, {_REINSTALL}",
    "no_permission": "the token may not post here; use the app's bot token (xoxb-...) with the "
    f"chat:write scope, {_REINSTALL}",
    "not_allowed_token_type": "this kind of token cannot post; use the app's bot token "
    f"(xoxb-...), {_REINSTALL}",
    "missing_scope": "the Slack app lacks the chat:write scope; add it under OAuth & "
    f"Permissions, reinstall the app, {_REINSTALL}",
    "channel_not_found": "channel {channel} does not exist or the bot cannot see it; set "
    f"slack.channel to an existing channel and invite the bot to private channels, {_REINSTALL}",
    "not_in_channel": "the bot is not a member of {channel}; invite it with '/invite @APP' in "
    f"the channel or add the chat:write.public scope, {_REINSTALL}",
    "is_archived": "channel {channel} is archived; unarchive it or set slack.channel to another "
    f"channel, {_REINSTALL}",
    "restricted_action": "the workspace does not let the bot post in {channel}; ask a Slack "
    f"admin to allow it, {_REINSTALL}",
    "team_access_not_granted": "the token has no access to this workspace; reinstall the app "
    f"there, {_REINSTALL}",
    "ekm_access_denied": f"Slack administrators suspended the app's access, {_REINSTALL}",
    "access_denied": f"Slack denied the app access; ask a Slack admin, {_REINSTALL}",
}

# Rejections of one message; the others go on.
MESSAGE_ERRORS: dict[str, str] = {
    code: "Slack rejected this message's content; report it as a deployd bug with the daemon log"
    for code in (
        "msg_too_long",
        "no_text",
        "invalid_blocks",
        "invalid_blocks_format",
        "too_many_attachments",
        "invalid_metadata_format",
        "invalid_metadata_schema",
        "metadata_too_large",
        "invalid_arguments",
        "invalid_arg_name",
        "invalid_array_arg",
        "invalid_charset",
        "invalid_form_data",
        "invalid_post_type",
        "missing_post_type",
        "invalid_json",
        "json_not_object",
    )
} | {
    "message_not_found": "the message to update was deleted; nothing to do",
    "cant_update_message": "the message to update can no longer be edited; nothing to do",
    "edit_window_closed": "the message to update can no longer be edited; nothing to do",
}

# Errors after which the message may have been stored anyway.
AMBIGUOUS_ERRORS = frozenset({"internal_error", "fatal_error", "service_unavailable"})

# Incoming-webhook error codes (the response body) that stop all delivery.
WEBHOOK_NOTIFIER_ERRORS: dict[str, str] = {
    code: "the incoming webhook is disabled or its channel is gone; create a new incoming "
    "webhook and put its URL in slack.webhook_url_file or DEPLOYD_SLACK_WEBHOOK_URL, " + _REINSTALL
    for code in (
        "invalid_token",
        "no_service",
        "no_service_id",
        "no_team",
        "team_disabled",
        "no_active_hooks",
        "channel_not_found",
        "channel_is_archived",
        "action_prohibited",
        "posting_to_general_channel_denied",
        "user_not_found",
    )
}


def retry_after(headers: Mapping[str, Any] | None) -> float | None:
    """Return the Retry-After header in seconds (at most MAX_RETRY_AFTER), if present and valid."""
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                return None
            return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return None


def proxy_for(url: str) -> str | None:
    """Return the proxy from the environment for ``url``, honouring ``NO_PROXY``.

    slack-sdk reads ``HTTPS_PROXY`` and ``HTTP_PROXY`` itself but ignores
    ``NO_PROXY``; a loopback address never goes through a proxy.
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        return None
    if urllib.request.proxy_bypass(host):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get("https") or proxies.get("http") or None


class _Session:
    """One aiohttp session per transport, created on first use inside the event loop."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class SlackBotTransport:
    """Slack's Web API with a bot token: posts, thread replies, updates and history checks."""

    mode = "bot"
    threaded = True

    def __init__(self, secret: Secret, channel: str, api_url: str | None, timeout: float) -> None:
        self.secret = secret
        self.channel = channel
        self.timeout = timeout
        self._channel_id = channel if _looks_like_channel_id(channel) else None
        self._session = _Session(timeout)
        self._api_url = api_url or AsyncWebClient.BASE_URL
        self._web: AsyncWebClient | None = None

    def _client(self) -> AsyncWebClient:
        """Return the Web API client, created on first use inside the event loop."""
        if self._web is None:
            self._web = AsyncWebClient(
                token=self.secret.reveal(),
                base_url=self._api_url,
                timeout=max(1, round(self.timeout)),
                session=self._session.get(),
                logger=sdk_logger,
                retry_handlers=[],
            )
            # slack-sdk takes HTTPS_PROXY from the environment without NO_PROXY.
            self._web.proxy = proxy_for(self._api_url)
        return self._web

    def known_channel_id(self) -> str | None:
        return self._channel_id

    def learn_channel_id(self, channel_id: str) -> None:
        self._channel_id = channel_id

    async def check(self) -> Result | None:
        try:
            with anyio.fail_after(self.timeout + 2):
                await self._client().auth_test()
        except (SlackClientError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self._failure(exc, "auth.test")
        return Sent()

    async def post(
        self, payload: dict[str, Any], uid: str, thread: tuple[str, str] | None
    ) -> Result:
        arguments: dict[str, Any] = {
            "channel": thread[0] if thread else self.channel,
            "text": payload["text"],
            "blocks": payload["blocks"],
            "metadata": {"event_type": METADATA_EVENT_TYPE, "event_payload": {"id": uid}},
            "unfurl_links": False,
            "unfurl_media": False,
        }
        if thread is not None:
            arguments["thread_ts"] = thread[1]
        try:
            with anyio.fail_after(self.timeout + 2):
                response = await self._client().chat_postMessage(**arguments)
        except (SlackClientError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self._failure(exc, "chat.postMessage")
        channel_id, ts = response.get("channel"), response.get("ts")
        if not channel_id or not ts:
            return Retry(
                "chat.postMessage: the response has no channel or ts", delivered_maybe=True
            )
        # ts must stay a string: as a float it loses digits and no longer names the message.
        return Sent(str(channel_id), str(ts))

    async def update(self, payload: dict[str, Any], channel_id: str, ts: str) -> Result:
        try:
            with anyio.fail_after(self.timeout + 2):
                response = await self._client().chat_update(
                    channel=channel_id, ts=ts, text=payload["text"], blocks=payload["blocks"]
                )
        except (SlackClientError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self._failure(exc, "chat.update")
        return Sent(str(response.get("channel") or channel_id), str(response.get("ts") or ts))

    async def find(
        self, uid: str, since: float, thread: tuple[str, str] | None
    ) -> Sent | NotFound | Retry | Rejected:
        channel_id = thread[0] if thread else self._channel_id
        if channel_id is None:
            resolved = await self._resolve_channel()
            if not isinstance(resolved, str):
                return resolved
            channel_id = resolved
        method = "conversations.replies" if thread is not None else "conversations.history"
        cursor: str | None = None
        for _ in range(HISTORY_PAGES):
            arguments: dict[str, Any] = {
                "channel": channel_id,
                "oldest": f"{since - CLOCK_SKEW:.6f}",
                "include_all_metadata": True,
                "inclusive": True,
                "limit": 200,
                "cursor": cursor,
            }
            try:
                with anyio.fail_after(self.timeout + 2):
                    client = self._client()
                    if thread is not None:
                        response = await client.conversations_replies(ts=thread[1], **arguments)
                    else:
                        response = await client.conversations_history(**arguments)
            except (SlackClientError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                return self._failure(exc, method, checking=True)
            for message in response.get("messages") or []:
                if _carries(message, uid):
                    return Sent(channel_id, str(message["ts"]))
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if cursor is None:
                return NotFound()
        return Rejected(
            "history_too_long",
            f"more than {HISTORY_PAGES * 200} messages since the attempt; cannot tell whether "
            "it was posted",
            "nothing to do; the message is dropped rather than risk posting it twice",
            Scope.MESSAGE,
        )

    async def _resolve_channel(self) -> str | Retry | Rejected:
        """Find the ID of the configured channel name with ``conversations.list``."""
        name = self.channel.lstrip("#")
        cursor: str | None = None
        for _ in range(CHANNEL_LIST_PAGES):
            try:
                with anyio.fail_after(self.timeout + 2):
                    response = await self._client().conversations_list(
                        types="public_channel,private_channel",
                        exclude_archived=True,
                        limit=200,
                        cursor=cursor,
                    )
            except (SlackClientError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                return self._failure(exc, "conversations.list", checking=True)
            for channel in response.get("channels") or []:
                if channel.get("name") == name and channel.get("id"):
                    self._channel_id = str(channel["id"])
                    return self._channel_id
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if cursor is None:
                break
        return Rejected(
            "channel_id_unknown",
            f"cannot find the ID of {self.channel}, so cannot tell whether an unanswered post "
            "reached it",
            "set slack.channel to the channel's ID (such as C0123ABCD), or give the app the "
            "channels:read and groups:read scopes",
            Scope.MESSAGE,
        )

    def _failure(self, exc: BaseException, method: str, checking: bool = False) -> Retry | Rejected:
        """Classify an exception from slack-sdk or aiohttp in a call of the Web API ``method``.

        ``checking`` is set for the lookups that decide whether an unanswered
        post arrived. Every error text starts with the method.
        """
        if isinstance(exc, SlackApiError):
            return self._api_failure(exc, method, checking)
        if isinstance(exc, aiohttp.ClientConnectorError):
            # The connection was never made, so nothing was sent.
            return Retry(
                self.secret.redact(f"{method}: cannot connect: {exc}"), delivered_maybe=False
            )
        if isinstance(exc, TimeoutError):
            return Retry(f"{method}: no response within {self.timeout:g}s", delivered_maybe=True)
        text = self.secret.redact(f"{method}: {type(exc).__name__}: {exc}")
        return Retry(text, delivered_maybe=True)

    def _api_failure(self, exc: SlackApiError, method: str, checking: bool) -> Retry | Rejected:
        response = exc.response
        status = int(getattr(response, "status_code", 0) or 0)
        data = response.data if isinstance(response.data, dict) else {}
        code = str(data.get("error") or f"http_{status}")
        after = retry_after(getattr(response, "headers", None))
        answer = f"{method}: HTTP {status}, error {code}"
        if status == 429 or code == "ratelimited":
            return Retry(f"{answer} (rate limited)", delivered_maybe=False, after=after)
        if checking and code in ("missing_scope", "channel_not_found", "not_in_channel"):
            needed = data.get("needed") or "channels:history, groups:history"
            return Rejected(
                code,
                f"cannot read the channel to check whether an unanswered post reached it "
                f"({method}: {code})",
                f"give the Slack app the {needed} scope and invite the bot to the channel; "
                "until then such a message is dropped rather than risk posting it twice",
                Scope.MESSAGE,
            )
        if code in NOTIFIER_ERRORS:
            fix = NOTIFIER_ERRORS[code].format(channel=self.channel)
            return Rejected(code, f"Slack rejected {method}: {code}", fix, Scope.NOTIFIER)
        if code in MESSAGE_ERRORS:
            return Rejected(
                code,
                f"Slack rejected the message ({method}): {code}",
                MESSAGE_ERRORS[code],
                Scope.MESSAGE,
            )
        if status >= 500 or code in AMBIGUOUS_ERRORS:
            return Retry(answer, delivered_maybe=True, after=after)
        return Retry(
            answer,
            delivered_maybe=False,
            after=after,
            max_attempts=UNKNOWN_ERROR_ATTEMPTS,
        )

    async def aclose(self) -> None:
        await self._session.aclose()


class SlackWebhookTransport:
    """An incoming webhook: plain posts to the channel the webhook was made for."""

    mode = "webhook"
    threaded = False

    def __init__(self, secret: Secret, timeout: float) -> None:
        self.secret = secret
        self.timeout = timeout
        self._session = _Session(timeout)

    def known_channel_id(self) -> str | None:
        return None

    def learn_channel_id(self, channel_id: str) -> None:
        pass

    async def check(self) -> Result | None:
        # A webhook has no call that checks it without posting a message.
        return None

    async def post(
        self, payload: dict[str, Any], uid: str, thread: tuple[str, str] | None
    ) -> Result:
        url = self.secret.reveal()
        client = AsyncWebhookClient(
            url,
            timeout=max(1, round(self.timeout)),
            session=self._session.get(),
            logger=sdk_logger,
            retry_handlers=[],
        )
        client.proxy = proxy_for(url)
        try:
            with anyio.fail_after(self.timeout + 2):
                response = await client.send(
                    text=payload["text"],
                    blocks=payload["blocks"],
                    unfurl_links=False,
                    unfurl_media=False,
                )
        except (SlackClientError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                return Retry(
                    self.secret.redact(f"webhook: cannot connect: {exc}"), delivered_maybe=False
                )
            if isinstance(exc, TimeoutError):
                return Retry(f"webhook: no response within {self.timeout:g}s", delivered_maybe=True)
            return Retry(
                self.secret.redact(f"webhook: {type(exc).__name__}: {exc}"), delivered_maybe=True
            )
        return self._answer(response.status_code, response.body or "", response.headers)

    def _answer(self, status: int, body: str, headers: Mapping[str, Any]) -> Result:
        if status == 200:
            return Sent()
        code = body.strip()[:100] or f"http_{status}"
        answer = f"webhook: HTTP {status}, error {code}"
        if status == 429:
            return Retry(
                f"{answer} (rate limited)", delivered_maybe=False, after=retry_after(headers)
            )
        if code in WEBHOOK_NOTIFIER_ERRORS:
            return Rejected(
                code,
                f"Slack rejected the webhook: {code}",
                WEBHOOK_NOTIFIER_ERRORS[code],
                Scope.NOTIFIER,
            )
        if 400 <= status < 500:
            fix = MESSAGE_ERRORS["invalid_blocks"]
            return Rejected(code, f"Slack rejected the message: {code}", fix, Scope.MESSAGE)
        return Retry(answer, delivered_maybe=True, after=retry_after(headers))

    async def update(self, payload: dict[str, Any], channel_id: str, ts: str) -> Result:
        return Rejected(
            "unsupported", "a webhook cannot update messages", "nothing to do", Scope.MESSAGE
        )

    async def find(
        self, uid: str, since: float, thread: tuple[str, str] | None
    ) -> Sent | NotFound | Retry | Rejected:
        return Rejected(
            "unsupported",
            "a webhook cannot look messages up, so an unanswered post may or may not be in "
            "the channel",
            "nothing to do; the message is dropped rather than risk posting it twice",
            Scope.MESSAGE,
        )

    async def aclose(self) -> None:
        await self._session.aclose()


def _looks_like_channel_id(channel: str) -> bool:
    """Return whether ``channel`` is an ID (C…, G… or D… in capitals) rather than a name."""
    return channel[:1] in ("C", "G", "D") and channel.isalnum() and channel.isupper()


def _carries(message: Any, uid: str) -> bool:
    """Return whether a message from the history carries the outbox id ``uid``."""
    if not isinstance(message, dict):
        return False
    metadata = message.get("metadata") or {}
    payload = metadata.get("event_payload") or {}
    return bool(metadata.get("event_type") == METADATA_EVENT_TYPE and payload.get("id") == uid)
