"""Context-7 session store: TTL, bounds, summary, views, sweeping (fake clock, no sleeps)."""

from __future__ import annotations

import asyncio
import sys
import uuid

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clock import T0, Clock
from conftest import holds, until
from edgelink.account import Account
from edgelink.config import load_settings
from edgelink.gateway.sessions import (
    MESSAGE_OVERHEAD,
    SESSION_OVERHEAD,
    SessionsOverloaded,
    SessionStore,
    text_cost,
)
from edgelink.periodic import Periodic
from edgelink.runtime import session_store


def make(clock: Clock, **bounds) -> SessionStore:
    limits = {"ttl": 10.0, "max_sessions": 100, "max_messages": 100, "max_bytes": 2**40}
    limits.update(bounds)
    return SessionStore(now=clock, **limits)


def contents(store: SessionStore, sid: str) -> list[str]:
    view = store.view(sid)
    assert view is not None
    return [m["content"] for m in view["messages"]]


# -- opening sessions ---------------------------------------------------------------


def test_open_without_id_starts_a_session_with_a_uuid4():
    store = make(Clock())
    sid = store.open(None, "alice")
    assert uuid.UUID(sid).version == 4
    assert store.view(sid)["user_id"] == "alice"
    assert store.open(None) != sid


def test_open_adopts_an_unknown_id_and_continues_a_known_one():
    clock = Clock()
    store = make(clock)
    assert store.open("client-chosen") == "client-chosen"
    store.append("client-chosen", "user", "hi")
    clock.advance(1)
    assert store.open("client-chosen") == "client-chosen"
    assert contents(store, "client-chosen") == ["hi"]
    assert len(store) == 1


def test_user_id_fills_in_but_never_replaces():
    store = make(Clock())
    sid = store.open("s")
    store.open("s", "alice")
    store.open("s", "mallory")
    assert store.view(sid)["user_id"] == "alice"


# -- sliding TTL ----------------------------------------------------------------------


def test_activity_slides_the_expiry():
    clock = Clock()
    store = make(clock, ttl=10)
    sid = store.open(None)
    clock.advance(9)
    assert store.append(sid, "user", "still here")
    clock.advance(9)  # 18 s after creation, 9 s after the last activity
    view = store.view(sid)
    assert view is not None
    assert view["last_active_at"] == int((T0 + 9) * 1000)
    assert view["expires_at"] == int((T0 + 19) * 1000)
    clock.advance(1)  # exactly ttl after the last activity
    assert store.view(sid) is None


def test_reads_are_not_activity():
    clock = Clock()
    store = make(clock, ttl=10)
    sid = store.open(None)
    store.append(sid, "user", "x")
    for _ in range(9):
        clock.advance(1)
        assert store.view(sid) is not None
        store.context_summary(sid)
        store.list_sessions()
    clock.advance(1)
    assert store.view(sid) is None


def test_expired_session_is_never_resurrected():
    clock = Clock()
    store = make(clock, ttl=10)
    sid = store.open("s", "alice")
    store.append(sid, "user", "secret from before")
    clock.advance(10)

    # append on an expired id behaves as unknown: nothing is stored, nothing is created
    assert store.append(sid, "assistant", "late reply") is False
    assert store.view(sid) is None
    assert len(store) == 0

    # a new chat turn under the same id starts afresh
    assert store.open(sid, "bob") == sid
    view = store.view(sid)
    assert view["messages"] == [] and view["message_count"] == 0
    assert view["user_id"] == "bob"
    assert view["created_at"] == int(clock.t * 1000)
    assert store.context_summary(sid) == ""


def test_expired_but_unswept_session_is_reopened_empty():
    clock = Clock()
    store = make(clock, ttl=10)
    store.open("s")
    store.append("s", "user", "old")
    clock.advance(11)
    assert len(store) == 1  # not swept yet
    store.open("s")
    assert contents(store, "s") == []


# -- bounds ---------------------------------------------------------------------------


