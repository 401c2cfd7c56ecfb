"""The notifier's persistent outbox: tables in the daemon's local state file.

Every message is written here before anything is sent, so a daemon that
stops or is killed leaves its undelivered messages to the next one. Rows
are written and read on the event loop: they are small, the file is local,
and the connection runs in WAL mode with ``synchronous=NORMAL``, so a
commit does not wait for the disk. That survives a killed process, but a
power loss may drop the last commits.

A row's ``unsure`` flag is set before each attempt and cleared once the
message is known to be sent or known not to be. A row that is still unsure
when it is picked again (the request timed out, the connection broke, the
daemon was killed mid-request) may already be in the channel, so the sender
checks before it posts again.
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from deployd.notifiers.messages import TOP, Action, Draft

logger = logging.getLogger("deployd.notifiers.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifier_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL,
    lock TEXT NOT NULL,
    event TEXT NOT NULL,
    action TEXT NOT NULL,
    ref TEXT,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    unsure INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    finished_at REAL,
    channel_id TEXT,
    ts TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS notifier_outbox_state ON notifier_outbox (state, id);
CREATE INDEX IF NOT EXISTS notifier_outbox_session ON notifier_outbox (session_id, ref);
CREATE INDEX IF NOT EXISTS notifier_outbox_queued ON notifier_outbox (state, session_id, id);
CREATE TABLE IF NOT EXISTS notifier_channels (
    name TEXT PRIMARY KEY,
    channel_id TEXT NOT NULL
);
"""


class State(enum.StrEnum):
    """The delivery state of a message."""

    QUEUED = "queued"  # waiting to be sent, or to be retried
    PARKED = "parked"  # held back because the service rejected the credentials or channel
    SENT = "sent"  # in the channel
    FAILED = "failed"  # given up: rejected for good, too old, or delivery unknown
    SKIPPED = "skipped"  # an update whose post was never sent: nothing to update


@dataclass(frozen=True, slots=True)
class Row:
    """One outbox message without its payload, as the sender schedules it.

    ``uid`` is the message's own id: it goes into the message's metadata, so
    a history check can tell whether an unsure attempt reached the channel.
    """

    id: int
    uid: str
    session_id: str
    lock: str
    action: Action
    ref: str | None
    unsure: bool
    attempts: int
    created_at: float
    first_attempt_at: float | None
    next_attempt_at: float

    @property
    def needs(self) -> str | None:
        """Return the ref of the post this message depends on: its thread parent or its target."""
        if self.action is Action.REPLY:
            return TOP
        if self.action is Action.UPDATE:
            return self.ref
        return None


@dataclass(frozen=True, slots=True)
class Posted:
    """The channel and ts of a deploy's earlier post, which its replies and updates need."""

    channel_id: str
    ts: str


_ROW_COLUMNS = (
    "id, uid, session_id, lock, action, ref, unsure, attempts, created_at, "
    "first_attempt_at, next_attempt_at"
)


def _row(values: Sequence[Any]) -> Row:
    return Row(
        id=values[0],
        uid=values[1],
        session_id=values[2],
        lock=values[3],
        action=Action(values[4]),
        ref=values[5],
        unsure=bool(values[6]),
        attempts=values[7],
        created_at=values[8],
        first_attempt_at=values[9],
        next_attempt_at=values[10],
    )


