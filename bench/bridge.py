#!/usr/bin/env python3
"""The bridge's cost per message as the number of known dialogs grows, and its memory over time.

1. Bookkeeping per message -- what the state store does for one message
   (written to the inbox with its dialog's cursor, answer kept, part posted,
   done) -- with 100, 10,000 and 50,000 dialogs known, side by side with what
   the previous bridge did (the whole state rewritten and fsynced per message).
2. RSS of a running bridge (a subprocess against the emulator and an
   instant bot) after 1,000, 20,000 (100,000) and ``--messages`` messages (progress on stderr); and with
   100 and 10,000 known dialogs (started, and after 500 answers).
3. 20 dialogs x 1 message with a bot that thinks 1 s: wall time, dialogs side
   by side (8) against one at a time.
4. A 200-message burst over 50 dialogs, instant bot, the portal's default
   limits (2 requests/s, burst 50): time to the last reply, replies in
   batches against one request per reply.

    python3 bench/bridge.py [--messages 100000] [--skip-rss] [--skip-burst]
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import bridge_world  # noqa: E402

import b24common as bc  # noqa: E402
from olbridge import store as br  # noqa: E402


def _info(i: int) -> dict:
    return {"chat_id": i, "title": "Customer %d - WhatsApp" % i, "entity_id": "wa|3|%d|%d" % (i, i),
            "line_id": 3, "customer_id": i, "customer_name": "Customer %d" % i,
            "customer_phone": "+1000%07d" % i, "is_lines": True, "session_id": i, "waiting": False}


def bookkeeping_ours(dialogs: int, messages: int) -> float:
    """Seconds per message for the SQLite store with *dialogs* known."""
    folder = tempfile.mkdtemp(prefix="bench-bridge-")
    try:
        store = br.Store(os.path.join(folder, "bridge.db"))
        changes = {"chat%d" % i: {"cursor": 1000 + i, "info": _info(i)} for i in range(dialogs)}
        store.commit_cycle([], changes, {"watermark": time.time(), "floor_id": 1})
        started = time.perf_counter()
        for n in range(messages):
            did = "chat%d" % (n * 7919 % dialogs)
            mid = 10 ** 6 + n
            store.commit_cycle([{"dialog": did, "message_id": mid, "session": 5,
                                 "payload": {"text": "hello %d" % n, "dialog_id": did}}],
                               {did: {"cursor": mid, "info": _info(n)}}, {"watermark": time.time()},
                               {did: time.time()})
            row = store.head(did)
            store.update(row, state="answered", answer=["Echo: hello %d" % n], posted=0)
            store.update(row, posted=1)
            store.finish(row)
        return (time.perf_counter() - started) / messages
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bookkeeping_previous(dialogs: int, messages: int) -> float:
    """Seconds per message for the previous bridge: the whole JSON state rewritten per message."""
    folder = tempfile.mkdtemp(prefix="bench-bridge-")
    try:
        state = bc.StateFile(os.path.join(folder, "bridge.json"))
        doc = {"version": 1, "cursors": {"chat%d" % i: 1000 + i for i in range(dialogs)},
               "dialogs": {"chat%d" % i: _info(i) for i in range(dialogs)}, "watermark": time.time(),
               "floor_id": 1, "portal": "bench", "user_id": 7}
        started = time.perf_counter()
        for n in range(messages):
            doc["cursors"]["chat%d" % (n * 7919 % dialogs)] = 10 ** 6 + n
            state.save(doc)
        return (time.perf_counter() - started) / messages
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_run(checkpoints: tuple, dialogs: int = 200) -> list:
    """Run a bridge; feed messages; RSS (KiB) after each checkpoint's number of answers."""
    with bridge_world(dialogs, args=["--workers", "8"], poll_sec=0.2) as (portal, bot, chats, proc):
        bot.received = collections.deque(maxlen=100)      # a count is enough: not a million payloads kept here
        figures = []
        sent = 0
        started = time.monotonic()
        for checkpoint in checkpoints:
            while sent < checkpoint:
                portal.customer_message(chats[sent % dialogs], "message %d" % sent)
                sent += 1
                if sent % 200 == 0:
                    while bot.count < sent - 400:
                        time.sleep(0.05)
                if sent % 50000 == 0:
                    print("  (%d messages after %.0f s: bridge RSS %d KiB)" % (
                        sent, time.monotonic() - started, rss_kib(proc.pid)), file=sys.stderr, flush=True)
            deadline = time.monotonic() + 600
            while bot.count < checkpoint and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)
            figures.append((checkpoint, bot.count, rss_kib(proc.pid)))
        return figures


