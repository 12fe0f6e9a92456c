"""What the ledger raises: each says what happened to the write or the start that met it."""


class LedgerClosed(RuntimeError):
    """The ledger is not open (not started yet, or closed)."""


class LedgerUnavailable(RuntimeError):
    """The disk refused a write (full, read-only, I/O error); nothing of it is stored."""


class LedgerFull(RuntimeError):
    """The byte bound is reached and ``ledger_full`` is ``reject``; nothing of it is stored."""


class LedgerUnusable(RuntimeError):
    """The database file cannot be used (not SQLite, truncated, unreadable): the start stops."""
