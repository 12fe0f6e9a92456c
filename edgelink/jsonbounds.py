"""The bounds on what JSON from others costs to decode (API.md §1), in one place for the
transport, the handlers and the module calls.

- Depth: more than ``MAX_JSON_DEPTH`` levels is refused (orjson itself accepts ~1024 but
  refuses to encode past 255, so a deeper document would fail later, after it was stored
  or sent on).
- Decoded cost: a document whose structure would cost more than ``MAX_DECODE_RATIO`` times
  its size once decoded (1 MiB of ``[[],[],...]`` is ~22 MiB of Python lists, of
  ``[{"a":0},...]`` ~24 MiB) is refused before it is decoded. ``decode_cost`` estimates
  it from a byte scan, never from the decoded value.

The cost model (64-bit CPython, GC headers included; measured with tracemalloc against
orjson.loads on CPython 3.11, see docs/decoded-memory.md): a list 56 bytes, a dict 64
empty and 184 with up to 5 entries, each further entry 40 (the table's growth averaged), 8
bytes a slot per element, a string 56 beyond its text (24 for an object key: orjson shares
repeated short keys; nothing for "", a singleton), a number of 3 characters or more 32
(shorter ones are CPython's cached small integers), ``true``/``false``/``null`` their slot
only. A string's text counts as its bytes in the document, what a str of it takes unless
one wide character widens the whole string (then up to 4 bytes for each ASCII one: short
strings mixing ASCII and emoji can cost ~10x their text while counted ~7x; the model does
not look for them). On the shapes in tests/test_jsonbounds.py it is never under 0.75x of
what is allocated, and over it by up to ~1.5x on ordinary documents.
"""

from __future__ import annotations

from array import array
from functools import cache
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import orjson

from .account import DECODED

if TYPE_CHECKING:
    from .account import Share

MAX_JSON_DEPTH = 64  # API.md §1
MAX_DECODE_RATIO = 8  # API.md §1: decoded cost over size
# Decoded cost always allowed: below it the ratio says nothing about memory ({"a":{}} is
# 8 bytes of text and ~250 decoded).
DECODE_FLOOR = 64 * 1024

# translate() table: openers +1, closers -1 (signed bytes)
_BRACKET_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
# bytes of text scanned at a time by outside_strings: its pieces (one object per string,
# ~34 bytes each for the shortest) are bounded by this, not by the document's size
_SCAN_WINDOW = 64 * 1024

# the cost model (see the module docstring)
LIST, EMPTY_DICT, SMALL_DICT, SMALL_DICT_ENTRIES, ENTRY, SLOT, STRING, KEY, NUMBER = 56, 64, 184, 5, 40, 8, 56, 24, 32
_STRUCTURE = b"[]{},:-.0123456789"
_NUMBERS = bytes.maketrans(b"-.0123456789", b"d" * 12)  # a number's characters, all alike
# The most one byte of JSON costs decoded: 32 for "{}" or "[]" alone, less in any longer
# document (tests/test_jsonbounds.py), so a document this many times shorter than the
# floor is within it.
MAX_PER_BYTE = 64


class InvalidJSON(ValueError):
    """A document refused by ``parse_json``; the message says why, after "body is"."""


class CostlyJSON(ValueError):
    """A document whose decoded cost is over its bound; the message says why."""


class DecodeRefused(Exception):
    """The memory account has no room for what a document costs decoded."""


def outside_strings(raw: bytes | bytearray, keep: bytes) -> bytes:
    """The bytes of ``keep`` in the JSON text ``raw`` that are not inside strings."""
    return _scan(raw, keep)[0]


def _scan(raw: bytes | bytearray, keep: bytes) -> tuple[bytes, int, int]:
    """``outside_strings``, the number of (unescaped) quotes and of empty strings, in
    C-speed passes over windows of the text: escaped quotes removed (``\\\\`` first, as a
    left-to-right read pairs them), then only ``keep`` and quotes kept, and the pieces
    between quotes (strings) dropped. A window never ends inside an escape, and whether it
    ends inside a string carries over to the next."""
    drop = _dropping(keep)
    view = memoryview(raw)
    out: list[bytes] = []
    inside = False
    quotes = empty = 0
    start = 0
    while start < len(raw):
        end = min(start + _SCAN_WINDOW, len(raw))
        while end < len(raw) and raw[end - 1] == 0x5C:  # a backslash: take what it escapes too
            end += 1
        window = bytes(view[start:end])
        if b"\\" in window:
            window = window.replace(b"\\\\", b"").replace(b'\\"', b"")
        empty += window.count(b'""')  # a quote cannot follow a string's closing quote
        pieces = window.translate(None, drop).split(b'"')
        out.append(b"".join(pieces[1::2] if inside else pieces[::2]))
        quotes += len(pieces) - 1
        inside ^= len(pieces) % 2 == 0  # an odd number of quotes in the window
        start = end
    return b"".join(out), quotes, empty