def test_least_recently_active_session_is_evicted_first():
    clock = Clock()
    store = make(clock, max_sessions=3)
    for sid in ("a", "b", "c"):
        store.open(sid)
        clock.advance(1)
    store.append("a", "user", "a is active again")  # order of activity: b, c, a
    store.view("b")  # a read does not save b
    store.open("d")
    assert store.view("b") is None
    assert [s["session_id"] for s in store.list_sessions()["sessions"]] == ["d", "a", "c"]
    store.open("e")
    assert store.view("c") is None
    assert len(store) == 3


def test_message_cap_drops_the_oldest():
    store = make(Clock(), max_messages=3)
    sid = store.open(None)
    for i in range(5):
        store.append(sid, "user", f"m{i}")
    assert contents(store, sid) == ["m2", "m3", "m4"]
    assert store.view(sid)["message_count"] == 3


def test_byte_budget_evicts_other_sessions_least_recently_active_first():
    clock = Clock()
    text = "x" * 1000
    per_session = SESSION_OVERHEAD + 200 + 2 * (MESSAGE_OVERHEAD + 1100)  # generous
    store = make(clock, max_bytes=3 * per_session)
    for sid in ("a", "b", "c"):
        store.open(sid)
        store.append(sid, "user", text)
        store.append(sid, "assistant", text)
        clock.advance(1)
    assert len(store) == 3
    store.append("a", "user", "a moves to the end")
    store.open("d")
    for _ in range(3):
        store.append("d", "user", text)
    assert store.view("b") is None  # least recently active went first
    assert store.view("d") is not None and store.view("a") is not None
    assert store.bytes_used <= 3 * per_session


def test_a_session_alone_over_budget_keeps_its_newest_messages():
    store = make(Clock(), max_bytes=5000)
    sid = store.open(None)
    for i in range(10):
        store.append(sid, "user", f"{i}" * 1000)
    kept = contents(store, sid)
    assert kept and kept[-1] == "9" * 1000
    assert len(kept) < 10
    assert store.bytes_used <= 5000

    # one message larger than the whole budget is cut to fit: the bound holds
    store.append(sid, "assistant", "y" * 10_000)
    kept = contents(store, sid)
    assert kept[-1] == "y" * len(kept[-1]) and 1000 < len(kept[-1]) < 10_000
    assert store.bytes_used <= 5000
    # and metadata that alone would pass it is summarised
    store.append(sid, "user", "z", metadata={"blob": "m" * 10_000})
    view = orjson.loads(orjson.dumps(store.view(sid)))
    assert view["messages"][-1] == {**view["messages"][-1], "content": "z",
                                    "metadata": {"truncated": True, "bytes": 10011}}
    assert store.bytes_used <= 5000


@pytest.mark.parametrize("char", ["y", "\u00e9", "\u4e2d", "\N{GRINNING FACE}"])  # 1 to 4 bytes in UTF-8
def test_stored_text_counts_its_bytes_never_its_characters(char):
    assert text_cost(char * 1000) >= max(sys.getsizeof(char * 1000), len((char * 1000).encode()))
    store = make(Clock(), max_bytes=65536)
    sid = store.open(None)
    for _ in range(50):
        store.append(sid, "assistant", char * 30_000)  # each alone over the bound in bytes, unless ASCII
        assert store.bytes_used <= 65536
        assert sum(len(c.encode()) for c in contents(store, sid)) <= 65536


def test_a_store_with_a_share_asks_the_account_first_and_gives_everything_back():
    account = Account(100_000, 0.25)
    share = account.open(limited=False)
    clock = Clock()
    store = make(clock, max_bytes=1_000_000, share=share)
    sids = [store.open(None) for _ in range(5)]
    for sid in sids:
        store.append(sid, "user", "\N{GRINNING FACE}" * 5_000)  # ~20 KB each
        assert share.held == store.bytes_used <= 100_000
    assert store.view(sids[0]) is None  # evicted to make room in the account
    others = account.open()  # a connection holds the rest of the account
    assert others.take("body", account.free)
    with pytest.raises(SessionsOverloaded):  # more than evicting every other session frees
        store.append(sids[-1], "user", "x" * 90_000)
    assert contents(store, sids[-1]) == ["\N{GRINNING FACE}" * 5_000]  # the turn's own session stays
    assert len(store) == 1 and share.held == store.bytes_used
    others.close()
    clock.advance(3600)
    store.sweep()
    assert share.held == store.bytes_used == 0 and account.used == 0