def rss_dialogs(dialogs: int, messages: int = 500) -> tuple:
    """RSS (KiB) of a bridge that knows *dialogs* dialogs: once started, and after *messages* answers."""
    with bridge_world(dialogs, args=["--workers", "8"], poll_sec=0.5) as (portal, bot, chats, proc):
        deadline = time.monotonic() + 120
        while portal.counts.get("batch", 0) + portal.counts.get("im.recent.list", 0) < 3 \
                and time.monotonic() < deadline:
            time.sleep(0.2)                    # started: every dialog read once
        time.sleep(2)
        started = rss_kib(proc.pid)
        for n in range(messages):
            portal.customer_message(chats[n * 7919 % len(chats)], "m %d" % n)
        deadline = time.monotonic() + 300
        while bot.count < messages and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        return started, rss_kib(proc.pid)


def timed_run(env: dict, args: list, dialogs: int, per_dialog: int, bot_delay: float,
              default_limits: bool) -> float:
    """Seconds from the first customer message to the last reply posted."""
    with bridge_world(dialogs, env=env, args=args, bot_delay=bot_delay,
                      default_limits=default_limits) as (portal, _bot, chats, _proc):
        want = dialogs * per_dialog
        started = time.monotonic()
        for n in range(per_dialog):
            for c in chats:
                portal.customer_message(c, "burst %d" % n)
        deadline = started + 900
        while time.monotonic() < deadline:
            with portal.lock:
                done = sum(1 for m in portal.messages.values() if str(m["text"]).startswith("Echo: burst"))
            if done >= want:
                break
            time.sleep(0.1)
        return time.monotonic() - started


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100000, help="messages for the RSS run (default 100000)")
    parser.add_argument("--skip-rss", action="store_true", help="no RSS run")
    parser.add_argument("--skip-burst", action="store_true", help="no side-by-side and burst runs")
    args = parser.parse_args(argv)
    print("bookkeeping per message (ms), SQLite store vs the previous whole-file rewrite")
    print("%-16s %12s %12s %10s" % ("known dialogs", "ours", "previous", "prev/ours"))
    ours = {}
    for dialogs in (100, 10000, 50000):
        o = bookkeeping_ours(dialogs, 200)
        p = bookkeeping_previous(dialogs, 200 if dialogs <= 10000 else 40)
        ours[dialogs] = o
        print("%-16d %12.2f %12.2f %9.1fx" % (dialogs, o * 1000, p * 1000, p / o))
    print("ours, 50k vs 100 dialogs: %.2fx" % (ours[50000] / ours[100]))
    if not args.skip_rss:
        figures = rss_run(tuple(sorted({1000, 20000, max(args.messages, 1001)}
                                       | ({100000} if args.messages > 100000 else set()))))
        print("bridge RSS (KiB) while answering messages over 200 dialogs")
        for checkpoint, answered, kib in figures:
            print("  after %6d messages (%d answered): %d KiB" % (checkpoint, answered, kib))
        for checkpoint, _answered, kib in figures[1:]:
            print("RSS after %d vs after 1000 messages: %.2fx" % (checkpoint, kib / figures[0][2]))
        # what grows in the first minutes is bounded (ids of our own posts kept for their echoes, parts waiting
        # for a delivery verdict): flat from then on
        for checkpoint, _answered, kib in figures[2:]:
            print("RSS after %d vs after %d messages: %.2fx" % (checkpoint, figures[1][0], kib / figures[1][2]))
        small, large = rss_dialogs(100), rss_dialogs(10000)
        print("bridge RSS (KiB) by known dialogs: 100 -> %d started, %d after 500 answers; 10,000 -> %d started, "
              "%d after 500 answers (%.2fx / %.2fx)" % (small[0], small[1], large[0], large[1],
                                                          large[0] / small[0], large[1] / small[1]))
    if not args.skip_burst:
        side = timed_run({}, [], 20, 1, 1.0, False)
        single = timed_run({}, ["--workers", "1"], 20, 1, 1.0, False)
        print("20 dialogs x 1 message, bot takes 1 s: %.1f s side by side (8 workers), %.1f s one at a time "
              "(%.1fx)" % (side, single, single / side))
        batched = timed_run({}, [], 50, 4, 0.0, True)
        one_each = timed_run({"BRIDGE_REPLY_BATCH": "1"}, [], 50, 4, 0.0, True)
        print("200 messages over 50 dialogs, instant bot, default portal limits: last reply after %.1f s with "
              "batched replies, %.1f s with one request per reply (%.1fx)" % (batched, one_each, one_each / batched))
    return 0


if __name__ == "__main__":
    sys.exit(main())
