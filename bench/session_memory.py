"""Memory cost of Context-7 sessions: RSS growth for N sessions x M messages.

Fills a SessionStore the way chat turns do (alternating user and assistant messages of
100-200 chars of prose, metadata null) and prints the resident-set growth per session.
The message texts are part of what a session holds, so they are built inside the measured
span, each a distinct string as they would be when parsed from requests.

    .venv/bin/python bench/session_memory.py [--sessions 10000] [--messages 20]
"""

from __future__ import annotations

import argparse
import gc
import os
import random

from edgelink.gateway.sessions import SessionStore

WORDS = (
    "the gateway routes each request to a module and records the answer in the session so "
    "that the next turn can see what was said before while the operator watches latency "
    "health breakers events and the queue of spawned workers on a small board"
).split()


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sentence(rng: random.Random) -> str:
    target = rng.randint(100, 200)
    words: list[str] = []
    length = 0
    while length < target:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:target].capitalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=20)
    args = parser.parse_args()
    if args.sessions < 1 or args.messages < 1:
        parser.error("--sessions and --messages must be >= 1")

    rng = random.Random(7)
    clock = 1_700_000_000.0
    # Bounds wide open: this measures what the sessions cost, not what the bounds allow.
    store = SessionStore(
        ttl=3600, max_sessions=args.sessions, max_messages=args.messages, max_bytes=2**62, now=lambda: clock
    )
    gc.collect()
    before = rss_bytes()
    content_chars = 0
    for _ in range(args.sessions):
        sid = store.open(None, "operator")
        for i in range(args.messages):
            text = sentence(rng)
            content_chars += len(text)
            store.append(sid, "user" if i % 2 == 0 else "assistant", text)
        clock += 0.001
    gc.collect()
    grown = rss_bytes() - before

    assert len(store) == args.sessions
    per_session = grown / args.sessions
    per_message_chars = content_chars / (args.sessions * args.messages)
    print(f"sessions: {args.sessions}  messages/session: {args.messages}  "
          f"mean content: {per_message_chars:.0f} chars")
    print(f"RSS growth: {grown / 2**20:.1f} MiB")
    print(f"bytes/session: {per_session:.0f}  "
          f"(content {content_chars / args.sessions:.0f}, overhead {per_session - content_chars / args.sessions:.0f})")
    # How well the store's own count (what EDGELINK_CONTEXT7_MAX_BYTES limits) tracks RSS.
    print(f"store estimate: {store.bytes_used / args.sessions:.0f} bytes/session "
          f"({store.bytes_used / grown:.0%} of measured)")


if __name__ == "__main__":
    main()
