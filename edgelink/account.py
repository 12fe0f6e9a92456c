"""One account of the bytes the gateway holds for others (API.md §1 "one account").

Every piece that holds bytes on someone's behalf (request bodies as they arrive, the decoded
cost of JSON, replies and stream chunks waiting to be written, WebSocket send queues and
inflated frames, stored session text, answers built from stored data, broker frames) asks
the account before it holds them and gives them back on every exit path. The pieces keep
their own bounds as limits inside it; the account is what makes them add up to one number.

Rules it keeps:
- ``take`` either grants all ``n`` bytes or nothing, and counts a refusal by piece.
- A piece may have its own limit inside the account (``limit``: the bodies' part is
  ``EDGELINK_MAX_BODIES``); what it holds over all shares stays under it.
- A ``Share`` is one connection's (or one owner's) part: it may hold at most
  ``share_limit`` bytes (``EDGELINK_CLIENT_SHARE`` of the total) unless opened unlimited
  (stored state owned by the gateway itself, such as sessions).
- ``Share.close`` gives back everything the share still holds, so a connection lost at any
  point leaves nothing behind; it is idempotent.
- No I/O, no clock, no tasks: the transport and the handlers drive it.
"""

from __future__ import annotations

from typing import Callable

# The pieces that draw from the account, by the names /metrics shows them under
# (edgelink_budget_bytes{piece}); every one is exported from the start.
BODIES = "bodies"  # request bodies as they arrive
REPLIES = "replies"  # module replies read, and answers waiting to be written
STREAMS = "streams"  # streamed chunks waiting to be written (at most 64 KiB per stream)
DECODE = "decode"  # what parsing a module reply costs while it runs
DECODED = "json_decoded"  # client JSON once decoded, and encoded again for its module
INBOUND = "ws_inbound"  # WebSocket messages received (inflated) and not yet handled
SNAPSHOT = "snapshot"  # snapshots being built from the ledger
SESSIONS = "sessions"  # stored session text, in bytes
PIECES = (BODIES, REPLIES, STREAMS, DECODE, DECODED, INBOUND, SNAPSHOT, SESSIONS)


class Account:
    __slots__ = ("total", "share_limit", "used", "held", "refusals", "limits", "_on_refusal")

    def __init__(self, total: int, share: float, on_refusal: Callable[[str], None] | None = None):
        self.total = total
        self.share_limit = int(total * share)
        self.used = 0
        self.held: dict[str, int] = {}  # bytes held now, by piece
        self.refusals: dict[str, int] = {}
        self.limits: dict[str, int] = {}  # a piece's own bound inside the account
        self._on_refusal = on_refusal

    def resize(self, total: int, share: float) -> None:
        """A reload's new bounds; what is held stays held and is given back as usual."""
        self.total = total
        self.share_limit = int(total * share)

    def limit(self, piece: str, n: int) -> None:
        """What ``piece`` may hold over all shares (inside the account's total)."""
        self.limits[piece] = n

    def open(self, limited: bool = True) -> Share:
        return Share(self, limited)

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)

    def refuse(self, piece: str) -> None:
        self.refusals[piece] = self.refusals.get(piece, 0) + 1
        if self._on_refusal is not None:
            self._on_refusal(piece)


class Share:
    """One holder's part of the account; see the module's rules."""

    __slots__ = ("account", "limited", "held", "by_piece")

    def __init__(self, account: Account, limited: bool):
        self.account = account
        self.limited = limited
        self.held = 0
        self.by_piece: dict[str, int] = {}

    def take(self, piece: str, n: int) -> bool:
        """Hold ``n`` more bytes for ``piece``, or refuse (counted) and hold nothing."""
        account = self.account
        if n <= 0:
            return True
        if account.used + n > account.total or (self.limited and self.held + n > account.share_limit) or (
                piece in account.limits and account.held.get(piece, 0) + n > account.limits[piece]):
            account.refuse(piece)
            return False
        self._add(piece, n)
        return True

    def give(self, piece: str, n: int) -> None:
        """Give back ``n`` bytes of ``piece`` (never more than it holds)."""
        n = min(n, self.by_piece.get(piece, 0))
        if n > 0:
            self._add(piece, -n)

    def close(self) -> int:
        """Give back everything still held; returns how many bytes that was."""
        given = self.held
        for piece, n in list(self.by_piece.items()):
            if n:
                self._add(piece, -n)
        return given

    def _add(self, piece: str, n: int) -> None:
        account = self.account
        account.used += n
        account.held[piece] = account.held.get(piece, 0) + n
        self.held += n
        self.by_piece[piece] = self.by_piece.get(piece, 0) + n
