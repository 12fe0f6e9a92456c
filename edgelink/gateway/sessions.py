"""Context-7: the in-memory chat sessions behind ``/operator/chat`` (API.md §4).

A pure piece: no sockets and no hidden clock. ``now`` returns epoch seconds, because the
API reports ``created_at``/``expires_at`` as epoch milliseconds; tests pass a fake clock.

Rules kept:

- Sliding TTL: a session expires ``ttl`` seconds after its last activity. Activity is a
  chat turn (``open``, ``append``). Reads (``view``, ``list_sessions``,
  ``context_summary``) are not activity, so an operator watching sessions neither keeps
  them alive nor changes which one is evicted next.
- An expired session is dead at once, even before ``sweep`` removes it: every lookup
  checks expiry. Its history is never served again.
- Bounds: at most ``max_sessions`` sessions and ``max_messages`` messages per session
  (API.md §4), and about ``max_bytes`` of memory in all, counting every stored string
  (ids, messages, metadata). Counts alone do not bound memory
  (a reply may be megabytes), and 10,000 x 100 ordinary messages would already be ~300 MB.
  Over a bound, the oldest messages of a session and the least recently active sessions go
  first; the session of the current turn is never evicted for another's sake, and keeps at
  least its newest message.

Theory of operation: sessions live in an ``OrderedDict`` kept in order of last activity
(every activity moves its session to the end). The TTL is the same for every session and
slides from the last activity, so that order is also expiry order: eviction pops the front
in O(1), and ``sweep`` pops from the front until it meets a live session, O(expired). (If
the wall clock steps backwards the order can be briefly off; lookups still check expiry,
so a late sweep never serves stale history.)

Memory is counted, not measured: a message costs its text object plus a fixed overhead,
and its metadata is kept as compact JSON bytes, so its cost is known exactly and a caller
mutating its dict later cannot rewrite history. The overheads were measured with
``bench/session_memory.py`` (CPython 3.11, 64-bit). A text counts the bytes it occupies,
never its characters: the str object (1, 2 or 4 bytes a character, by its widest one) or
its UTF-8 length, whichever is larger (``text_cost``). A message is never larger than the
bound: a text that alone would pass it is cut to fit (``max_text``), and metadata over half
of that is kept as ``{"truncated": true, "bytes": n}``, so the newest message kept does
not carry the store past it. The view splices the stored metadata into the answer
as it is (``orjson.Fragment``), never decoding it, so a read costs about what is stored.

With a ``share`` of the memory account (API.md §1), the store also asks the account before
it holds more bytes, evicting the least recently active sessions (never the current one)
to make room, and gives bytes back as it drops them; a turn that still finds no room is
refused with ``SessionsOverloaded``.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import orjson

from ..account import SESSIONS

if TYPE_CHECKING:
    from ..account import Share

DEFAULT_USER = "local"  # Tentáculo Link's user when a chat names none (API.md §4, §12)
SUMMARY_MESSAGES = 10  # API.md §4: the summary is the last 10 messages...
SUMMARY_CHARS = 500  # ...each content cut to 500 chars

# Measured bytes beyond the texts: per message the tuple, its GC header, the timestamp int
# and the list slot; per session the Session object, its id, floats, list and dict entry.
MESSAGE_OVERHEAD = 128
SESSION_OVERHEAD = 270
_EMPTY_STR = sys.getsizeof("")


def str_width(text: str) -> int:
    """Bytes a character of ``text`` takes in its str object: 1, 2 or 4 (by its widest)."""
    if text.isascii():
        return 1
    widest = max(text)
    return 1 if widest < "\u0100" else 2 if widest < "\U00010000" else 4


def char_cost(text: str) -> int:
    """Bytes a character of ``text`` counts for: its width in the str object, or its
    UTF-8 length if that is more (a non-ASCII character of 1 or 2 bytes in the object is
    up to 2 or 3 in UTF-8)."""
    if text.isascii():
        return 1
    width = str_width(text)
    return width if width == 4 else width + 1


def text_cost(text: str) -> int:
    """The bytes ``text`` occupies: its str object, or its UTF-8 length if that is more."""
    return sys.getsizeof(text) + (char_cost(text) - str_width(text)) * len(text)


class SessionsOverloaded(Exception):
    """The memory account has no room for a chat turn, even after evicting other sessions."""


class Message(NamedTuple):
    """One recorded message; a tuple, so it costs no per-instance dict."""

    role: str
    content: str
    timestamp: int  # epoch ms
    metadata: bytes | None  # compact JSON


class Session:
    """One conversation. ``created_at`` and ``last_active`` are epoch seconds."""

    __slots__ = ("session_id", "user_id", "created_at", "last_active", "messages", "size")

    def __init__(self, session_id: str, user_id: str | None, now: float) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.created_at = now
        self.last_active = now
        # A list, not a deque: an empty deque costs ~600 bytes, and dropping the oldest of
        # at most max_messages entries is cheap.
        self.messages: list[Message] = []
        # every stored string counts: the ids as much as the messages
        self.size = SESSION_OVERHEAD + text_cost(session_id) + _str_cost(user_id)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _str_cost(value: str | None) -> int:
    return 0 if value is None else text_cost(value)


def _cost(message: Message) -> int:
    meta = message.metadata
    return MESSAGE_OVERHEAD + text_cost(message.content) + (0 if meta is None else sys.getsizeof(meta))


class SessionStore:
    """The Context-7 sessions, bounded in count, length and memory, with a sliding TTL."""

    def __init__(
        self,
        *,
        ttl: float,
        max_sessions: int,
        max_messages: int,
        max_bytes: int,
        now: Callable[[], float] = time.time,
        share: Share | None = None,
    ) -> None:
        if ttl <= 0 or max_sessions < 1 or max_messages < 1 or max_bytes < 1:
            raise ValueError("ttl must be > 0; max_sessions, max_messages and max_bytes >= 1")
        self._ttl = ttl
        self._max_sessions = max_sessions
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._now = now
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._bytes = 0
        self._share = share

    def __len__(self) -> int:
        """Sessions held, counting expired ones not yet swept."""
        return len(self._sessions)

    @property
    def bytes_used(self) -> int:
        """Estimated memory held by the sessions, in bytes."""
        return self._bytes

    @property
    def max_text(self) -> int:
        """The most bytes one message's text may occupy (``text_cost``): what is left of
        the bound beyond one session and one message's overheads."""
        return max(0, self._max_bytes - SESSION_OVERHEAD - 2 * MESSAGE_OVERHEAD - 2 * 256 * 4)

    # -- chat turns (activity) ------------------------------------------------------

    def open(self, session_id: str | None, user_id: str | None = None) -> str:
        """Continue or start the session for a chat turn, mark it active, return its id.

        No id: a new session with a uuid4 id. An unknown, expired or evicted id: a new,
        empty session under that same id -- the client keeps using the id it holds (as with
        Tentáculo Link, which keyed sessions by the caller's id) while the old history is
        gone for good. A ``user_id`` fills in a session that has none; it never replaces one.
        """
        now = self._now()
        session = self._live(session_id, now) if session_id else None
        if session is None:
            session = self._create(session_id or str(uuid.uuid4()), user_id, now)
        else:
            if session.user_id is None and user_id is not None:
                self._reserve(_str_cost(user_id), keep=session)
                session.user_id = user_id
                self._resize(session, _str_cost(user_id))
            self._touch(session, now)
            self._shed(keep=session)
        return session.session_id

    def append(
        self,
        session_id: str,
        role: str,
        content: str,
        *,
        timestamp: int | None = None,
        metadata: Any = None,
    ) -> bool:
        """Record a message (``timestamp`` in epoch ms, default now) and mark the session active.

        ``metadata`` must be JSON-serialisable (orjson). Returns False and records nothing
        when the session is unknown, expired or evicted: a reply that outlived its session
        is dropped rather than starting a session that holds an answer without its question.
        A text longer than ``max_text`` is cut to fit, metadata over half of it summarised.
        ``SessionsOverloaded`` when the memory account has no room for it.
        """
        now = self._now()
        session = self._live(session_id, now)
        if session is None:
            return False
        stored = None if metadata is None else orjson.dumps(metadata)
        if stored is not None and len(stored) > self.max_text // 2:  # its text must fit beside it
            stored = orjson.dumps({"truncated": True, "bytes": len(stored)})
        message = Message(
            role,
            fit_text(content, self.max_text - (0 if stored is None else sys.getsizeof(stored))),
            _ms(now) if timestamp is None else timestamp,
            stored,
        )
        cost = _cost(message)
        if cost + session.size > self._max_bytes:  # room within the bound first: older messages go
            self._drop_oldest(session, session.size + cost - self._max_bytes)
        self._reserve(cost, keep=session)
        messages = session.messages
        messages.append(message)
        self._resize(session, cost)
        while len(messages) > self._max_messages or (session.size > self._max_bytes and len(messages) > 1):
            self._resize(session, -_cost(messages.pop(0)))
        self._touch(session, now)
        self._shed(keep=session)
        return True

    # -- reads (not activity) -------------------------------------------------------

    def context_summary(self, session_id: str) -> str:
        """The last messages as ``role: content`` lines, contents cut (empty if unknown)."""
        session = self._live(session_id, self._now())
        return "" if session is None else self._summary(session)

    def view(self, session_id: str) -> dict[str, Any] | None:
        """The ``GET /operator/session/{id}`` body, or None when unknown or expired; the
        metadata as stored (``orjson.Fragment``), never decoded."""
        session = self._live(session_id, self._now())
        if session is None:
            return None
        return {
            "session_id": session.session_id,
            "user_id": DEFAULT_USER if session.user_id is None else session.user_id,
            "summary": self._summary(session),
            "created_at": _ms(session.created_at),
            "last_active_at": _ms(session.last_active),
            "expires_at": _ms(session.last_active + self._ttl),
            "message_count": len(session.messages),
            "messages": [
                {
                    "role": m.role,
                    "content": m.content,
                    "timestamp": m.timestamp,
                    "metadata": None if m.metadata is None else orjson.Fragment(m.metadata),
                }
                for m in session.messages
            ],
        }

    def messages(self, session_id: str) -> list[Message]:
        """A live session's messages as stored, oldest first (empty when unknown)."""
        session = self._live(session_id, self._now())
        return [] if session is None else list(session.messages)

    def size_of(self, session_id: str) -> int:
        """The bytes a session holds (0 when unknown): about what its view takes as JSON."""
        session = self._sessions.get(session_id)
        return 0 if session is None else session.size

    def list_sessions(self) -> dict[str, Any]:
        """The ``GET /vx11/context-7/sessions`` body, most recently active first."""
        now = self._now()
        sessions = [
            {
                "session_id": s.session_id,
                "created_at": _ms(s.created_at),
                "expires_at": _ms(s.last_active + self._ttl),
                "message_count": len(s.messages),
            }
            for s in reversed(self._sessions.values())
            if not self._expired(s, now)
        ]
        return {"sessions": sessions, "total": len(sessions)}

    # -- removal --------------------------------------------------------------------

    def delete(self, session_id: str) -> bool:
        """Forget a session; False when it was unknown or already expired."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        self._remove(session)
        return not self._expired(session, self._now())

    def sweep(self) -> int:
        """Remove expired sessions; returns how many were removed."""
        now = self._now()
        removed = 0
        # Front to back is least to most recently active, i.e. soonest to latest expiry.
        while self._sessions and self._expired(oldest := next(iter(self._sessions.values())), now):
            self._remove(oldest)
            removed += 1
        return removed

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _summary(session: Session) -> str:
        return "\n".join(
            f"{m.role}: {m.content[:SUMMARY_CHARS]}" for m in session.messages[-SUMMARY_MESSAGES:]
        )

    def _expired(self, session: Session, now: float) -> bool:
        return now >= session.last_active + self._ttl

    def _live(self, session_id: str, now: float) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and self._expired(session, now):
            self._remove(session)
            return None
        return session

    def _touch(self, session: Session, now: float) -> None:
        session.last_active = now
        self._sessions.move_to_end(session.session_id)

    def _resize(self, session: Session, delta: int) -> None:
        """Count ``delta`` more bytes (a growth already ``_reserve``d)."""
        session.size += delta
        self._bytes += delta
        if delta < 0 and self._share is not None:
            self._share.give(SESSIONS, -delta)

    def _remove(self, session: Session) -> None:
        del self._sessions[session.session_id]
        self._bytes -= session.size
        if self._share is not None:
            self._share.give(SESSIONS, session.size)

    def _drop_oldest(self, session: Session, excess: int) -> None:
        """Drop ``session``'s oldest messages until ``excess`` bytes are freed (or none is left)."""
        messages = session.messages
        while excess > 0 and messages:
            cost = _cost(messages.pop(0))
            self._resize(session, -cost)
            excess -= cost

    def _reserve(self, n: int, keep: Session | None) -> None:
        """Take ``n`` bytes from the account, evicting the least recently active sessions
        (never ``keep``) while it has no room; ``SessionsOverloaded`` if it still has none."""
        share = self._share
        if share is None:
            return
        while not share.take(SESSIONS, n):
            oldest = next((s for s in self._sessions.values() if s is not keep), None)
            if oldest is None:
                raise SessionsOverloaded(f"no room in the memory account for {n} bytes of session text")
            self._remove(oldest)

    def _shed(self, keep: Session) -> None:
        """Evict least recently active sessions, never ``keep``, until within the bounds."""
        while len(self._sessions) > self._max_sessions or self._bytes > self._max_bytes:
            oldest = next(iter(self._sessions.values()))
            if oldest is keep:
                return
            self._remove(oldest)

    def _create(self, session_id: str, user_id: str | None, now: float) -> Session:
        session = Session(session_id, user_id, now)
        self._reserve(session.size, keep=None)
        self._sessions[session_id] = session
        self._bytes += session.size
        self._shed(keep=session)
        return session


def fit_text(text: str, limit: int) -> str:
    """``text``, or as much of its start as occupies at most ``limit`` bytes (``text_cost``)."""
    if text_cost(text) <= limit:
        return text
    return text[:max(0, limit - _EMPTY_STR - 32) // char_cost(text)]