def test_bytes_used_returns_to_zero_when_everything_is_gone():
    clock = Clock()
    store = make(clock)
    for i in range(5):
        sid = store.open(None)
        store.append(sid, "user", "hello " * i, metadata={"i": i})
    store.delete(sid)
    clock.advance(60)
    store.sweep()
    assert len(store) == 0
    assert store.bytes_used == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["open", "append", "delete", "sweep", "tick"]),
            st.integers(0, 5),
            st.text(max_size=300),
        ),
        max_size=60,
    )
)
def test_accounting_and_bounds_hold_under_any_sequence(ops):
    clock = Clock()
    store = make(clock, ttl=5, max_sessions=3, max_messages=4, max_bytes=4000)
    for op, n, text in ops:
        sid = f"s{n}"
        if op == "open":
            store.open(sid, text or None)
        elif op == "append":
            store.append(sid, "user", text, metadata={"n": n} if n % 2 else None)
        elif op == "delete":
            store.delete(sid)
        elif op == "sweep":
            store.sweep()
        else:
            clock.advance(n)
        assert len(store) <= 3
        for s in store.list_sessions()["sessions"]:
            assert store.view(s["session_id"])["message_count"] <= 4
        if len(store) > 1:  # a lone session may hold one message over budget
            assert store.bytes_used <= 4000
        # the running count equals a recount from scratch
        recount = sum(
            SESSION_OVERHEAD
            + text_cost(s.session_id)
            + (text_cost(s.user_id) if s.user_id is not None else 0)
            + sum(
                MESSAGE_OVERHEAD + text_cost(m.content) + (sys.getsizeof(m.metadata) if m.metadata else 0)
                for m in s.messages
            )
            for s in store._sessions.values()
        )
        assert store.bytes_used == recount


def test_user_id_counts_toward_the_byte_budget():
    # 150 sessions whose only weight is their user_id must still stay within the budget
    store = make(Clock(), max_bytes=100_000)
    for i in range(150):
        store.open(f"s{i}", "u" * 10_000 + str(i))
    assert store.bytes_used <= 100_000
    assert len(store) < 150
    # a user_id filled in later counts as well
    roomy = make(Clock())
    sid = roomy.open("late")
    before = roomy.bytes_used
    roomy.open(sid, "v" * 5000)
    assert roomy.bytes_used == before + sys.getsizeof("v" * 5000)


# -- sweep ----------------------------------------------------------------------------


def test_sweep_removes_only_expired_sessions_and_counts_them():
    clock = Clock()
    store = make(clock, ttl=10)
    store.open("old1")
    store.open("old2")
    clock.advance(5)
    store.open("young")
    store.open("old1")  # activity: old1 is young again
    assert store.sweep() == 0
    clock.advance(5)
    assert store.sweep() == 1  # only old2 is 10 s idle
    assert {s["session_id"] for s in store.list_sessions()["sessions"]} == {"old1", "young"}
    clock.advance(10)
    assert store.sweep() == 2
    assert len(store) == 0
    assert store.sweep() == 0


def test_sweeper_sweeps_on_the_event_loop_until_stopped():
    clock = Clock()
    store = make(clock, ttl=10)

    async def scenario():
        store.open("a")
        sweeper = Periodic("context7-sweeper", 0.01, store.sweep, failed_event="session_sweep_failed")
        sweeper.start()
        with pytest.raises(RuntimeError):
            sweeper.start()
        clock.advance(10)
        await until(lambda: len(store) == 0, why="the sweep")
        await sweeper.stop()
        await sweeper.stop()  # idempotent
        assert [t for t in asyncio.all_tasks() if t.get_name() == "context7-sweeper"] == []
        store.open("b")
        clock.advance(10)
        # five sweep intervals, in which a running sweeper would sweep
        await holds(lambda: len(store) == 1, 0.05, "stopped: nobody swept")

    asyncio.run(scenario())


# -- summary --------------------------------------------------------------------------