class Outbox:
    """The outbox tables in one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._connection = sqlite3.connect(path, timeout=2.0, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()

    # --- writing ---

    def add(
        self, session_id: str, lock: str, event: str, drafts: Iterable[Draft], now: float
    ) -> list[int]:
        """Queue ``drafts`` in order, in one transaction; return their ids."""
        ids = []
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            for draft in drafts:
                cursor = self._connection.execute(
                    "INSERT INTO notifier_outbox (uid, session_id, lock, event, action, ref, "
                    "payload, state, created_at, next_attempt_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        secrets.token_hex(12),
                        session_id,
                        lock,
                        event,
                        str(draft.action),
                        draft.ref,
                        json.dumps(draft.payload()),
                        str(State.QUEUED),
                        now,
                        now,
                    ),
                )
                assert cursor.lastrowid is not None
                ids.append(cursor.lastrowid)
        return ids

    def begin_attempt(self, row_id: int, now: float) -> None:
        """Record that an attempt starts: from here on the message may be in the channel."""
        self._connection.execute(
            "UPDATE notifier_outbox SET unsure = 1, attempts = attempts + 1, "
            "first_attempt_at = COALESCE(first_attempt_at, ?) WHERE id = ?",
            (now, row_id),
        )

    def mark_sent(self, row_id: int, channel_id: str | None, ts: str | None, now: float) -> None:
        """Record that the message is in the channel."""
        self._connection.execute(
            "UPDATE notifier_outbox SET state = ?, unsure = 0, finished_at = ?, channel_id = ?, "
            "ts = ?, error = NULL WHERE id = ?",
            (str(State.SENT), now, channel_id, ts, row_id),
        )

    def mark_retry(self, row_id: int, next_attempt_at: float, error: str, unsure: bool) -> None:
        """Schedule another attempt; ``unsure`` if the last one may have been delivered."""
        self._connection.execute(
            "UPDATE notifier_outbox SET state = ?, unsure = ?, next_attempt_at = ?, error = ? "
            "WHERE id = ?",
            (str(State.QUEUED), int(unsure), next_attempt_at, error, row_id),
        )

    def mark_finished(self, row_id: int, state: State, error: str, now: float) -> None:
        """Give up on a message: FAILED or SKIPPED, with the reason."""
        self._connection.execute(
            "UPDATE notifier_outbox SET state = ?, finished_at = ?, error = ? WHERE id = ?",
            (str(state), now, error, row_id),
        )

    def park_queued(self, error: str) -> int:
        """Hold back every queued message; return how many."""
        cursor = self._connection.execute(
            "UPDATE notifier_outbox SET state = ?, error = ? WHERE state = ?",
            (str(State.PARKED), error, str(State.QUEUED)),
        )
        return cursor.rowcount

    def requeue(self, now: float) -> int:
        """Make every queued message due now and queue the parked ones again; return those.

        Called when a daemon starts: a restart retries at once, whatever
        backoff or Retry-After the previous daemon was waiting out.
        """
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.execute(
                "UPDATE notifier_outbox SET next_attempt_at = ? WHERE state = ?",
                (now, str(State.QUEUED)),
            )
            cursor = self._connection.execute(
                "UPDATE notifier_outbox SET state = ?, next_attempt_at = ? WHERE state = ?",
                (str(State.QUEUED), now, str(State.PARKED)),
            )
        return cursor.rowcount

    def prune(self, before: float) -> int:
        """Delete finished messages older than ``before``; return how many.

        Messages of a deploy that still has queued or parked ones are kept,
        because its replies and updates need the ts of its posts.
        """
        cursor = self._connection.execute(
            "DELETE FROM notifier_outbox WHERE state IN (?, ?, ?) AND created_at < ? "
            "AND session_id NOT IN (SELECT session_id FROM notifier_outbox WHERE state IN (?, ?))",
            (
                str(State.SENT),
                str(State.FAILED),
                str(State.SKIPPED),
                before,
                str(State.QUEUED),
                str(State.PARKED),
            ),
        )
        return cursor.rowcount

    def remember_channel(self, name: str, channel_id: str) -> None:
        """Store the ID that Slack returned for the configured channel name."""
        self._connection.execute(
            "INSERT INTO notifier_channels (name, channel_id) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET channel_id = excluded.channel_id",
            (name, channel_id),
        )

    # --- reading ---

    def queued(self, limit: int = 5000) -> list[Row]:
        """Return the queued messages in id order (the order their events came in)."""
        rows = self._connection.execute(
            f"SELECT {_ROW_COLUMNS} FROM notifier_outbox WHERE state = ? ORDER BY id LIMIT ?",
            (str(State.QUEUED), limit),
        ).fetchall()
        return [_row(values) for values in rows]

    def heads(self) -> Generator[Row, None, None]:
        """Yield the first queued message of each deploy, oldest first, read as consumed."""
        cursor = self._connection.execute(
            f"SELECT {_ROW_COLUMNS} FROM notifier_outbox WHERE id IN "
            "(SELECT MIN(id) FROM notifier_outbox WHERE state = ? GROUP BY session_id) "
            "ORDER BY id",
            (str(State.QUEUED),),
        )
        try:
            for values in cursor:
                yield _row(values)
        finally:
            cursor.close()

    def creator(self, session_id: str, ref: str) -> Row | None:
        """Return the queued post of a deploy that creates ``ref``, if any."""
        found = self._connection.execute(
            f"SELECT {_ROW_COLUMNS} FROM notifier_outbox WHERE session_id = ? AND ref = ? "
            "AND action = ? AND state = ? ORDER BY id LIMIT 1",
            (session_id, ref, str(Action.POST), str(State.QUEUED)),
        ).fetchone()
        return _row(found) if found else None

    def is_posted(self, session_id: str, ref: str) -> bool:
        """Return whether the deploy's post ``ref`` was sent."""
        return self.posted(session_id, ref) is not None

    def payload(self, row_id: int) -> dict[str, Any]:
        """Return the text and blocks of a message."""
        (text,) = self._connection.execute(
            "SELECT payload FROM notifier_outbox WHERE id = ?", (row_id,)
        ).fetchone()
        payload: dict[str, Any] = json.loads(text)
        return payload

    def posted(self, session_id: str, ref: str) -> Posted | None:
        """Return where the deploy's post ``ref`` landed, if it was sent."""
        found = self._connection.execute(
            "SELECT channel_id, ts FROM notifier_outbox WHERE session_id = ? AND ref = ? "
            "AND action = ? AND state = ? AND ts IS NOT NULL ORDER BY id LIMIT 1",
            (session_id, ref, str(Action.POST), str(State.SENT)),
        ).fetchone()
        return Posted(found[0], found[1]) if found else None

    def channel_id(self, name: str) -> str | None:
        """Return the remembered ID of a channel name."""
        found = self._connection.execute(
            "SELECT channel_id FROM notifier_channels WHERE name = ?", (name,)
        ).fetchone()
        return str(found[0]) if found else None

    def counts(self) -> dict[str, int]:
        """Return the number of messages in each state (every state appears)."""
        counts = {str(state): 0 for state in State}
        for state, count in self._connection.execute(
            "SELECT state, COUNT(*) FROM notifier_outbox GROUP BY state"
        ):
            counts[state] = count
        return counts

    def oldest_queued(self) -> float | None:
        """Return when the oldest queued or parked message was written (epoch seconds)."""
        (oldest,) = self._connection.execute(
            "SELECT MIN(created_at) FROM notifier_outbox WHERE state IN (?, ?)",
            (str(State.QUEUED), str(State.PARKED)),
        ).fetchone()
        return float(oldest) if oldest is not None else None


