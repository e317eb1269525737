#!/usr/bin/env python3
"""How many customer messages a second the bridge answers on a portal with the default limits.

The emulator keeps Bitrix24's default budget (2 requests a second, a burst of
50; a ``batch`` of up to 50 calls counts as one request); customers write at
a steady offered rate, spread over N dialogs the webhook user holds; the bot
answers at once.  For each run: answered messages a second (over the steady
part), portal requests per answered message, the backlog's slope (messages a
second it grows by; about 0 means the bridge keeps up), and the p99 latency
from a customer's message to its answer in the chat -- side by side for
``B24_POLL_SEC`` 1 and 5, with the ceiling the budget allows: 100 calls a
second less the reads the traffic needs (one call per dialog with news per
read cycle, at the stretched read interval under load).

    python3 bench/throughput.py [--seconds 60] [--rate 75] [--dialogs 50,200] [--polls 1,5]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import bridge_world  # noqa: E402

WARMUP_SEC = 10.0           # the first seconds are not measured
STRETCH_SEC = 5.0           # under load the bridge reads at most this seldom (olbridge: SCAN_STRETCH_SEC)
CALLS_PER_SEC = 100.0       # 2 requests a second x 50 calls a batch


def percentile(values: list, p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))] if values else float("nan")


def slope(points: list) -> float:
    """Least-squares slope of ``[(t, value)]``."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def ceiling(dialogs: int, rate: float, poll: float) -> float:
    """Answers a second the budget allows: every call not spent reading goes to posting."""
    interval = max(poll, STRETCH_SEC)          # under load the read interval stretches this far
    reads = min(dialogs, rate * interval) / interval + 2 * CALLS_PER_SEC / 50 / interval   # + the scan
    return min(rate, CALLS_PER_SEC - reads)


def run(dialogs: int, rate: float, poll: float, seconds: float) -> dict:
    with bridge_world(dialogs, default_limits=True, poll_sec=poll) as (portal, bot, chats, _proc):
        for c in chats:
            portal.take_chat(c, 7)             # the webhook user's own dialogs: answerable at once
        created: dict = {}
        stop = threading.Event()

        def feed() -> None:
            n, start = 0, time.monotonic()
            while not stop.is_set():
                due = start + n / rate
                now = time.monotonic()
                if due > now:
                    time.sleep(min(due - now, 0.05))
                    continue
                text = "tp %d" % n
                created[text] = time.time()
                portal.customer_message(chats[n % len(chats)], text)
                n += 1
        portal.reset_stats()
        t0 = time.time()
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        samples = []
        while time.time() - t0 < seconds:
            time.sleep(1.0)
            with portal.lock:
                answered = sum(1 for m in portal.messages.values()
                               if m["text"].startswith("Echo: tp ") and m["date"] >= t0)
            samples.append((time.time() - t0, len(created) - answered))
        stop.set()
        feeder.join()
        end = time.time()
        with portal.lock:
            replies = {m["text"][len("Echo: "):]: m["date"] for m in portal.messages.values()
                       if m["text"].startswith("Echo: tp ")}
        requests = sum(portal.counts.values())
        fetches = portal.counts.get("im.dialog.messages.get", 0) + portal.sub_counts.get("im.dialog.messages.get", 0)
        steady = [t for text, t in replies.items() if t0 + WARMUP_SEC <= t <= end]
        latency = [replies[text] - created[text] for text in replies if text in created
                   and created[text] >= t0 + WARMUP_SEC]
        return {"answered_per_sec": len(steady) / max(1.0, end - t0 - WARMUP_SEC),
                "requests_per_answer": requests / max(1, len(replies)),
                "fetches_per_answer": fetches / max(1, len(replies)),
                "backlog_slope": slope([s for s in samples if s[0] >= WARMUP_SEC]),
                "p99": percentile(latency, 99), "offered": len(created), "answered": len(replies)}


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of offered traffic per run (60)")
    parser.add_argument("--rate", type=float, default=75.0, help="customer messages offered a second (75)")
    parser.add_argument("--dialogs", default="50,200", help="dialog counts, comma-separated (50,200)")
    parser.add_argument("--polls", default="1,5", help="B24_POLL_SEC values, comma-separated (1,5)")
    args = parser.parse_args(argv)
    print("offered %.0f messages/s for %.0f s (the first %.0f s not measured), instant bot, the portal's default "
          "limits (2 req/s, burst 50)" % (args.rate, args.seconds, WARMUP_SEC))
    print("%-8s %6s %11s %12s %12s %14s %16s %9s %11s" % (
        "dialogs", "poll", "ceiling/s", "answered/s", "of ceiling", "req / answer", "fetches / answer", "backlog",
        "p99 (s)"))
    for dialogs in [int(x) for x in args.dialogs.split(",")]:
        for poll in [float(x) for x in args.polls.split(",")]:
            r = run(dialogs, args.rate, poll, args.seconds)
            top = ceiling(dialogs, args.rate, poll)
            print("%-8d %6g %11.1f %12.1f %11.0f%% %14.3f %16.2f %+8.1f/s %11.1f" % (
                dialogs, poll, top, r["answered_per_sec"], 100 * r["answered_per_sec"] / top,
                r["requests_per_answer"], r["fetches_per_answer"], r["backlog_slope"], r["p99"]))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
