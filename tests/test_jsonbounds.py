"""The JSON bounds (``edgelink.jsonbounds``): the decoded-cost model against what orjson
really allocates (tracemalloc), and the refusals it decides."""

from __future__ import annotations

import gc
import random
import tracemalloc

import orjson
import pytest

from edgelink.jsonbounds import (
    DECODE_FLOOR,
    MAX_PER_BYTE,
    CostlyJSON,
    InvalidJSON,
    checked_cost,
    decode_cost,
    parse_json,
)

MIB = 1024 * 1024
_rng = random.Random(20)

# name -> a document of about 1 MiB (or less), attack shapes and ordinary ones
SHAPES = {
    "empty lists": b"[" + b"[]," * (MIB // 3) + b"[]]",
    "empty objects": b"[" + b"{}," * (MIB // 3) + b"{}]",
    "tiny keys": b"[" + b'{"a":0},' * (MIB // 8) + b'{"a":0}]',
    "distinct keys": b"{" + b",".join(b'"%x":0' % i for i in range(MIB // 9)) + b"}",
    "short strings": b"[" + b'"ab",' * (MIB // 5) + b'"ab"]',
    "empty strings": b"[" + b'"",' * (MIB // 3) + b'""]',
    "numbers": b"[" + b"257," * (MIB // 4) + b"257]",
    "small numbers": b"[" + b"1," * (MIB // 2) + b"1]",
    "floats": orjson.dumps([_rng.random() for _ in range(50_000)]),
    "nulls": b"[" + b"null," * (MIB // 5) + b"null]",
    "one string": orjson.dumps({"a": "x" * MIB}),
    "emoji": orjson.dumps({"a": "\N{GRINNING FACE}" * (MIB // 4)}),
    "escapes": orjson.dumps({"a": "\"\\\n\u0001" * (MIB // 16)}),
    "log records": orjson.dumps([{"id": i, "message": f"log line {i} with some text", "level": "info",
                                  "ts": 1_700_000_000_000 + i} for i in range(8000)]),
    "event": orjson.dumps({"source": "s", "type": "t", "payload": {f"k{i}": f"value {i}" for i in range(2000)}}),
    "nested": orjson.dumps({"m": [[[[{"x": [i, {"y": "z"}]}]]] for i in range(20_000)]}),
}
# what must be refused (the attacks of API.md §1 and their kin) and what must not
COSTLY = {"empty lists", "empty objects", "tiny keys", "distinct keys", "short strings", "nested"}
CHEAP = {"empty strings", "small numbers", "floats", "nulls", "one string", "emoji", "escapes", "log records",
         "event"}


def allocated(raw: bytes) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        value = orjson.loads(raw)
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del value
    return size


@pytest.mark.parametrize("name", SHAPES)
def test_the_cost_model_follows_what_decoding_allocates(name):
    raw = SHAPES[name]
    real, model = allocated(raw), decode_cost(raw)
    # never much under what decoding costs, and not far over it (text counts as the bytes it
    # has in the document, escapes included)
    assert 0.75 * real <= model <= max(1.6 * real, 1.1 * len(raw)) + 4096, (name, real, model)


@pytest.mark.parametrize("name", sorted(COSTLY | CHEAP))
def test_refused_over_8_times_the_size_and_only_then(name):
    raw = SHAPES[name]
    if name in COSTLY:
        with pytest.raises(CostlyJSON, match="once decoded, more than 8 times"):
            parse_json(raw)
    else:
        assert parse_json(raw) == orjson.loads(raw)


def test_a_short_document_is_never_refused_for_its_cost():
    raw = b"[" + b"{}," * 340 + b"{}]"  # ~1 KiB of the costliest shape: ~25 KiB decoded
    assert decode_cost(raw) <= checked_cost(raw) <= DECODE_FLOOR
    assert parse_json(raw) == [{}] * 341


def test_brackets_and_quotes_inside_strings_are_not_structure():
    raw = orjson.dumps({"text": '[{"a":0},' * 100_000 + '\\"'})  # one string of 900 KB
    assert decode_cost(raw) < 2 * len(raw)
    assert parse_json(raw)["text"].startswith('[{"a":0}')


def test_too_deep_is_invalid_json_before_the_cost_is_asked():
    with pytest.raises(InvalidJSON, match="nested deeper than 64"):
        parse_json(b"[" * 65 + b"]" * 65)


@pytest.mark.parametrize("raw", [b"{}", b"[]", b"[{}]", b'{"a":{}}', b"[[[[]]]]", b"[" + b"{}," * 300 + b"{}]",
                                 b'[{"a":0},{"b":1}]', b'["",""]', b"[1000,1001]"])
def test_no_byte_of_a_short_document_costs_more_than_max_per_byte(raw):
    assert allocated(raw) <= MAX_PER_BYTE * len(raw) == checked_cost(raw)