def pick_next(
    heads: Iterable[Row],
    is_posted: Callable[[str, str], bool],
    creator: Callable[[str, str], Row | None],
    now: float,
) -> tuple[Row | None, float | None]:
    """Choose the next message to send; return it (or None) and when to look again.

    ``heads`` are the first queued message of each deploy, in id order.
    ``is_posted(session_id, ref)`` returns whether a deploy's post was sent,
    and ``creator(session_id, ref)`` returns the queued post that creates it.
    The rules:

    - Each deploy's messages go one at a time, in id order: a deploy whose
      first queued message waits for a retry waits as a whole.
    - A reply or update whose post is still queued behind it (a takeover
      reply emitted just before its deploy's "started" post) lets that post
      go first, so a reply never overtakes its parent and an update never
      precedes the post that creates its ts.
    - The deploy whose first queued message is oldest goes first. Only the
      heads up to the first ready one are read, so a long queue costs little.
    """
    wake_at: float | None = None
    for head in heads:
        candidate = head
        needs = head.needs
        if needs is not None and not is_posted(head.session_id, needs):
            candidate = creator(head.session_id, needs) or head
        if candidate.next_attempt_at <= now:
            return candidate, None
        if wake_at is None or candidate.next_attempt_at < wake_at:
            wake_at = candidate.next_attempt_at
    return None, wake_at