def test_context_summary_is_the_last_ten_messages_cut_to_500_chars():
    store = make(Clock())
    sid = store.open(None)
    for i in range(11):
        store.append(sid, "user" if i % 2 == 0 else "assistant", f"m{i}")
    store.append(sid, "assistant", "a" * 499 + "bc" + "\nnot shown")  # the 12th message
    assert store.context_summary(sid) == "\n".join(
        [
            "user: m2", "assistant: m3", "user: m4", "assistant: m5", "user: m6",
            "assistant: m7", "user: m8", "assistant: m9", "user: m10",
            "assistant: " + "a" * 499 + "b",
        ]
    )


def test_context_summary_of_unknown_or_empty_session_is_empty():
    store = make(Clock())
    assert store.context_summary("nope") == ""
    sid = store.open(None)
    assert store.context_summary(sid) == ""


# -- views, list, delete -------------------------------------------------------------


def test_view_has_the_api_shape():
    clock = Clock()
    store = make(clock, ttl=3600)
    meta = {"model_used": "local-7b", "tags": ["a"]}
    sid = store.open("s1", "alice")
    store.append(sid, "user", "hello", timestamp=1234, metadata=None)
    clock.advance(2.5)
    store.append(sid, "assistant", "hi there", metadata=meta)
    meta["tags"].append("changed later")  # history is a snapshot
    assert orjson.loads(orjson.dumps(store.view(sid))) == {
        "session_id": "s1",
        "user_id": "alice",
        "summary": "user: hello\nassistant: hi there",
        "created_at": int(T0 * 1000),
        "last_active_at": int((T0 + 2.5) * 1000),
        "expires_at": int((T0 + 2.5 + 3600) * 1000),
        "message_count": 2,
        "messages": [
            {"role": "user", "content": "hello", "timestamp": 1234, "metadata": None},
            {
                "role": "assistant",
                "content": "hi there",
                "timestamp": int((T0 + 2.5) * 1000),
                "metadata": {"model_used": "local-7b", "tags": ["a"]},
            },
        ],
    }
    assert store.view("unknown") is None


def test_list_sessions_most_recent_first_without_expired():
    clock = Clock()
    store = make(clock, ttl=10)
    store.open("a")
    clock.advance(6)
    store.open("b")
    store.append("b", "user", "x")
    clock.advance(1)
    store.open("c")
    assert store.list_sessions() == {
        "sessions": [
            {"session_id": "c", "created_at": int((T0 + 7) * 1000), "expires_at": int((T0 + 17) * 1000), "message_count": 0},
            {"session_id": "b", "created_at": int((T0 + 6) * 1000), "expires_at": int((T0 + 16) * 1000), "message_count": 1},
            {"session_id": "a", "created_at": int(T0 * 1000), "expires_at": int((T0 + 10) * 1000), "message_count": 0},
        ],
        "total": 3,
    }
    clock.advance(3)  # a is 10 s idle
    listing = store.list_sessions()
    assert [s["session_id"] for s in listing["sessions"]] == ["c", "b"]
    assert listing["total"] == 2


def test_delete():
    clock = Clock()
    store = make(clock, ttl=10)
    sid = store.open(None)
    assert store.delete(sid) is True
    assert store.view(sid) is None
    assert store.delete(sid) is False
    assert store.delete("never-was") is False
    store.open("old")
    clock.advance(10)
    assert store.delete("old") is False  # expired counts as unknown
    assert len(store) == 0


# -- settings -------------------------------------------------------------------------


def test_store_from_settings():
    env = {
        "ENABLE_AUTH": "false",
        "CONTEXT7_TTL_SECONDS": "5",
        "EDGELINK_CONTEXT7_MAX_SESSIONS": "2",
        "EDGELINK_CONTEXT7_MAX_MESSAGES": "1",
        "EDGELINK_CONTEXT7_MAX_BYTES": "100000",
    }
    clock = Clock()
    store = session_store(load_settings(env=env), now=clock)
    for sid in ("a", "b", "c"):
        store.open(sid)
        store.append(sid, "user", "one")
        store.append(sid, "user", "two")
    assert len(store) == 2
    assert contents(store, "c") == ["two"]
    clock.advance(5)
    assert store.view("c") is None


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        SessionStore(ttl=0, max_sessions=1, max_messages=1, max_bytes=1)
    with pytest.raises(ValueError):
        Periodic("sweeper", 0, lambda: None, failed_event="x")