@cache
def _dropping(keep: bytes) -> bytes:
    """A ``translate`` deletion table for every byte but ``keep`` and the quote."""
    return bytes(b for b in range(256) if b not in keep + b'"')


def json_depth(raw: bytes | bytearray) -> int:
    """How deep ``raw`` nests: the running sum of its brackets outside strings."""
    return max(accumulate(array("b", outside_strings(raw, b"[{]}").translate(_BRACKET_SIGNS))), default=0)


def decode_cost(raw: bytes | bytearray) -> int:
    """Bytes ``orjson.loads(raw)`` would allocate, estimated from one scan of the text."""
    text, quotes, empty = _scan(raw, _STRUCTURE)
    text = text.translate(_NUMBERS)
    dicts, empty_dicts, colons = text.count(b"{"), text.count(b"{}"), text.count(b":")
    small_dicts = dicts - empty_dicts
    lists, commas = text.count(b"["), text.count(b",")
    numbers = text.count(b",ddd") + text.count(b":ddd") + text.count(b"[ddd") + text.startswith(b"ddd")
    return (len(raw) - len(text)  # the strings' text (and whitespace, and literals)
            + LIST * lists + EMPTY_DICT * empty_dicts + SMALL_DICT * small_dicts
            + ENTRY * max(0, colons - SMALL_DICT_ENTRIES * small_dicts)
            + SLOT * (commas + lists) + STRING * max(0, quotes // 2 - empty - colons) + KEY * colons
            + NUMBER * numbers)


def _cost_bound(raw: bytes | bytearray) -> int:
    """An upper bound of ``decode_cost`` from a few ``count`` calls (brackets, commas and
    quotes inside strings counted too), to skip the scan for most documents."""
    count = raw.count
    return (len(raw) + (LIST + SLOT + NUMBER) * count(b"[") + SMALL_DICT * count(b"{")
            + (ENTRY + KEY + NUMBER) * count(b":") + (SLOT + NUMBER) * count(b",") + STRING * count(b'"') // 2)


def checked_cost(raw: bytes | bytearray, ratio: int = MAX_DECODE_RATIO, floor: int = DECODE_FLOOR) -> int:
    """What decoding ``raw`` costs, estimated (an upper bound from its length or a few
    ``count`` calls when that is within the limit, else ``decode_cost``); ``CostlyJSON``
    when it is more than ``ratio`` times its size and than ``floor``."""
    if len(raw) * MAX_PER_BYTE <= floor:  # most documents: within the floor whatever they hold
        return len(raw) * MAX_PER_BYTE
    allowed = max(ratio * len(raw), floor)
    cost = _cost_bound(raw)
    if cost <= allowed or (cost := decode_cost(raw)) <= allowed:
        return cost
    raise CostlyJSON(f"{len(raw)} bytes of JSON would cost about {cost} bytes once decoded, more than {ratio} "
                     "times their size: too many containers, strings or numbers for the size")


def decode(raw: bytes | bytearray, share: Share | None = None) -> tuple[Any, int]:
    """``orjson.loads`` for anything a client sends, and the bytes its value is estimated
    to cost: ``InvalidJSON`` for text that is not JSON or nests deeper than
    ``MAX_JSON_DEPTH``, ``CostlyJSON`` for a document that would cost more than
    ``MAX_DECODE_RATIO`` times its size decoded. With a ``share`` of the memory account,
    those bytes are taken from it first (``DecodeRefused`` if it has no room); the caller
    gives them back (``share.give(DECODED, cost)``) once it drops the value."""
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidJSON(f"nested deeper than {MAX_JSON_DEPTH} levels")
    cost = checked_cost(raw)
    if share is not None and not share.take(DECODED, cost):
        raise DecodeRefused(f"no room in the memory account for the {cost} bytes this JSON costs decoded")
    try:
        return orjson.loads(raw), cost
    except orjson.JSONDecodeError as exc:
        if share is not None:
            share.give(DECODED, cost)
        raise InvalidJSON(f"not valid JSON: {exc}") from None


def parse_json(raw: bytes | bytearray) -> Any:
    """``decode`` without an account: the value only."""
    return decode(raw)[0]
